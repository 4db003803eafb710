"""Verification: the target's token at every tree entry, and the walk that accepts a path.

Glossary (fixed here, used everywhere):
  accepted tokens   drafted tokens the target agrees with, along one root-to-node path of the tree.
  bonus token       the target's own token after the last accepted node (or after the root when nothing is
                    accepted). It is always committed, and becomes the next round's root.
  committed tokens  accepted tokens + the bonus token: what a round adds to the output.
  acceptance length the number of accepted tokens in a round (the bonus not counted).
  tau               mean committed tokens per round = mean acceptance length + 1 (the bonus counts).

Losslessness. At every tree entry the target chooses one token, exactly as plain decoding would choose the
token after that entry's path; the walk then follows the child holding that choice ("sample-and-follow").
Under greedy decoding the choice is the argmax. Under sampling the choice is "coupled": Gumbel-max with noise
that depends only on (seed, absolute position), so the token at each position is a deterministic function
of the seed and the target's distribution there. Every method, speculative or not, therefore produces the
same text for the same seed, and each token is an exact sample from the (filtered) target distribution.
(The target's logits for a tree entry match step-by-step decoding up to float rounding of tree attention;
a genuine near-tie can still flip a token, as under greedy decoding.)
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import TreeFlashError
from .trees import DraftTree

__all__ = ["Acceptance", "SamplingConfig", "choose_tokens", "follow"]

_SEED_MULTIPLIER = 1_000_003
_SEED_MASK = (1 << 63) - 1
GREEDY_BELOW = 1e-5  # temperatures below this are greedy
_NUCLEUS_PROBE = 1024  # tokens looked at before top-p falls back to sorting the whole vocabulary


@dataclass(frozen=True)
class SamplingConfig:
    """How the target chooses tokens."""

    temperature: float = 0.0  # 0 = greedy (argmax); > 0 divides the logits before sampling
    top_p: float = 1.0  # nucleus filtering, applied after temperature and top-k; 1 = off
    top_k: int = 0  # keep only the k most likely tokens at temperature > 0; 0 = off
    # Seeds the per-position noise at temperature > 0; None -> the caller picks one at random and records it.
    seed: int | None = None

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t < 0:
            raise TreeFlashError(f"temperature must be a finite number >= 0 (0 = greedy); got {t!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p <= 1:
            raise TreeFlashError(f"top_p must be a number in (0, 1] (1 = off); got {p!r}")
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
            raise TreeFlashError(f"top_k must be a whole number >= 0 (0 = off); got {k!r}")
        s = self.seed
        if s is not None and (isinstance(s, bool) or not isinstance(s, numbers.Integral)):
            raise TreeFlashError(f"seed must be a whole number or None; got {s!r}")

    @property
    def greedy(self) -> bool:
        """True when the target takes its argmax: temperature 0, or below 1e-5, where logits / T would
        overflow float32 (and the distribution is one-hot anyway). Top-k and top-p then change nothing."""
        return self.temperature < GREEDY_BELOW


def _position_seed(seed: int, position: int) -> int:
    return (seed * _SEED_MULTIPLIER + position) & _SEED_MASK


def _gumbel(seed: int, positions: list[int], vocab: int, device: torch.device) -> Tensor:
    """Standard Gumbel noise [P, V] float32; row i is a pure function of (seed, positions[i]) on a device type.

    Noise is filled in place into one buffer: per-position temporaries of vocabulary size cost more than the
    arithmetic on hosts where fresh allocations page-fault.
    """
    noise = torch.empty(len(positions), vocab, device=device, dtype=torch.float32)
    generator = torch.Generator(device=device)
    for row, position in zip(noise, positions):
        generator.manual_seed(_position_seed(seed, position))
        row.uniform_(generator=generator)
    # u == 0 would give noise -inf (a token made impossible) and u == 1 noise +inf (a token made certain);
    # generators differ in which end of [0, 1] they can hit, so clamp both to the nearest float32 inside.
    eps = torch.finfo(torch.float32)
    return noise.clamp_(min=eps.tiny, max=1.0 - eps.eps / 2).log_().neg_().log_().neg_()


def _filter(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Set the logits of tokens outside the top-k, then outside the nucleus, to -inf.

    logits: [n, V] float32, already divided by the temperature.
    """
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # [n, 1]
        # Ties with the k-th value are kept (as in HF transformers) rather than broken arbitrarily.
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p >= 1:
        return logits
    log_total = logits.logsumexp(dim=-1, keepdim=True)  # [n, 1] normaliser after top-k
    # The nucleus is nearly always within the first few hundred tokens; a full sort of the vocabulary costs
    # far more than the forward pass on CPU, so look at the top _NUCLEUS_PROBE first and sort only if needed.
    values, order = logits.topk(min(_NUCLEUS_PROBE, vocab), dim=-1)  # [n, P], best first
    probs = (values - log_total).exp()
    if bool((probs.sum(dim=-1) < top_p).any()):
        values, order = logits.sort(dim=-1, descending=True)  # [n, V]
        probs = (values - log_total).exp()
    # Keep a token while the mass strictly before it is below top_p: the smallest set reaching top_p, and
    # always the most likely token. Tokens outside `order` are dropped, as the probe's mass reached top_p.
    drop = probs.cumsum(dim=-1) - probs >= top_p
    drop[:, 0] = False
    return torch.full_like(logits, -math.inf).scatter_(-1, order, values.masked_fill(drop, -math.inf))


