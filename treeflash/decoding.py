"""The decode loop: draft -> build tree -> verify -> follow -> commit, for every method.

Methods:
  ar         plain autoregressive decoding: the tree is the root alone, so each round commits one token.
  dflash     a chain: the argmax of each of the drafter's b-1 marginals.
  ddtree     the best-first tree of the `budget` most probable prefixes under the product of marginals.
  treeflash  the best-first tree over the AR-approximation head's conditionals (two stages, O(1) passes).

N-gram lookup (`DecodeConfig.lookup`, any method): the tokens that followed the latest earlier occurrence of the
context's last few tokens are grafted onto the round's tree as one more path (`treeflash.ngrams`), verified
with the rest.

Round invariant: the target's cache holds every committed token but the last one (the root, the bonus of the
previous round, which the target has not run on yet); the drafter's cache holds the context features of the
same positions. Statistics (see `DecodeResult`): a round is one target verification pass after the prefill;
tau = mean over rounds of (accepted drafted tokens + 1 bonus), so `ar` has tau = 1.

`treeflash.reference` is the same loop on one screen, for one sequence, untimed and unbatched: read it first.

Batching: `Decoder.step` runs one round for any number of sequences (`Generation`s) at once, each stage
batched: one drafter pass over all blocks (`Drafter.draft_batch`), the TreeFlash head's rows of all tree
searches in one pass per wave (`build_trees`), one ragged target pass over all trees and new prompts
(`Target.forward_batch`), then follow and commit per sequence. `generate` is that step over one sequence, so
there is a single loop; `generate_batch` and the server (`treeflash.serve.scheduler`) run it over many, with
sequences joining and leaving between rounds. Each sequence's output is what it gets alone.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time
from typing import Callable, Generator, Sequence

import torch
from torch import Tensor

from .cache import KVCache
from .drafters import BlockDraft, Drafter, check_compatible
from .errors import TreeFlashError
from .ngrams import LOOKUP_MAX_NGRAM, NgramIndex
from .targets import Segment, Target, TargetOutput
from .trees import (
    DraftTree,
    candidate_rows,
    chain_tree,
    check_budget,
    conditional_tree,
    graft_chain,
    lazy_conditional_tree_steps,
    marginal_tree,
    top_k_logprobs,
    tree_attention_mask,
)
from .verification import SamplingConfig, choose_tokens, follow

METHODS = ("ar", "dflash", "ddtree", "treeflash")
# Draft nodes per round when neither the caller nor a tuning (`treeflash tune`) says: a GPU verifies a
# 65-node tree for about the price of one token, a CPU pays for each node (docs/experiments.md, "Budget on a CPU").
DEFAULT_BUDGET = 64
# 2 with n-gram lookup on: 2-4% faster than 4 for both trees, both lookups and both sets of the 8th drafter's
# bench (results/speed/bench_lookup_cpu_amd); the shipped drafter's bench has 2 and 4 within 1-5%
# (results/speed/bench_sixteenth_cpu_amd)
DEFAULT_CPU_BUDGET = 2
# N-gram lookup tokens grafted per round when the caller does not say (treeflash.ngrams); ar and dflash stay
# the plain baselines. 8: on a 2-core AMD EPYC treeflash@2 went 1.20x -> 1.68x ar with 8 and 1.67x with 16
# (results/speed/bench_lookup_cpu_amd); a GPU verifies the extra entries almost for free.
DEFAULT_LOOKUP: dict[str, int] = {"ddtree": 8, "treeflash": 8}
STAGES = ("prefill", "draft", "head", "tree", "verify", "commit")


@dataclasses.dataclass
class DecodeConfig:
    """How to decode. CLI flags map one-to-one onto these fields."""

    method: str = "treeflash"  # decoding method: ar, dflash, ddtree or treeflash
    # draft nodes per round, the root not counted, as in DDTree; None = the tuned budget, else resolve_budget's
    budget: int | None = None
    max_new_tokens: int = 256  # stop after this many new tokens
    temperature: float = 0.0  # 0 = greedy; > 0 samples (losslessly) from the target
    top_p: float = 1.0  # nucleus filtering of the target's distribution at temperature > 0
    top_k: int = 0  # top-k filtering of the target's distribution at temperature > 0 (0 = off)
    seed: int | None = None  # seeds sampling; None = drawn at random and reported in the result
    draft_top_k: int = 16  # TreeFlash: children kept per conditional row
    candidate_tokens: int | None = None  # TreeFlash: candidate parents per position (m); None = tuned, else drafter's
    stop_at_eos: bool = True  # stop at the target's end-of-sequence tokens
    # N-gram lookup: graft up to this many tokens copied from the context onto each round's tree (beyond the
    # budget; see treeflash.ngrams); 0 = off; None = the tuned length (`treeflash tune`), else DEFAULT_LOOKUP
    lookup: int | None = None
    lookup_ngram: int = 2  # the shortest context suffix a lookup matches (the longest tried first: 4)

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
        if self.lookup is not None and (isinstance(self.lookup, bool) or not isinstance(self.lookup, int)
                                        or self.lookup < 0):
            raise TreeFlashError(f"lookup must be a whole number >= 0 (0 = off); got {self.lookup!r}")
        if isinstance(self.lookup_ngram, bool) or self.lookup_ngram not in range(1, LOOKUP_MAX_NGRAM + 1):
            raise TreeFlashError(f"lookup_ngram must be a whole number from 1 to {LOOKUP_MAX_NGRAM}; "
                                 f"got {self.lookup_ngram!r}")
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
    lookup: int = 0  # n-gram lookup tokens grafted per round at most (0 = off)

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tau(self) -> float:
        """Mean tokens committed per round, the bonus token included (ar: 1); see `tau`."""
        return tau(self.acceptance_lengths)

    @property
    def tokens_per_second(self) -> float:
        return tokens_per_second(self.new_tokens, self.seconds)

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
            "lookup": self.lookup,
            "seed": self.seed,
        }


def tau(acceptance_lengths: Sequence[int]) -> float:
    """Mean tokens committed per round, the bonus token counted: 1 + mean(acceptance lengths).

    Plain autoregressive decoding has tau = 1. NaN when there were no rounds (the prefill's token was the
    last one). Pooling several runs = calling this on their concatenated acceptance lengths."""
    return 1.0 + sum(acceptance_lengths) / len(acceptance_lengths) if acceptance_lengths else math.nan


def tokens_per_second(new_tokens: int, seconds: float) -> float:
    """Throughput of one or several generations: new tokens / wall seconds (prefill included)."""
    return new_tokens / seconds if seconds > 0 else math.nan


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


def resolve_lookup(method: str, lookup: int | None, tuning=None) -> int:
    """N-gram lookup tokens per round: the given number, else the tuned one (`tuning`, see `treeflash tune`),
    else the method's default (DEFAULT_LOOKUP)."""
    if lookup is not None:
        return lookup
    if tuning is not None and tuning.lookup(method) is not None:
        return tuning.lookup(method)
    return DEFAULT_LOOKUP.get(method, 0)


