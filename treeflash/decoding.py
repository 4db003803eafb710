"""The decode loop: draft -> build tree -> verify -> follow -> commit, for every method.

Methods:
  ar         plain autoregressive decoding: the tree is the root alone, so each round commits one token.
  dflash     a chain: the argmax of each of the drafter's b-1 marginals.
  ddtree     the best-first tree of the `budget` most probable prefixes under the product of marginals.
  treeflash  the best-first tree over the AR-approximation head's conditionals (two stages, O(1) passes).

Round invariant: the target's cache holds every committed token but the last one (the root, the bonus of the
previous round, which the target has not run on yet); the drafter's cache holds the context features of the
same positions. Statistics (see `DecodeResult`): a round is one target verification pass after the prefill;
tau = mean over rounds of (accepted drafted tokens + 1 bonus), so `ar` has tau = 1.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time
from typing import Callable, Sequence

import torch
from torch import Tensor

from .drafters import BlockDraft, Drafter, check_compatible
from .errors import TreeFlashError
from .targets import Target
from .trees import (
    DraftTree,
    candidate_rows,
    chain_tree,
    check_budget,
    conditional_tree,
    lazy_conditional_tree,
    marginal_tree,
    top_k_logprobs,
    tree_attention_mask,
)
from .verification import SamplingConfig, choose_tokens, follow

METHODS = ("ar", "dflash", "ddtree", "treeflash")
# Draft nodes per round when neither the caller nor a tuning (`treeflash tune`) says: a GPU verifies a
# 65-node tree for about the price of one token, a CPU pays for each node (measured in results/speed/).
DEFAULT_BUDGET = 64
DEFAULT_CPU_BUDGET = 4  # the fastest budget for the shipped drafter here (results/speed/bench_drafter_v2_cpu_noamx)
STAGES = ("prefill", "draft", "head", "tree", "verify", "commit")


@dataclasses.dataclass
class DecodeConfig:
    """How to decode. CLI flags map one-to-one onto these fields."""

    method: str = "treeflash"  # one of METHODS
    budget: int | None = None  # draft nodes per round, root excluded; None = tuned, else see resolve_budget
    max_new_tokens: int = 256  # stop after this many new tokens
    temperature: float = 0.0  # 0 = greedy; > 0 samples (losslessly) from the target
    top_p: float = 1.0  # nucleus filtering of the target's distribution at temperature > 0
    top_k: int = 0  # top-k filtering of the target's distribution at temperature > 0 (0 = off)
    seed: int | None = None  # seeds sampling; None = drawn at random and reported in the result
    draft_top_k: int = 16  # TreeFlash: children kept per conditional row
    candidate_tokens: int | None = None  # TreeFlash: candidate parents per position (m); None = tuned, else drafter's
    stop_at_eos: bool = True  # stop at the target's end-of-sequence tokens

    def __post_init__(self):
        if self.method not in METHODS:
            raise TreeFlashError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.budget is not None:
            check_budget(self.budget)
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise TreeFlashError(f"max_new_tokens must be a whole number >= 1; got {self.max_new_tokens!r}")
        if self.draft_top_k < 1:
            raise TreeFlashError(f"draft_top_k must be >= 1; got {self.draft_top_k}")
        if self.candidate_tokens is not None and self.candidate_tokens < 1:
            raise TreeFlashError(f"candidate_tokens must be >= 1; got {self.candidate_tokens}")
        self.sampling  # validates temperature, top_p, top_k

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed)


@dataclasses.dataclass
class DecodeResult:
    """What one generation produced, and how."""

    method: str
    prompt_ids: list[int]
    token_ids: list[int]  # the new tokens only
    rounds: int  # target verification passes after the prefill
    acceptance_lengths: list[int]  # accepted drafted tokens per round (the bonus not counted)
    stage_seconds: dict[str, float]  # wall time per stage, summed over rounds (see STAGES)
    seconds: float  # wall time of the whole generation, prefill included
    stop_reason: str  # "eos", "max_new_tokens", "context" or "stopped" (by the on_tokens callback)
    budget: int  # draft nodes per round (0 for ar)
    seed: int | None  # the sampling seed actually used (None when greedy)
    text: str | None = None

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tau(self) -> float:
        """Mean tokens committed per round, the bonus token included (ar: 1); see `tau`."""
        return tau(self.acceptance_lengths)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "text": self.text,
            "token_ids": self.token_ids,
            "new_tokens": self.new_tokens,
            "prompt_tokens": len(self.prompt_ids),
            "rounds": self.rounds,
            "tau": self.tau,
            "acceptance_lengths": self.acceptance_lengths,
            "seconds": self.seconds,
            "tokens_per_second": self.tokens_per_second,
            "stage_seconds": self.stage_seconds,
            "stop_reason": self.stop_reason,
            "budget": self.budget,
            "seed": self.seed,
        }


def tau(acceptance_lengths: Sequence[int]) -> float:
    """Mean tokens committed per round, the bonus token counted: 1 + mean(acceptance lengths).

    Plain autoregressive decoding has tau = 1. NaN when there were no rounds (the prefill's token was the
    last one). Pooling several runs = calling this on their concatenated acceptance lengths."""
    return 1.0 + sum(acceptance_lengths) / len(acceptance_lengths) if acceptance_lengths else math.nan


def resolve_budget(method: str, budget: int | None, drafter: Drafter | None, tuning=None,
                   device: torch.device | str = "cpu") -> int:
    """Draft nodes per round: 0 for ar; the given budget; else b-1 for dflash (its whole chain); else for the
    trees the tuned budget (`tuning`, a `treeflash.tuning.Tuning`), else DEFAULT_CPU_BUDGET on a CPU and
    DEFAULT_BUDGET elsewhere."""
    if method == "ar":
        return 0
    if budget is not None:
        return budget
    if method == "dflash":
        return drafter.block_size - 1
    if tuning is not None and tuning.budget(method) is not None:
        return tuning.budget(method)
    return DEFAULT_CPU_BUDGET if torch.device(device).type == "cpu" else DEFAULT_BUDGET


def root_only_tree(root: int) -> DraftTree:
    return DraftTree(
        tokens=torch.tensor([root]),
        parents=torch.tensor([-1]),
        depths=torch.tensor([0]),
        scores=torch.zeros(1),
    )


class _Clock:
    """Adds wall time to named stages."""

    def __init__(self, device: torch.device):
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self._sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        self._sync()
        now = time.perf_counter()
        self.seconds[stage] += now - self._last
        self._last = now


class Decoder:
    """A target and (optionally) a drafter, ready to generate with any method.

    tuning: a `treeflash.tuning.Tuning` for this setup (see `treeflash tune`): its budget and candidate count
    are used when a DecodeConfig leaves them unset.
    """

    def __init__(self, target: Target, drafter: Drafter | None = None, tuning=None):
        if drafter is not None:
            check_compatible(drafter, target)
        self.target = target
        self.drafter = drafter
        self.tuning = tuning

    # -- the stages ---------------------------------------------------------------------------------

    def _draft_tree(self, method: str, root: int, features: Tensor, dcache, budget: int, config: DecodeConfig, clock):
        if method == "ar":
            return root_only_tree(root)
        block = self.drafter.draft(self.target, root, features, dcache)
        clock.lap("draft")
        m = config.candidate_tokens
        if m is None and self.tuning is not None:
            m = self.tuning.candidate_tokens(method)
        return build_tree(self.drafter, self.target, method, root, block, budget, config.draft_top_k, m,
                          lap=clock.lap)

    # -- the loop -----------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self,
        prompt_ids: list[int],
        config: DecodeConfig | None = None,
        on_tokens: Callable[[list[int]], None] | None = None,
    ) -> DecodeResult:
        """Generate from token ids. `on_tokens` is called with each round's committed tokens; if it returns
        True, generation stops there (stop reason "stopped"), e.g. when a client went away."""
        config = config or DecodeConfig()
        target, drafter, method = self.target, self.drafter, config.method
        if method != "ar" and drafter is None:
            raise TreeFlashError(f"method {method!r} needs a drafter; pass one, or use method 'ar'")
        if method == "treeflash" and drafter.ar_approximation is None:
            raise TreeFlashError("method 'treeflash' needs a drafter with a TreeFlash head; use 'ddtree' with this one")
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise TreeFlashError("the prompt is empty; pass at least one token")
        if len(prompt_ids) >= target.max_length:
            raise TreeFlashError(
                f"the prompt has {len(prompt_ids)} tokens but the target's context holds {target.max_length}; "
                "shorten the prompt"
            )
        vocab = target.embed_tokens.weight.shape[0]
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise TreeFlashError(f"the prompt has token ids outside the target's vocabulary [0, {vocab})")

        budget = resolve_budget(method, config.budget, drafter, self.tuning, target.device)
        if method != "ar":
            target.pack()  # trees are verified in passes of several tokens
        sampling = config.sampling
        if not sampling.greedy and sampling.seed is None:
            sampling = dataclasses.replace(sampling, seed=secrets.randbits(63))
        eos = set(target.eos_token_ids) if config.stop_at_eos else set()
        feature_layers = drafter.config.target_layer_ids if method != "ar" else ()

        n = len(prompt_ids)
        # Slots, not positions: a whole tree is written after the committed tokens even near the context limit.
        cache = target.new_cache(min(target.max_length, n + config.max_new_tokens) + budget + 1)
        # The drafter caches committed context and writes its whole block after it.
        dcache = drafter.new_cache(n + config.max_new_tokens + drafter.block_size) if method != "ar" else None
        device = target.device

        clock = _Clock(device)
        start = time.perf_counter()
        out = target.forward(
            torch.tensor(prompt_ids, device=device), torch.arange(n, device=device), cache,
            feature_layers=feature_layers, logits_rows=slice(n - 1, n),
        )
        cache.advance(n)
        first = int(choose_tokens(out.logits, torch.tensor([n]), sampling)[0])
        features = out.features  # [n, k*H]: context the drafter has not seen yet
        committed = [first]
        clock.lap("prefill")

        acceptance, stop = [], None
        if on_tokens and on_tokens([first]):
            stop = "stopped"
        elif first in eos:
            stop = "eos"
        elif config.max_new_tokens <= 1:
            stop = "max_new_tokens"
        while stop is None:
            root_position = cache.length  # the root is the last committed token
            if root_position + 1 >= target.max_length:
                stop = "context"
                break
            tree = self._draft_tree(method, committed[-1], features, dcache, budget, config, clock)
            # A node at depth d predicts the token at root_position + d + 1, which must fit in the context.
            room = target.max_length - 2 - root_position
            if int(tree.depths.max()) > room:
                tree = _prune_depth(tree, room)
            positions = (root_position + tree.depths).to(device)
            mask = None
            if tree.size > 0:
                mask = torch.ones(tree.size + 1, root_position + tree.size + 1, dtype=torch.bool, device=device)
                mask[:, root_position:] = tree_attention_mask(tree).to(device)
            clock.lap("tree")

            out = target.forward(
                tree.tokens.to(device), positions, cache, mask=mask, feature_layers=feature_layers,
            )
            chosen = choose_tokens(out.logits, positions + 1, sampling).cpu()
            clock.lap("verify")

            accepted = follow(tree, chosen)
            keep = torch.tensor(accepted.path, device=device)
            cache.compact(keep)
            if feature_layers:
                features = out.features[keep]
            new = accepted.committed
            acceptance.append(len(accepted.tokens))
            room_left = config.max_new_tokens - len(committed)
            for i, token in enumerate(new):
                if token in eos:
                    new, stop = new[: i + 1], "eos"
                    break
            if len(new) >= room_left:
                new, stop = new[:room_left], stop or "max_new_tokens"
            committed.extend(new)
            clock.lap("commit")
            if on_tokens and on_tokens(new):
                stop = stop or "stopped"

        seconds = time.perf_counter() - start
        text = target.tokenizer.decode(committed, skip_special_tokens=True) if target.tokenizer is not None else None
        return DecodeResult(
            method=method,
            prompt_ids=prompt_ids,
            token_ids=committed,
            rounds=len(acceptance),
            acceptance_lengths=acceptance,
            stage_seconds={k: v for k, v in clock.seconds.items() if v > 0 or k != "head"},
            seconds=seconds,
            stop_reason=stop,
            budget=budget,
            seed=None if sampling.greedy else sampling.seed,
            text=text,
        )


def build_tree(drafter: Drafter, target: Target, method: str, root: int, block: BlockDraft, budget: int,
               draft_top_k: int = 16, candidate_tokens: int | None = None,
               lap: Callable[[str], None] = lambda stage: None, lazy_rows: bool | None = None) -> DraftTree:
    """The tree `method` (dflash, ddtree or treeflash) drafts after `root` from one drafted block.

    TreeFlash's second stage (the head's conditionals) runs here; `lap("head")` marks its end for timing.
    lazy_rows: evaluate only the head rows the best-first search reaches, in a few batches
    (`lazy_conditional_tree`: at most B + 1 rows instead of 1 + (D-1)*m, the same tree); the head stage then
    includes the search between those batches. None = on a CPU, where the head's cost grows with its rows;
    a GPU evaluates all rows in one pass for about the price of one, and each batch would cost a sync.
    """
    # A tree of `budget` nodes is at most `budget` deep, so deeper positions can be left out: the tree is the
    # same, and TreeFlash's head evaluates 1 + (depth-1)*m rows instead of 1 + (b-2)*m.
    depth, vocab = min(block.logits.shape[0], budget), block.logits.shape[1]
    block = BlockDraft(hidden=block.hidden[:depth], logits=block.logits[:depth])
    if method == "dflash":
        tokens, logprobs = top_k_logprobs(block.logits, 1)  # [D, 1]: the argmax of each marginal
        return chain_tree(root, drafter.token_ids(tokens[:, 0]).cpu(), logprobs[:, 0].cpu(), budget)
    if method == "ddtree":
        tokens, logprobs = top_k_logprobs(block.logits, min(budget, vocab))
        return marginal_tree(root, drafter.token_ids(tokens).cpu(), logprobs.cpu(), budget)
    if method != "treeflash":
        raise TreeFlashError(f"no draft tree for method {method!r}; choose dflash, ddtree or treeflash")
    # Candidate parents at depths 1..D-1 are the top-m tokens of those marginals.
    m = min(candidate_tokens or drafter.config.candidate_tokens, vocab)
    parents = drafter.token_ids(block.logits[: depth - 1].topk(m, dim=-1).indices)  # [D-1, m] target ids
    # Row 0: depth-1 children of the root; row 1 + (d-1)*m + j: children at depth d+1 of parents[d-1, j].
    row_parents = torch.cat((torch.tensor([root], device=parents.device), parents.flatten()))  # [R]
    k = min(draft_top_k, vocab)

    def evaluate(rows: Tensor) -> tuple[Tensor, Tensor]:  # row ids [R'] -> top-k tokens, log-probs [R', k]
        rows = rows.to(block.hidden.device)
        position = torch.where(rows == 0, 0, (rows - 1) // m + 1)  # the block position of each row
        logits = drafter.conditional_logits(target, block.hidden[position], row_parents[rows])
        tokens, logprobs = top_k_logprobs(logits, k)
        return drafter.token_ids(tokens).cpu(), logprobs.cpu()

    if lazy_rows is None:
        lazy_rows = block.hidden.device.type == "cpu"
    if lazy_rows:
        tree, _ = lazy_conditional_tree(root, parents.cpu(), evaluate, budget,
                                        prefetch=_likely_rows(drafter, root, block, parents.cpu(), budget))
    else:
        tree = conditional_tree(root, parents.cpu(), *evaluate(torch.arange(row_parents.shape[0])), budget)
    lap("head")
    return tree


def _prune_depth(tree: DraftTree, max_depth: int) -> DraftTree:
    """Drop nodes deeper than `max_depth` (near the context limit). Parents precede children and are never
    deeper, so the kept nodes stay prefix-closed; parent indices are renumbered."""
    keep = (tree.depths <= max_depth).nonzero().flatten()
    new_index = torch.full_like(tree.parents, -1)
    new_index[keep] = torch.arange(keep.numel())
    parents = tree.parents[keep].clone()
    parents[1:] = new_index[parents[1:]]
    return DraftTree(tokens=tree.tokens[keep], parents=parents, depths=tree.depths[keep], scores=tree.scores[keep])


def _likely_rows(drafter: Drafter, root: int, block: BlockDraft, parents: Tensor, budget: int) -> Tensor:
    """A guess at the head rows TreeFlash's search will reach: those of the nodes of DDTree's marginal tree of
    4x the budget that are candidate parents (`candidate_rows`; parents [D-1, m] int64, CPU). The conditional
    tree mostly grows where the marginal one does. The guess is generous because on a CPU a head pass costs
    3.5-4.3 ms whatever its few rows (weights and per-op overhead), so one pass fewer is worth a dozen extra rows:
    rounds need 1.1-2.0 passes at budgets 4-16 (results/speed/head_rows_cpu_noamx.md)."""
    guess_budget = 4 * budget
    tokens, logprobs = top_k_logprobs(block.logits, min(guess_budget, block.logits.shape[1]))
    guess = marginal_tree(root, drafter.token_ids(tokens).cpu(), logprobs.cpu(), guess_budget)
    rows = candidate_rows(guess.depths, guess.tokens, parents)
    return rows[rows >= 0]