def choose_tokens(logits: Tensor, positions: Tensor, sampling: SamplingConfig) -> Tensor:
    """The target's token at every row: argmax when greedy, else a coupled Gumbel-max sample.

    logits:    [n, V] any float dtype, any device. Row i is the target's distribution for the token at
               absolute position positions[i].
    positions: [n] int64, any device. The absolute position of the token being chosen at each row.
    Returns [n] int64 on the logits' device.

    Sampling draws standard Gumbel noise g [V] from a generator seeded by (seed, position), once per distinct
    position (rows with the same position share it), and returns argmax(filtered logits / T + g). The noise
    comes from a generator on the logits' device, so it is identical across methods and runs on one device
    type but differs between CPU and CUDA.
    """
    if sampling.greedy:
        return logits.argmax(dim=-1)
    if sampling.seed is None:
        raise TreeFlashError(
            "sampling at temperature > 0 needs a seed; pick one (e.g. secrets.randbits(63)) and record it"
        )
    scaled = _filter(logits.float() / sampling.temperature, sampling.top_k, sampling.top_p)  # [n, V]
    where = positions.tolist()
    assert len(where) == logits.shape[0], "one position per row of logits"
    distinct = list(dict.fromkeys(where))
    noise = _gumbel(sampling.seed, distinct, logits.shape[-1], logits.device)  # [P, V]
    if len(distinct) < len(where):
        slot = {p: i for i, p in enumerate(distinct)}
        noise = noise[torch.tensor([slot[p] for p in where], device=logits.device)]  # [n, V]
    return (scaled + noise).argmax(dim=-1)


@dataclass(frozen=True)
class Acceptance:
    """The outcome of one round's walk through the tree."""

    path: list[int]  # tree indices from the root (path[0] == 0) to the last accepted node
    tokens: list[int]  # the accepted drafted tokens, len(path) - 1
    bonus: int  # the target's token after the last accepted node

    @property
    def committed(self) -> list[int]:
        """Accepted tokens + the bonus: what this round adds to the output."""
        return self.tokens + [self.bonus]


def follow(tree: DraftTree, target_tokens: Tensor) -> Acceptance:
    """Walk from the root along the children the target chose; the target's token where the walk stops is
    the bonus.

    target_tokens: [n] int64, CPU. target_tokens[i] is the target's choice for the token after entry i.
    Exactly lossless for trees whose children are deterministic (top-k), whatever the drafter: the walk only
    ever commits tokens the target itself chose.
    """
    chosen = target_tokens.tolist()
    children = tree.children
    path = [0]
    while (child := children[path[-1]].get(chosen[path[-1]])) is not None:
        path.append(child)
    tokens = [chosen[i] for i in path[:-1]]
    return Acceptance(path=path, tokens=tokens, bonus=chosen[path[-1]])
