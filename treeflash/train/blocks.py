"""The blocks of the DFlash/TreeFlash training objective, and the target features they read.

One training example is one sequence (prompt + the target's response) with A random anchors in its response.
Each anchor p starts a block `[x_p, MASK x (b-1)]` at positions p..p+b-1 whose outputs 1..b-1 predict
x_{p+1..p+b-1}. All A blocks go through the drafter in ONE pass with a block-sparse mask: a block sees the
target features of positions strictly before its anchor (what the drafter sees at inference, where the
anchor is the bonus token the target has not run on yet), all of its own block, and no other block.

A batch's blocks go through the drafter in one padded pass, each sequence's blocks masked to its own context
(`batch_hidden`). Target features come from a feature cache (`treeflash.train.features`, made once by
`treeflash train features`) or, without one, from an online target pass per sequence; `feature_scale` evens
out their massive dimensions in front of the drafter's `fc`.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..drafters import Drafter
from ..errors import TreeFlashError
from ..targets import Target
from .config import TrainConfig
from .features import sequence_features
from .records import Sequence

def sample_anchors(prompt_length: int, length: int, count: int, generator: torch.Generator) -> Tensor:
    """Up to `count` distinct anchors, sorted: positions p >= 1 (some context before it) whose next token is a
    response token (p + 1 >= prompt_length) and exists (p + 1 < length). Returns [A] int64."""
    low = max(prompt_length - 1, 1)
    if low >= length - 1:  # no response token left, e.g. a prompt longer than max_length cut the sequence
        return torch.zeros(0, dtype=torch.int64)
    candidates = torch.arange(low, length - 1)
    pick = torch.randperm(candidates.numel(), generator=generator)[:count]
    return candidates[pick].sort().values


@dataclasses.dataclass
class Blocks:
    """All blocks of one sequence, flattened: A blocks of b entries each (n = A * b)."""

    tokens: Tensor  # [n] int64: x_p then MASK x (b-1), per block
    positions: Tensor  # [n] int64: p .. p+b-1
    labels: Tensor  # [n] int64: the true token at each position, -100 for the anchor entry and past the end
    parents: Tensor  # [n] int64: the true token one position earlier (the head's teacher-forced parent)
    offsets: Tensor  # [n] int64: k, the entry's offset in its block


def make_blocks(tokens: Tensor, anchors: Tensor, block_size: int, mask_token_id: int) -> Blocks:
    """tokens [L] int64, anchors [A] -> the flattened blocks."""
    L = tokens.numel()
    k = torch.arange(block_size)
    positions = (anchors[:, None] + k).flatten()  # [n]
    inside = positions < L
    clamped = positions.clamp(max=L - 1)
    offsets = k.repeat(anchors.numel())
    block_tokens = torch.where(offsets == 0, tokens[clamped], torch.full_like(clamped, mask_token_id))
    labels = torch.where(inside & (offsets > 0), tokens[clamped], torch.full_like(clamped, -100))
    parents = tokens[(positions - 1).clamp(min=0, max=L - 1)]
    return Blocks(tokens=block_tokens, positions=positions, labels=labels, parents=parents, offsets=offsets)


def block_attention_mask(anchors: Tensor, block_size: int, context_length: int) -> Tensor:
    """[A*b, L + A*b] bool: block j sees context positions < anchors[j] and its own b entries only."""
    A = anchors.numel()
    block_of = torch.arange(A).repeat_interleave(block_size)  # [n]
    context = torch.arange(context_length)[None, :] < anchors[block_of][:, None]  # [n, L]
    own = block_of[:, None] == block_of[None, :]  # [n, n]
    return torch.cat((context, own), dim=1)


@dataclasses.dataclass
class Example:
    """One sequence's share of a training batch: its tokens, target features and sampled blocks."""

    tokens: Tensor  # [L] int64
    features: Tensor  # [L, k*H] float32: outputs of the drafter's target layers
    final: Tensor  # [L, H] float32: the target's final normed states (its logits are lm_head of these)
    anchors: Tensor  # [A] int64, sorted
    blocks: Blocks  # A blocks of b entries


def batch_hidden(drafter: Drafter, target: Target, examples: list[Example]) -> list[Tensor]:
    """The drafter's pre-norm hidden states of every example's blocks, all in ONE padded pass.

    Each sequence's blocks see only their own context (block-sparse mask, as in `block_attention_mask`); pad
    rows see only themselves. Returns one [A_i*b, H] tensor per example."""
    device = target.device
    b = drafter.block_size
    S = len(examples)
    lengths = [int(e.anchors.max()) for e in examples]  # no block sees context at or after its anchor
    sizes = [e.blocks.tokens.numel() for e in examples]
    L, n = max(lengths), max(sizes)
    width = examples[0].features.shape[1]
    features = torch.zeros(S, L, width, dtype=examples[0].features.dtype)
    block_tokens = torch.full((S, n), drafter.config.mask_token_id, dtype=torch.long)
    positions = torch.zeros(S, n, dtype=torch.long)
    mask = torch.zeros(S, n, L + n, dtype=torch.bool)
    mask[:, torch.arange(n), L + torch.arange(n)] = True  # pad rows: themselves (real rows are overwritten)
    for i, e in enumerate(examples):
        features[i, : lengths[i]] = e.features[: lengths[i]]
        block_tokens[i, : sizes[i]] = e.blocks.tokens
        positions[i, : sizes[i]] = e.blocks.positions
        own = block_attention_mask(e.anchors, b, lengths[i])  # [n_i, L_i + n_i]
        mask[i, : sizes[i]] = False
        mask[i, : sizes[i], : lengths[i]] = own[:, : lengths[i]]
        mask[i, : sizes[i], L: L + sizes[i]] = own[:, lengths[i]:]
    dtype = drafter.fc.weight.dtype
    context = drafter.fuse(features.to(device=device, dtype=dtype))
    embeds = target.embed_tokens(block_tokens.to(device)).to(context.dtype)
    context_positions = torch.arange(L, device=device).expand(S, L)
    hidden = drafter.forward_block(embeds, positions.to(device), context, context_positions, cache=None,
                                   context_mask=mask.to(device))
    return [hidden[i, : sizes[i]] for i in range(S)]