def root_only_tree(root: int) -> DraftTree:
    return DraftTree(
        tokens=torch.tensor([root]),
        parents=torch.tensor([-1]),
        depths=torch.tensor([0]),
        scores=torch.zeros(1),
    )


class _StageClock:
    """Times one step's phases, each as a stage of STAGES, and charges them to the generations they served.

    A phase's time runs to the end of its device work (a CUDA sync per phase), so the stages add up to the step.
    """

    def __init__(self, device: torch.device, live: list[Generation]):
        now = time.perf_counter()
        for g in live:
            g.started = now if g.started is None else g.started
        self.seconds: dict[str, float] = {}
        self._sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self._last = time.perf_counter()

    def run(self, stage: str, phase: Callable, *args):
        """phase(*args), its wall time added to `stage`."""
        result = phase(*args)
        self._sync()
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._last
        self._last = now
        return result

    def charge(self, rounds: list[Generation], prefills: list[Generation], live: list[Generation]) -> None:
        """Add the step's stages to `Generation.stage_seconds`: a round's own stages (the tree search is "head" for
        treeflash, "tree" otherwise); for a prefill, its target pass and what followed. Ends the finished ones."""
        end = time.perf_counter()
        for g in rounds:
            for stage in ("draft", "tree", "verify", "commit"):
                g.stage_seconds[stage] += self.seconds.get(stage, 0.0)
            g.stage_seconds["head" if g.method == "treeflash" else "tree"] += self.seconds.get("head", 0.0)
        for g in prefills:
            g.stage_seconds["prefill"] += sum(self.seconds.get(stage, 0.0) for stage in ("verify", "prefill", "commit"))
        for g in live:
            if g.done:
                g.seconds = end - g.started


