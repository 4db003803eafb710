"""Target features captured while generating: `treeflash train data --features` caches them from the passes
that regenerate the responses (`treeflash.train.regenerate`) instead of running the target again
(`treeflash train features`). It hooks into the decode loop through `Generation.on_features`."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..decoding import DecodeConfig, DecodeResult, Decoder, Generation
from ..errors import TreeFlashError
from ..targets import Segment


@torch.inference_mode()
def generate_with_features(decoder: Decoder, prompts: Sequence[list[int]], configs: Sequence[DecodeConfig],
                           layers: tuple[int, ...], max_batch: int = 8) -> tuple[list[DecodeResult], list[Tensor]]:
    """`decoder.generate_batch(prompts, configs, max_batch)` with method ar (one config per prompt), keeping the
    target's outputs of `layers` (0-based) at every token of each prompt and response: per result a
    [prompt + new tokens, len(layers) * H] float16 tensor. The passes that generate compute them anyway; one more
    pass over the last tokens adds theirs."""
    if len(configs) != len(prompts):
        raise TreeFlashError(f"got {len(configs)} configs for {len(prompts)} prompts; pass one per prompt")
    captured: list[list[Tensor]] = [[] for _ in prompts]
    generations = [decoder.start(p, c, on_features=lambda f, into=into: into.append(f.to(torch.float16)),
                                 feature_layers=tuple(layers))
                   for p, c, into in zip(prompts, configs, captured)]
    decoder.run(generations, max_batch)
    for into, last in zip(captured, _last_token_features(decoder, generations)):
        into.append(last.to(torch.float16))
    return [g.result(decoder.target.tokenizer) for g in generations], [torch.cat(c) for c in captured]


def _last_token_features(decoder: Decoder, generations: list[Generation]) -> list[Tensor]:
    """[1, k*H] per generation: the features of its last token, which generating never feeds to the target (it is
    the root of the round that was not run). One pass over all of them; nothing is committed to the caches."""
    device = decoder.target.device
    segments = [Segment(torch.tensor(g.committed[-1:], device=device), torch.tensor([g.cache.length], device=device),
                        g.cache, logits_rows=None) for g in generations]
    outputs = decoder.target.forward_batch(segments, feature_layers=generations[0].feature_layers) if segments else []
    return [out.features for out in outputs]
