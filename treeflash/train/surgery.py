"""Where a training run's drafter comes from (`initial_drafter`: new, or loaded and changed), and the operations
on drafters that training uses: add a TreeFlash head, grow by layers that start as the identity, and average
the weights of drafters of one lineage."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from ..drafters import Drafter, default_target_layer_ids, load_drafter, new_drafter
from ..errors import TreeFlashError
from ..targets import Target
from .config import DEFAULT_BLOCK_SIZE, DEFAULT_LAYERS, DEFAULT_TARGET_LAYERS
from .records import Sequence as Record


def initial_drafter(target: Target, stage: str, sequences: Sequence[Record], init: str | Path | None = None,
                    add_layers: int = 0, layers: int = DEFAULT_LAYERS, block_size: int = DEFAULT_BLOCK_SIZE,
                    target_layers: int = DEFAULT_TARGET_LAYERS, draft_vocab: int | None = None,
                    init_from_target: bool = False, seed: int = 0, log: Callable[[str], None] = print) -> Drafter:
    """The float32 drafter a run of `stage` ("drafter" or "head") starts from, on the target's device.

    init: a checkpoint to continue (a head-less one gets a zero TreeFlash head for the head stage), grown by
    `add_layers`; else a new drafter of `layers`, `block_size` and `target_layers`, over the `draft_vocab`
    most frequent response tokens of `sequences` (None: the whole vocabulary), optionally started from the
    target's last layers (`init_from_target`)."""
    if add_layers and not init:
        raise TreeFlashError("--add-layers grows the --init drafter; pass --init PATH (a new drafter takes --layers)")
    if stage == "head" and not init:
        raise TreeFlashError("training a head starts from a trained drafter; pass --init PATH")
    if init:
        drafter = load_drafter(init, target, dtype=torch.float32)
        if stage == "head" and drafter.ar_approximation is None:
            drafter = with_head(drafter)
        if add_layers:
            drafter = grow_drafter(drafter, add_layers, seed=seed)
            log(f"grew the drafter to {drafter.config.num_hidden_layers} layers (the new ones start as the identity)")
        return drafter.to(target.device)
    vocab = None
    if draft_vocab:
        vocab, coverage = draft_vocabulary(sequences, draft_vocab, always=target.eos_token_ids)
        log(f"draft vocabulary: {vocab.numel()} tokens covering {100 * coverage:.1f}% of response tokens")
    drafter = new_drafter(target, num_hidden_layers=layers, block_size=block_size, seed=seed, draft_vocab=vocab,
                          target_layer_ids=default_target_layer_ids(target.num_layers, target_layers))
    drafter.float()  # master weights
    if init_from_target:
        copied = initialize_from_target(drafter, target)
        log(f"initialised {len(copied)} drafter tensors from the target's last layers")
    return drafter.to(target.device)