@dataclasses.dataclass(eq=False)
class Generation:
    """One sequence in progress: its settings, caches and output so far. `Decoder.start` makes it,
    `Decoder.step` advances it by one round (alone or batched with others), `result()` reads it out.

    Between rounds the invariant of the module docstring holds: the target's cache holds every committed token
    but the last (the root), and `features` holds the target features of the positions the drafter has not
    seen yet."""

    prompt_ids: list[int]
    config: DecodeConfig
    budget: int  # draft nodes per round (0 for ar)
    sampling: SamplingConfig  # seed drawn when sampling without one
    eos: frozenset[int]  # tokens that end the generation
    cache: KVCache  # the target's
    dcache: KVCache | None  # the drafter's (None for ar)
    feature_layers: tuple[int, ...]  # target layers the drafter reads, or those ar's on_features asks for, or ()
    on_tokens: Callable[[list[int]], bool | None] | None = None
    # Called each round with `features` [c, k*H], the target features of the positions it committed to the target's
    # cache (the prompt's after the prefill), e.g. to cache them for training (`treeflash.train.capture`).
    on_features: Callable[[Tensor], None] | None = None
    ngrams: NgramIndex | None = None  # prompt + committed tokens, indexed for n-gram lookup (None: lookup off)
    lookup: int = 0  # tokens an n-gram lookup grafts per round at most
    committed: list[int] = dataclasses.field(default_factory=list)  # new tokens so far
    acceptance: list[int] = dataclasses.field(default_factory=list)  # accepted drafted tokens per round
    features: Tensor | None = None  # [c, k*H]: context features the drafter has not seen yet
    stop: str | None = None  # why it ended (see DecodeResult.stop_reason); None while in progress
    error: BaseException | None = None  # what `on_tokens` raised, if it did (stop reason "error")
    stage_seconds: dict[str, float] = dataclasses.field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    started: float | None = None  # perf_counter() when its prefill began
    seconds: float = 0.0  # wall time from its prefill to its end

    @property
    def done(self) -> bool:
        return self.stop is not None

    @property
    def method(self) -> str:
        return self.config.method

    def result(self, tokenizer=None) -> DecodeResult:
        text = tokenizer.decode(self.committed, skip_special_tokens=True) if tokenizer is not None else None
        return DecodeResult(
            method=self.method,
            prompt_ids=self.prompt_ids,
            token_ids=self.committed,
            rounds=len(self.acceptance),
            acceptance_lengths=self.acceptance,
            stage_seconds={k: v for k, v in self.stage_seconds.items() if v > 0 or k != "head"},
            seconds=self.seconds,
            stop_reason=self.stop,
            budget=self.budget,
            seed=None if self.sampling.greedy else self.sampling.seed,
            text=text,
            lookup=self.lookup,
        )

    def commit(self, new: list[int]) -> None:
        """Add a round's committed tokens, cut at an end-of-sequence token or at max_new_tokens, and hand
        them to `on_tokens`; sets `stop` when the generation is over."""
        room = self.config.max_new_tokens - len(self.committed)
        stop = None
        for i, token in enumerate(new):
            if token in self.eos:
                new, stop = new[: i + 1], "eos"
                break
        if len(new) >= room:
            new, stop = new[:room], stop or "max_new_tokens"
        self.committed.extend(new)
        if self.ngrams is not None:
            self.ngrams.extend(new)
        if self.on_tokens is not None:
            try:
                if self.on_tokens(new):
                    stop = stop or "stopped"
            except Exception as e:  # kept for the caller: one generation's callback must not end a batch
                self.error, stop = e, "error"
        self.stop = stop


