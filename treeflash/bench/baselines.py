"""transformers' own decoding, timed as `treeflash bench` times ours: `model.generate` (greedy or sampling) and
its prompt-lookup decoding."""

from __future__ import annotations

import time
from typing import Sequence

import torch


@torch.inference_mode()
def hf_generate(model, prompt_ids: list[int], max_new_tokens: int, eos_token_ids: Sequence[int],
                temperature: float = 0.0, seed: int = 0, prompt_lookup_tokens: int | None = None
                ) -> tuple[list[int], float, str]:
    """transformers' own `generate` on the target's model (prompt-lookup decoding when
    `prompt_lookup_tokens` is given). Returns (new tokens up to and including the first EOS, wall seconds,
    stop reason). Sampling is unfiltered (top-k 0, top-p 1) and seeded through torch's global RNG, which
    is how transformers samples."""
    device = model.get_output_embeddings().weight.device
    ids = torch.tensor([prompt_ids], device=device)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                  eos_token_id=list(eos_token_ids) or None, pad_token_id=eos_token_ids[0] if eos_token_ids else 0)
    if temperature > 0:
        kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
        torch.manual_seed(seed)
    if prompt_lookup_tokens:
        kwargs["prompt_lookup_num_tokens"] = prompt_lookup_tokens
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    out = model.generate(ids, **kwargs)
    sync()
    seconds = time.perf_counter() - start
    new = out[0, len(prompt_ids):].tolist()
    eos = set(eos_token_ids)
    for i, token in enumerate(new):
        if token in eos:
            return new[: i + 1], seconds, "eos"
    return new, seconds, "max_new_tokens"
