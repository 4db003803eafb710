"""The Python API: load a target and a drafter once, generate text with any method.

    import treeflash
    decoder = treeflash.load()                      # the default target and its shipped drafter
    result = decoder.generate_text("Write a haiku about the sea.", method="treeflash")
    print(result.text, result.tau, result.tokens_per_second)

`result.to_dict()` is exactly what `treeflash generate --json` prints.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .decoding import DecodeConfig, DecodeResult, Decoder
from .drafters import Drafter, load_drafter, new_drafter
from .errors import TreeFlashError
from .machine import cpu_has_amx
from .targets import DEFAULT_TARGET, Target, load_target
from .tuning import load_tuning

# The drafter shipped for the default target (trained by `treeflash train`; see the README).
SHIPPED_DRAFTERS = {DEFAULT_TARGET: Path(__file__).parent / "checkpoints" / "smollm2-135m-instruct-treeflash"}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise TreeFlashError(f"unknown dtype {name!r}; choose one of {', '.join(_DTYPES)}") from None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_drafter_dtype(target: Target) -> torch.dtype:
    """The drafter's dtype unless one is asked for: bfloat16 for a float32 target on a CPU with AMX, else the
    target's. The drafter only proposes tokens, so its precision never changes an output (the target verifies
    in its own dtype); on AMX its matmuls run 2-9x faster in bfloat16 (docs/experiments.md, "Drafter dtype")."""
    if target.device.type == "cpu" and target.dtype == torch.float32 and cpu_has_amx():
        return torch.bfloat16
    return target.dtype


def resolve_drafter(spec: str | None, target: Target, dtype: torch.dtype | None = None) -> Drafter | None:
    """`spec`: a checkpoint directory; "untrained" for a fresh (DFlash-equivalent) drafter; "none" for no
    drafter; None for the drafter shipped with the target, or an untrained one if there is none.
    `dtype`: the drafter's dtype (default: `default_drafter_dtype`)."""
    if spec == "none":
        return None
    dtype = dtype or default_drafter_dtype(target)
    if spec == "untrained":
        return new_drafter(target).to(dtype)
    if spec is None:
        shipped = SHIPPED_DRAFTERS.get(target.name)
        if shipped is not None and (shipped / "config.json").exists():
            return load_drafter(shipped, target, dtype)
        warnings.warn(
            f"no trained drafter is shipped for {target.name!r}: using an untrained one (outputs stay exact, "
            "but few drafts are accepted); pass --drafter PATH for a trained drafter",
            stacklevel=2,
        )
        return new_drafter(target).to(dtype)
    return load_drafter(spec, target, dtype)


def load(
    target: str | None = None,
    drafter: str | None = None,
    device: str | None = None,
    dtype: str | torch.dtype = "float32",
    drafter_dtype: str | torch.dtype | None = None,
) -> "TextDecoder":
    """Load a target (None = the embedded SmolLM2-135M-Instruct) and a drafter (see `resolve_drafter`).
    `drafter_dtype`: None picks `default_drafter_dtype`. If `treeflash tune` was run for this machine, target
    and drafter, its budget and candidate count become the defaults (see `treeflash.tuning`)."""
    dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    drafter_dtype = parse_dtype(drafter_dtype) if isinstance(drafter_dtype, str) else drafter_dtype
    t = load_target(target, dtype=dtype, device=device or default_device())
    decoder = TextDecoder(t, resolve_drafter(drafter, t, drafter_dtype))
    decoder.tuning = load_tuning(decoder)
    return decoder


class TextDecoder(Decoder):
    """A `Decoder` that also takes text prompts."""

    def generate_text(self, prompt: str, config: DecodeConfig | None = None, chat: bool = True, on_tokens=None,
                      **fields) -> DecodeResult:
        """Generate from a text prompt (as one user turn of the chat template unless chat=False), with
        `config`, or a DecodeConfig made of the keyword arguments."""
        ids = self.target.encode_prompt(prompt, chat=chat)
        return self.generate(ids, config or DecodeConfig(**fields), on_tokens=on_tokens)

    def generate_text_batch(self, prompts: list[str], config: DecodeConfig | list[DecodeConfig] | None = None,
                            chat: bool = True, max_batch: int = 8, **fields) -> list[DecodeResult]:
        """`generate_text` for several prompts, at most `max_batch` at once, their rounds batched (see
        `Decoder.generate_batch`); each result equals that prompt's `generate_text` alone."""
        ids = [self.target.encode_prompt(p, chat=chat) for p in prompts]
        return self.generate_batch(ids, config or DecodeConfig(**fields), max_batch=max_batch)


def generate(prompt: str, target: str | None = None, drafter: str | None = None, chat: bool = True,
             **config) -> DecodeResult:
    """One-shot convenience: load, then generate. Prefer `load()` once for many prompts."""
    return load(target, drafter).generate_text(prompt, chat=chat, **config)