class Decoder:
    """A target and (optionally) a drafter, ready to generate with any method.

    tuning: a `treeflash.tuning.Tuning` for this setup (see `treeflash tune`): its budget, candidate count
    and lookup length are used when a DecodeConfig leaves them unset.

    `generate` runs one sequence; `generate_batch` runs many, batched. Both are loops over `step`, which
    advances any set of `Generation`s by one round together (continuous batching: a server starts new ones and
    drops finished ones between steps).
    """

    def __init__(self, target: Target, drafter: Drafter | None = None, tuning=None):
        if drafter is not None:
            check_compatible(drafter, target)
        self.target = target
        self.drafter = drafter
        self.tuning = tuning

    @torch.inference_mode()
    def generate(
        self,
        prompt_ids: list[int],
        config: DecodeConfig | None = None,
        on_tokens: Callable[[list[int]], bool | None] | None = None,
    ) -> DecodeResult:
        """Generate from token ids. `on_tokens` is called with each round's committed tokens; if it returns
        True, generation stops there (stop reason "stopped"), e.g. when a client went away; if it raises, the
        generation stops and the exception propagates."""
        generation = self.start(prompt_ids, config, on_tokens)
        while not generation.done:
            self.step([generation])
        if generation.error is not None:
            raise generation.error
        return generation.result(self.target.tokenizer)

    @torch.inference_mode()
    def generate_batch(
        self,
        prompts: Sequence[list[int]],
        config: DecodeConfig | Sequence[DecodeConfig] | None = None,
        max_batch: int = 8,
    ) -> list[DecodeResult]:
        """Generate from several prompts (token ids), at most `max_batch` at once: their rounds share the
        drafter's and the target's passes, and a prompt starts as soon as another finishes. `config` is one
        DecodeConfig for all, or one per prompt (methods, budgets and sampling may differ). Each result equals
        `generate` on that prompt alone (up to float rounding at genuine near-ties, as between methods)."""
        configs = list(config) if isinstance(config, (list, tuple)) else [config] * len(prompts)
        if len(configs) != len(prompts):
            raise TreeFlashError(f"got {len(configs)} configs for {len(prompts)} prompts; pass one, or one per prompt")
        _check_max_batch(max_batch)
        generations = [self.start(p, c) for p, c in zip(prompts, configs)]  # validates every prompt first
        self.run(generations, max_batch)
        return [g.result(self.target.tokenizer) for g in generations]

    @torch.inference_mode()
    def run(self, generations: list[Generation], max_batch: int = 8) -> None:
        """Step `generations` (from `start`) to their ends, at most `max_batch` at once: one starts as soon as
        another finishes."""
        _check_max_batch(max_batch)
        waiting, active = list(generations), []
        while waiting or active:
            while waiting and len(active) < max_batch:
                active.append(waiting.pop(0))
            self.step(active)
            active = [g for g in active if not g.done]

    def start(self, prompt_ids: list[int], config: DecodeConfig | None = None,
              on_tokens: Callable[[list[int]], bool | None] | None = None,
              on_features: Callable[[Tensor], None] | None = None,
              feature_layers: tuple[int, ...] | None = None) -> Generation:
        """A new generation, checked and with its caches reserved; its first `step` prefills it. See `Generation`
        for `on_tokens` and `on_features`; `feature_layers` (method ar only: the others' are the drafter's) are the
        target layers (0-based) whose outputs `on_features` receives."""
        config = config or DecodeConfig()
        target, drafter, method = self.target, self.drafter, config.method
        if feature_layers is not None and method != "ar":
            raise TreeFlashError(f"choosing the target's feature layers is for method 'ar'; method {method!r} reads "
                                 "the drafter's layers")
        if feature_layers is not None and (not feature_layers or min(feature_layers) < 0
                                           or max(feature_layers) >= target.num_layers):
            raise TreeFlashError(f"feature layers {list(feature_layers)} are not all layers of the target "
                                 f"(0..{target.num_layers - 1}); choose layers it has")
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
        lookup = resolve_lookup(method, config.lookup, self.tuning)
        target.pack()  # once; on a CPU, 1.08x for one sequence's ar and 1.3x for 8 batched (see Target.pack)
        sampling = config.sampling
        if not sampling.greedy and sampling.seed is None:
            sampling = dataclasses.replace(sampling, seed=secrets.randbits(63))
        n = len(prompt_ids)
        return Generation(
            prompt_ids=prompt_ids,
            config=config,
            budget=budget,
            sampling=sampling,
            eos=frozenset(target.eos_token_ids) if config.stop_at_eos else frozenset(),
            # Slots, not positions: a whole tree is written after the committed tokens even near the context limit.
            cache=target.new_cache(min(target.max_length, n + config.max_new_tokens) + budget + lookup + 1),
            # The drafter caches committed context and writes its whole block after it.
            dcache=drafter.new_cache(n + config.max_new_tokens + drafter.block_size) if method != "ar" else None,
            feature_layers=drafter.config.target_layer_ids if method != "ar" else tuple(feature_layers or ()),
            on_tokens=on_tokens,
            on_features=on_features,
            ngrams=NgramIndex(prompt_ids, config.lookup_ngram) if lookup else None,
            lookup=lookup,
        )

    # -- one round for several generations ----------------------------------------------------------

    @torch.inference_mode()
    def step(self, generations: list[Generation]) -> None:
        """One round for each unfinished generation: draft -> search trees -> verify -> accept -> commit, each phase
        batched over the generations (one drafter pass, the TreeFlash head's rows together, one target pass).
        Generations not yet started are prefilled in that same target pass instead. Each phase is timed as a
        stage of STAGES (`_StageClock`)."""
        live = [g for g in generations if not g.done]
        clock = _StageClock(self.target.device, live)
        rounds, prefills = self._schedule(live)
        drafting = [g for g in rounds if g.method != "ar"]
        blocks = clock.run("draft", self._draft, drafting) if drafting else {}  # nothing to time (or sync) for ar
        trees = clock.run("head", self._search_trees, rounds, blocks)
        trees, segments = clock.run("tree", self._verify_inputs, rounds, trees)
        outputs, committed = clock.run("verify", self._verify, rounds, trees, segments, prefills, live)
        committed += clock.run("prefill", self._accept_prefills, prefills, outputs[len(rounds):])
        clock.run("commit", self._commit, rounds + prefills, committed)
        clock.charge(rounds, prefills, live)

    def _schedule(self, live: list[Generation]) -> tuple[list[Generation], list[Generation]]:
        """The generations that run a round and those to prefill; one with no room left in the target's context
        for its root's successor stops ("context")."""
        rounds, prefills = [], []
        for g in live:
            if not g.committed:
                prefills.append(g)
            elif g.cache.length + 1 >= self.target.max_length:
                g.stop = "context"
            else:
                rounds.append(g)
        return rounds, prefills

    def _draft(self, drafting: list[Generation]) -> dict[Generation, BlockDraft]:
        """Each generation's block of marginals after its root: one drafter pass over all of them, which also
        takes in the context features each has not seen yet."""
        blocks = self.drafter.draft_batch(self.target, [g.committed[-1] for g in drafting],
                                          [g.features for g in drafting], [g.dcache for g in drafting])
        return dict(zip(drafting, blocks))

    def _search_trees(self, rounds: list[Generation], blocks: dict[Generation, BlockDraft]) -> list[DraftTree]:
        """Each round's draft tree after its root (the root alone for ar): the tree searches, whose TreeFlash head
        rows are evaluated together (`build_trees`)."""
        searches = []
        for g in rounds:
            if g.method == "ar":
                searches.append(root_only_tree(g.committed[-1]))
                continue
            m = g.config.candidate_tokens
            if m is None and self.tuning is not None:
                m = self.tuning.candidate_tokens(g.method)
            searches.append(tree_steps(self.drafter, g.method, g.committed[-1], blocks[g], g.budget,
                                       g.config.draft_top_k, m))
        return build_trees(self.drafter, self.target, searches)

    def _verify_inputs(self, rounds: list[Generation], trees: list[DraftTree]) -> tuple[list[DraftTree], list[Segment]]:
        """The trees to verify (n-gram lookups grafted on, cut to fit the context) and the target's input for each."""
        trees = [graft_chain(tree, g.ngrams.continuation(g.lookup)) if g.ngrams is not None else tree
                 for g, tree in zip(rounds, trees)]
        pairs = [self._verify_input(g, tree) for g, tree in zip(rounds, trees)]
        return [tree for tree, _ in pairs], [segment for _, segment in pairs]

    def _verify_input(self, g: Generation, tree: DraftTree) -> tuple[DraftTree, Segment]:
        """The tree to verify (cut to fit the context) and the target's input for it after g's committed
        context: the tree's tokens at root_position + depth, each attending to the context and its ancestors."""
        device, root_position = self.target.device, g.cache.length  # the root is the last committed token
        # A node at depth d predicts the token at root_position + d + 1, which must fit in the context.
        room = self.target.max_length - 2 - root_position
        if int(tree.depths.max()) > room:
            tree = _prune_depth(tree, room)
        positions = (root_position + tree.depths).to(device)
        mask = None
        if tree.size > 0:
            mask = torch.ones(tree.size + 1, root_position + tree.size + 1, dtype=torch.bool, device=device)
            mask[:, root_position:] = tree_attention_mask(tree, device)
        return tree, Segment(tree.tokens.to(device), positions, g.cache, mask, features=bool(g.feature_layers))

    def _verify(self, rounds: list[Generation], trees: list[DraftTree], segments: list[Segment],
                prefills: list[Generation], live: list[Generation]) -> tuple[list[TargetOutput], list[list[int]]]:
        """One target pass over the rounds' trees and the prompts to prefill; then, per round, the tokens it
        commits (`_accept`). Returns the pass's outputs (the prefills' last) and those tokens."""
        segments = segments + [self._prefill_input(g) for g in prefills]
        wanted = next((g.feature_layers for g in live if g.feature_layers), ())
        outputs = self.target.forward_batch(segments, feature_layers=wanted)
        return outputs, [self._accept(*args) for args in zip(rounds, trees, outputs, segments)]

    def _prefill_input(self, g: Generation) -> Segment:
        """The target's input for g's prompt: causal, logits for its last token only."""
        device, n = self.target.device, len(g.prompt_ids)
        return Segment(torch.tensor(g.prompt_ids, device=device), torch.arange(n, device=device), g.cache,
                       logits_rows=slice(n - 1, n), features=bool(g.feature_layers))

    def _accept(self, g: Generation, tree: DraftTree, out: TargetOutput, segment: Segment) -> list[int]:
        """Walk g's tree along the target's choices; keep the accepted path's keys/values and features, and
        return the tokens the round commits (accepted + bonus)."""
        chosen = choose_tokens(out.logits, segment.positions + 1, g.sampling).cpu()
        accepted = follow(tree, chosen)
        keep = torch.tensor(accepted.path, device=self.target.device)
        g.cache.compact(keep)
        if g.feature_layers:
            g.features = out.features[keep]
            if g.on_features is not None:
                g.on_features(g.features)
        g.acceptance.append(len(accepted.tokens))
        return accepted.committed

    def _accept_prefills(self, prefills: list[Generation], outputs: list[TargetOutput]) -> list[list[int]]:
        """Keep each prompt's keys/values and features; return its first token (the first round's root)."""
        committed = []
        for g, out in zip(prefills, outputs):
            n = len(g.prompt_ids)
            g.cache.advance(n)
            g.features = out.features  # [n, k*H]: context the drafter has not seen yet
            if g.feature_layers and g.on_features is not None:
                g.on_features(g.features)
            committed.append([int(choose_tokens(out.logits, torch.tensor([n]), g.sampling)[0])])
        return committed

    @staticmethod
    def _commit(generations: list[Generation], committed: list[list[int]]) -> None:
        for g, tokens in zip(generations, committed):
            g.commit(tokens)