def drafter_hidden(drafter: Drafter, target: Target, tokens: Tensor, blocks: Blocks, anchors: Tensor,
                   features: Tensor) -> Tensor:
    """The drafter's pre-norm hidden states [A*b, H] of one sequence's blocks (features [L, k*H], no grad)."""
    example = Example(tokens.cpu(), features.cpu(), torch.zeros(0), anchors.cpu(), blocks)
    return batch_hidden(drafter, target, [example])[0]


def target_pass(target: Target, drafter: Drafter, tokens: Tensor, logits: bool):
    """Target features [L, k*H] (and logits [L, V] if asked), detached from inference mode for autograd."""
    out = target.forward(tokens, torch.arange(tokens.numel(), device=tokens.device), target.new_cache(tokens.numel()),
                         feature_layers=drafter.config.target_layer_ids, logits_rows=slice(None) if logits else None)
    return out.features.clone(), (out.logits.clone() if logits else None)


class OnlineFeatures:
    """Target features computed when asked: one target pass per sequence (no cache on disk)."""

    def __init__(self, target: Target, layers: tuple[int, ...]):
        self.target, self.layers = target, tuple(layers)

    def __call__(self, seq: Sequence, length: int) -> tuple[Tensor, Tensor]:
        """(features [length, k*H], final [length, H]), float32 on the CPU."""
        tokens = torch.tensor(seq.tokens[:length], device=self.target.device)
        features, final = sequence_features(self.target, tokens, self.layers)
        return features.float().cpu().clone(), final.float().cpu().clone()


class CachedFeatures:
    """Target features read from a feature cache (see `treeflash.train.features`)."""

    def __init__(self, cache, layers: tuple[int, ...]):
        self.cache, self.layers = cache, tuple(layers)

    def __call__(self, seq, length: int) -> tuple[Tensor, Tensor]:
        return self.cache.features(seq, self.layers, length), self.cache.final(seq, length)


def make_example(seq: Sequence, source, config: "TrainConfig", drafter: Drafter,
                 generator: torch.Generator) -> Example | None:
    """Sample a sequence's anchors and build its blocks (None if no anchor fits)."""
    tokens = torch.tensor(seq.tokens[: config.max_length])
    anchors = sample_anchors(seq.prompt_length, tokens.numel(), config.anchors, generator)
    if anchors.numel() == 0:
        return None
    features, final = source(seq, tokens.numel())
    blocks = make_blocks(tokens, anchors, drafter.block_size, drafter.config.mask_token_id)
    return Example(tokens, features, final, anchors, blocks)


@torch.no_grad()
def feature_scale(drafter: Drafter, target: Target, sequences: list[Sequence], count: int = 16,
                  max_length: int = 1024, source=None) -> Tensor:
    """Per-input scale of the drafter's `fc` [k*H]: the power of two nearest 1 / RMS of each target feature
    over the first `count` sequences (first tokens skipped: they are attention sinks).

    Target hidden states carry a few massive dimensions (SmolLM2: 4 of 576 hold ~55% of the energy, and the
    deepest layer is 10x the shallowest), so a randomly initialised `fc` mostly passes those through and every
    context position looks alike. Training `fc` behind this fixed scale balances the inputs, and Adam's steps
    are then the same size relative to every input. Powers of two make folding it into the weights exact.
    """
    source = source or OnlineFeatures(target, drafter.config.target_layer_ids)
    total, n = None, 0
    for seq in sequences[:count]:
        features, _ = source(seq, min(max_length, len(seq.tokens)))
        x = features[1:].double()
        total = x.pow(2).sum(0) if total is None else total + x.pow(2).sum(0)
        n += x.shape[0]
    if not n:
        raise TreeFlashError("no sequences to measure the target's feature scale on")
    rms = (total / n).sqrt().clamp(min=1e-6)
    return torch.exp2(torch.round(-torch.log2(rms))).float()


def scale_features(drafter: Drafter, scale: Tensor | None, keep_weights: bool = False) -> None:
    """Put `fc` behind `scale` (or take it back out with None) without changing what the drafter computes.

    keep_weights: a freshly initialised `fc` keeps its weights as the trained parameters instead (the
    function changes: `fc` now sees balanced inputs)."""
    with torch.no_grad():
        if drafter.feature_scale is not None:
            drafter.fc.weight.mul_(drafter.feature_scale.to(drafter.fc.weight)[None, :])
        drafter.feature_scale = None
        if scale is not None:
            scale = scale.to(drafter.fc.weight.device)
            if not keep_weights:
                drafter.fc.weight.div_(scale.to(drafter.fc.weight)[None, :])
            drafter.feature_scale = scale