def draft_vocabulary(sequences: list[Record], size: int, always: tuple[int, ...] = ()) -> tuple[Tensor, float]:
    """The `size` most frequent response tokens (plus `always`, e.g. EOS), and the share of response tokens
    they cover. Returns (token ids [size'] int64, coverage)."""
    counts: dict[int, int] = {}
    for seq in sequences:
        for token in seq.tokens[seq.prompt_length:]:
            counts[token] = counts.get(token, 0) + 1
    ranked = [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    chosen = list(dict.fromkeys(list(always) + ranked))[:size]
    total = sum(counts.values())
    coverage = sum(counts.get(t, 0) for t in chosen) / max(1, total)
    return torch.tensor(sorted(chosen), dtype=torch.long), coverage


@torch.no_grad()
def initialize_from_target(drafter: Drafter, target: Target) -> list[str]:
    """Start a drafter from the target's own last layers instead of random weights.

    Drafter layer i takes target layer L - n + i (n drafter layers) where the shapes agree; `fc` starts by
    passing the deepest feature layer through, and `hidden_norm`/`norm` take the matching target norms.
    The per-head q/k norms that Llama/Qwen2 lack stay at 1. Returns the names of the tensors copied.
    """
    copied = []
    n, L = len(drafter.layers), target.num_layers
    for i, layer in enumerate(drafter.layers):
        source = dict(target.layers[L - n + i].named_parameters())
        for name, param in layer.named_parameters():
            if name in source and source[name].shape == param.shape:
                param.copy_(source[name].to(param.dtype))
                copied.append(f"layers.{i}.{name}")
    H = drafter.config.hidden_size
    deepest = max(range(len(drafter.config.target_layer_ids)), key=lambda j: drafter.config.target_layer_ids[j])
    drafter.fc.weight.zero_()
    drafter.fc.weight[:, deepest * H:(deepest + 1) * H] = torch.eye(H, dtype=drafter.fc.weight.dtype)
    drafter.hidden_norm.weight.copy_(target.layers[L - n].input_layernorm.weight.to(drafter.fc.weight.dtype))
    drafter.norm.weight.copy_(target.final_norm.weight.to(drafter.fc.weight.dtype))
    return copied + ["fc.weight", "hidden_norm.weight", "norm.weight"]


def with_head(drafter: Drafter) -> Drafter:
    """A copy of a head-less drafter with a fresh (zero) TreeFlash head, on the drafter's device and dtype."""
    config = dataclasses.replace(drafter.config, ar_head=True)
    p = next(drafter.parameters())
    fresh = Drafter(config).to(device=p.device, dtype=p.dtype)
    missing = fresh.load_state_dict(drafter.state_dict(), strict=False).missing_keys
    assert all(k.startswith("ar_approximation.") for k in missing)
    return fresh


def grow_drafter(drafter: Drafter, layers: int = 1, seed: int = 0) -> Drafter:
    """A copy of `drafter` with `layers` more decoder layers after its own, which start as the identity: each
    new layer is initialised like a new drafter's, then its attention output and MLP down projections are
    zeroed, so its residual branches add exactly nothing and the grown drafter drafts exactly as `drafter` did.
    Training then moves them (their output projections get gradients at once, the rest as those grow): a
    deeper drafter that starts from a trained one instead of from scratch."""
    if layers < 1:
        raise TreeFlashError(f"grow a drafter by at least one layer; got {layers}")
    config = dataclasses.replace(drafter.config, num_hidden_layers=drafter.config.num_hidden_layers + layers)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        grown = Drafter(config)
    finally:
        torch.random.set_rng_state(generator_state)
    p = next(drafter.parameters())
    grown = grown.to(device=p.device, dtype=p.dtype)
    missing = grown.load_state_dict(drafter.state_dict(), strict=False).missing_keys
    old = drafter.config.num_hidden_layers
    assert all(k.startswith("layers.") and int(k.split(".")[1]) >= old for k in missing), missing
    with torch.no_grad():
        for layer in grown.layers[old:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return grown.train(drafter.training).requires_grad_(any(q.requires_grad for q in drafter.parameters()))


def average_drafters(paths: Sequence[str | Path]) -> Drafter:
    """The uniform average of the weights of drafters that share one config, in float32. Checkpoints of one
    lineage (a run and its continuation, or one run's later checkpoints) can average to a drafter that validates
    above each of them (weight averaging, as in SWA and LAWA; measured on the shipped drafter's lineage in
    training/README.md). Drafters of different shapes, draft vocabularies or settings cannot be averaged, and a
    TreeFlashError names the first difference."""
    if len(paths) < 2:
        raise TreeFlashError(f"averaging needs at least two drafters; got {len(paths)}")
    drafters = [load_drafter(p, dtype=torch.float32) for p in paths]
    first, reference = drafters[0], drafters[0].config.to_json_dict()
    reference.pop("dtype", None)
    total = {k: v.clone() for k, v in first.state_dict().items()}
    for path, drafter in zip(paths[1:], drafters[1:]):
        config = drafter.config.to_json_dict()
        config.pop("dtype", None)
        if config != reference:
            key = next(k for k in sorted(set(config) | set(reference)) if config.get(k) != reference.get(k))
            raise TreeFlashError(f"{path} differs from {paths[0]} in its config ({key}: {config.get(key)!r} against "
                                 f"{reference.get(key)!r}); average only drafters of one shape and setting")
        for k, v in drafter.state_dict().items():
            if v.is_floating_point():
                total[k] += v
            elif not torch.equal(v, total[k]):
                raise TreeFlashError(f"{path} differs from {paths[0]} in {k}; average only drafters with the same "
                                     "draft vocabulary")
    first.load_state_dict({k: v / len(paths) if v.is_floating_point() else v for k, v in total.items()})
    return first