def _check_max_batch(max_batch) -> int:
    """Raise `TreeFlashError` unless `max_batch` is a whole number of sequences >= 1; return it."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise TreeFlashError(f"max_batch must be a whole number >= 1; got {max_batch!r}")
    return max_batch


@dataclasses.dataclass
class HeadRows:
    """TreeFlash head rows a tree search asks for: the head's conditional logits at these rows."""

    hidden: Tensor  # [R, H] the drafter's state at each row's block position
    parents: Tensor  # [R] int64 target ids: the parent token each row conditions on


def tree_steps(drafter: Drafter, method: str, root: int, block: BlockDraft, budget: int, draft_top_k: int = 16,
               candidate_tokens: int | None = None, lazy_rows: bool | None = None
               ) -> Generator[HeadRows, Tensor, DraftTree]:
    """The tree `method` (dflash, ddtree or treeflash) drafts after `root` from one drafted block, as a
    generator: TreeFlash's search yields the `HeadRows` it needs and takes back their conditional logits
    [R, Vd] (`build_trees` answers the requests of several searches with one head pass); the other methods
    need no head and return at once.

    lazy_rows: evaluate only the head rows the best-first search reaches, in a few batches
    (`lazy_conditional_tree`: at most B + 1 rows instead of 1 + (D-1)*m, the same tree). None = on a CPU, where
    the head's cost grows with its rows; a GPU evaluates all rows in one pass for about the price of one, and
    each batch would cost a sync.
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

    def head_rows(rows: Tensor) -> HeadRows:  # row ids [R'] -> what the head needs for them
        rows = rows.to(block.hidden.device)
        position = torch.where(rows == 0, 0, (rows - 1) // m + 1)  # the block position of each row
        return HeadRows(hidden=block.hidden[position], parents=row_parents[rows])

    def top(logits: Tensor) -> tuple[Tensor, Tensor]:  # [R', Vd] -> top-k target ids, log-probs [R', k], CPU
        tokens, logprobs = top_k_logprobs(logits, k)
        return drafter.token_ids(tokens).cpu(), logprobs.cpu()

    if lazy_rows is None:
        lazy_rows = block.hidden.device.type == "cpu"
    if not lazy_rows:
        logits = yield head_rows(torch.arange(row_parents.shape[0]))
        return conditional_tree(root, parents.cpu(), *top(logits), budget)
    prefetch = _likely_rows(drafter, root, block, parents.cpu(), budget)
    search = lazy_conditional_tree_steps(root, parents.cpu(), budget, prefetch=prefetch)
    try:
        rows = next(search)
        while True:
            rows = search.send(top((yield head_rows(rows))))
    except StopIteration as stop:
        return stop.value[0]


def build_trees(drafter: Drafter | None, target: Target, searches: list[Generator | DraftTree]) -> list[DraftTree]:
    """Run several tree searches (`tree_steps`; a finished DraftTree passes through), answering the head rows
    they ask for together: every wave of requests is one `conditional_logits` pass over all their rows."""
    trees: list[DraftTree | None] = [s if isinstance(s, DraftTree) else None for s in searches]
    pending: dict[int, HeadRows] = {}

    def advance(i: int, answer: Tensor | None) -> None:
        try:
            pending[i] = searches[i].send(answer)
        except StopIteration as stop:
            trees[i] = stop.value

    for i, s in enumerate(searches):
        if not isinstance(s, DraftTree):
            advance(i, None)
    while pending:
        wave, pending = list(pending.items()), {}
        hidden = torch.cat([rows.hidden for _, rows in wave])
        parents = torch.cat([rows.parents for _, rows in wave])
        logits = drafter.conditional_logits(target, hidden, parents).split([rows.parents.shape[0] for _, rows in wave])
        for (i, _), answer in zip(wave, logits):
            advance(i, answer)
    return trees


def build_tree(drafter: Drafter, target: Target, method: str, root: int, block: BlockDraft, budget: int,
               draft_top_k: int = 16, candidate_tokens: int | None = None,
               lap: Callable[[str], None] = lambda stage: None, lazy_rows: bool | None = None) -> DraftTree:
    """The tree `method` drafts after `root` from one drafted block (see `tree_steps`, `build_trees`).
    TreeFlash's second stage (the head's conditionals) runs here; `lap("head")` marks its end for timing."""
    tree = build_trees(drafter, target, [tree_steps(drafter, method, root, block, budget, draft_top_k,
                                                    candidate_tokens, lazy_rows)])[0]
    if method == "treeflash":
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
    rounds need 1.1-2.0 passes at budgets 4-16 (measured with scripts/head_rows.py, in the history at f09108d)."""
    guess_budget = 4 * budget
    tokens, logprobs = top_k_logprobs(block.logits, min(guess_budget, block.logits.shape[1]))
    guess = marginal_tree(root, drafter.token_ids(tokens).cpu(), logprobs.cpu(), guess_budget)
    rows = candidate_rows(guess.depths, guess.tokens, parents)
    return rows[rows >= 0]
