"""`treeflash bench`: every method over a budget sweep, and transformers' own decoding, timed side by side.

Glossary of the numbers a benchmark reports. Each is defined once, by a function or property below, and
explained for users in docs/benchmarking.md.

  run                one generation: one prompt, one variant (a method at a budget, or a transformers
                     baseline). Its wall time includes the prefill, as `DecodeResult.seconds` does.
  variant            (method, budget, lookup). Methods: ar, dflash, ddtree, treeflash, and the baselines
                     hf-generate (`model.generate`, greedy or sampling) and hf-prompt-lookup (its
                     prompt-lookup decoding). Budget: draft nodes per round, the root not counted; 0 for ar
                     and hf-generate, b-1 for dflash's chain, the candidate tokens for hf-prompt-lookup.
                     Lookup: n-gram lookup tokens grafted per round (`DecodeConfig.lookup`; trees only).
  series             a method with one lookup setting, e.g. "treeflash" or "treeflash+lookup8": what a
                     budget sweep varies the budget of.
  tau                `tau`: mean tokens committed per round, the bonus token included.
  acceptance length  drafted tokens accepted in one round, the bonus not counted (`acceptance_histogram`).
  tokens/s           `tokens_per_second`: new tokens / wall seconds.
  seconds per token  `seconds_per_token`: wall seconds / new tokens.
  speedup            `speedup`: the baseline's seconds per token / the variant's, on the same prompts.
  peak memory        `PeakMemory`: CUDA allocator peak on a GPU, peak resident set size on a CPU.

Aggregates (`summarize`) pool the runs of one (dataset, variant): totals of tokens, seconds and rounds, and
the metrics of those totals (tau over all rounds, tokens/s of all tokens over all seconds), never means of
per-run ratios. The row with dataset "all" pools every dataset.

Runs are interleaved: each prompt goes through every variant before the next prompt starts, so that a
machine whose speed drifts (a shared CPU, a GPU warming up) affects all variants alike.
"""

from __future__ import annotations

import dataclasses
import math
import resource
import sys
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ..decoding import METHODS, tau, tokens_per_second

HF_GENERATE = "hf-generate"
HF_PROMPT_LOOKUP = "hf-prompt-lookup"
BASELINES = (HF_GENERATE, HF_PROMPT_LOOKUP)


# --------------------------------------------------------------------------------------------------
# The metrics, each defined once.


# tau is defined with the decode loop (`treeflash.decoding.tau`) and imported here.


def acceptance_histogram(acceptance_lengths: Iterable[int], size: int = 0) -> list[int]:
    """Rounds per acceptance length: entry L counts the rounds that accepted L drafted tokens (the bonus not
    counted). At least `size` entries, more if a longer acceptance occurred."""
    lengths = list(acceptance_lengths)
    counts = [0] * max(size, max(lengths, default=-1) + 1)
    for length in lengths:
        counts[length] += 1
    return counts


def seconds_per_token(new_tokens: int, seconds: float) -> float:
    """Wall seconds per new token (prefill included): the unit in which speedups are taken."""
    return seconds / new_tokens if new_tokens > 0 else math.nan


def speedup(baseline_seconds_per_token: float, variant_seconds_per_token: float) -> float:
    """How many times faster than the baseline, per token: baseline seconds per token / variant's.

    A ratio of times per token, so generations of different lengths compare fairly; it equals the ratio of
    tokens/s when both are tokens/s of the same kind (total tokens over total seconds)."""
    if not variant_seconds_per_token > 0 or math.isnan(baseline_seconds_per_token):
        return math.nan
    return baseline_seconds_per_token / variant_seconds_per_token


class PeakMemory:
    """Peak memory of one stretch of work (`start()` ... `stop()`).

    cuda: `torch.cuda.max_memory_allocated`, reset at start: bytes held by tensors at the peak (weights
          included; the CUDA context and the allocator's unused cache are not).
    cpu:  the peak resident set size of the process (on Linux the VmHWM counter, which is what
          `resource.getrusage().ru_maxrss` reports), reset at start by writing 5 to /proc/self/clear_refs:
          all the process's resident memory at its fullest during the work (Python, libraries and weights
          included), not only what the work allocated. Where the counter cannot be reset it is the peak of
          the whole process so far, and `resettable` is False.
    `stop()` returns (peak bytes, peak minus the amount in use at start): the second is what the work added.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.resettable = self.cuda or self._reset_rss()
        self._base = 0

    @property
    def description(self) -> str:
        if self.cuda:
            return "CUDA max_memory_allocated during each generation (tensors, weights included)"
        if self.resettable:
            return "peak resident set size of the process during each generation (VmHWM = ru_maxrss, reset before it)"
        return "peak resident set size of the process so far (ru_maxrss; this system cannot reset it per generation)"

    @staticmethod
    def _reset_rss() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _rss() -> tuple[int, int]:
        """(current, peak) resident set size in bytes."""
        try:
            fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
            return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak *= 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
            return peak, peak

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            if self.resettable:
                self._reset_rss()
            self._base = self._rss()[0]

    def stop(self) -> tuple[int, int]:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = self._rss()[1]
        return peak, max(peak - self._base, 0)


# --------------------------------------------------------------------------------------------------
# Records


@dataclasses.dataclass
class Run:
    """One timed generation."""

    dataset: str
    prompt_id: str
    method: str  # one of METHODS or BASELINES
    budget: int  # draft nodes per round (see the module glossary)
    prompt_tokens: int
    token_ids: list[int]  # the new tokens, EOS included when generation stopped there
    seconds: float  # wall time, prefill included
    stop_reason: str  # "eos", "max_new_tokens" or "context"
    rounds: int | None = None  # target verification passes after the prefill (None for baselines)
    acceptance_lengths: list[int] | None = None  # per round (None for baselines: transformers does not say)
    stage_seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # see decoding.STAGES
    matches_ar: bool | None = None  # same tokens as our ar on this prompt (None: not comparable)
    peak_memory_bytes: int | None = None  # see PeakMemory
    peak_memory_delta_bytes: int | None = None
    lookup: int = 0  # n-gram lookup tokens grafted per round at most (0 = off)

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tau(self) -> float | None:
        return None if self.acceptance_lengths is None else tau(self.acceptance_lengths)

    @property
    def tokens_per_second(self) -> float:
        return tokens_per_second(self.new_tokens, self.seconds)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(new_tokens=self.new_tokens, tau=self.tau, tokens_per_second=self.tokens_per_second)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Run":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclasses.dataclass
class Summary:
    """The runs of one (dataset, method, budget, lookup), pooled."""

    dataset: str  # a dataset, or "all" for every dataset pooled
    method: str
    budget: int
    runs: int
    new_tokens: int  # total
    seconds: float  # total wall time, prefills included
    rounds: int | None  # total (None for baselines)
    tau: float | None  # over all rounds of all runs
    tokens_per_second: float  # total new tokens / total seconds
    seconds_per_token: float  # total seconds / total new tokens
    speedup_vs_ar: float | None  # our ar's seconds per token on the same prompts / this one's
    speedup_vs_hf_generate: float | None  # transformers generate's seconds per token / this one's
    agreement_with_ar: float | None  # share of prompts whose tokens equal ar's (None: not comparable)
    stage_seconds: dict[str, float]  # totals per stage
    acceptance_histogram: list[int] | None  # rounds per acceptance length
    peak_memory_bytes: int | None  # the largest peak of its runs
    peak_memory_delta_bytes: int | None  # the largest increase over the memory in use before a run
    lookup: int = 0  # n-gram lookup tokens grafted per round at most (0 = off)

    @property
    def label(self) -> str:
        return variant_label(self.method, self.budget, self.lookup)

    @property
    def series(self) -> str:
        return series_name(self.method, self.lookup)

    def stage_ms_per_round(self, stage: str) -> float:
        """Milliseconds per round spent in `stage` (prefill: per generation)."""
        per = self.runs if stage == "prefill" else self.rounds
        return 1000 * self.stage_seconds.get(stage, 0.0) / per if per else math.nan

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def series_name(method: str, lookup: int = 0) -> str:
    return f"{method}+lookup{lookup}" if lookup else method


def variant_label(method: str, budget: int, lookup: int = 0) -> str:
    return series_name(f"{method}@{budget}" if method in ("ddtree", "treeflash") else method, lookup)


def summarize(runs: Sequence[Run]) -> list[Summary]:
    """Pool runs per (dataset, method, budget, lookup), then per variant over all datasets ("all"), and
    take speedups against ar and hf-generate of the same dataset (pooled the same way)."""
    groups: dict[tuple[str, str, int, int], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.dataset, run.method, run.budget, run.lookup), []).append(run)
        groups.setdefault(("all", run.method, run.budget, run.lookup), []).append(run)
    if len({r.dataset for r in runs}) == 1:  # "all" would repeat the one dataset
        groups = {k: v for k, v in groups.items() if k[0] != "all"}
    summaries = [_pool(key, group) for key, group in groups.items()]
    reference = {(s.dataset, s.method): s for s in summaries if s.method in ("ar", HF_GENERATE) and not s.lookup}
    for s in summaries:
        for method, field in (("ar", "speedup_vs_ar"), (HF_GENERATE, "speedup_vs_hf_generate")):
            base = reference.get((s.dataset, method))
            if base is not None:
                setattr(s, field, speedup(base.seconds_per_token, s.seconds_per_token))
    order = {m: i for i, m in enumerate(("ar", *BASELINES, *METHODS[1:]))}
    datasets = list(dict.fromkeys(r.dataset for r in runs)) + ["all"]
    summaries.sort(key=lambda s: (datasets.index(s.dataset), order.get(s.method, 99), s.lookup, s.budget))
    return summaries


def _pool(key: tuple[str, str, int, int], runs: list[Run]) -> Summary:
    dataset, method, budget, lookup = key
    new_tokens = sum(r.new_tokens for r in runs)
    seconds = sum(r.seconds for r in runs)
    drafted = all(r.acceptance_lengths is not None for r in runs)
    lengths = [n for r in runs for n in (r.acceptance_lengths or [])]
    stages: dict[str, float] = {}
    for r in runs:
        for stage, value in r.stage_seconds.items():
            stages[stage] = stages.get(stage, 0.0) + value
    compared = [r.matches_ar for r in runs if r.matches_ar is not None]
    peaks = [r.peak_memory_bytes for r in runs if r.peak_memory_bytes is not None]
    deltas = [r.peak_memory_delta_bytes for r in runs if r.peak_memory_delta_bytes is not None]
    return Summary(
        dataset=dataset, method=method, budget=budget, runs=len(runs), new_tokens=new_tokens, seconds=seconds,
        rounds=sum(r.rounds for r in runs) if drafted else None,
        tau=tau(lengths) if drafted else None,
        tokens_per_second=tokens_per_second(new_tokens, seconds),
        seconds_per_token=seconds_per_token(new_tokens, seconds),
        speedup_vs_ar=None, speedup_vs_hf_generate=None,
        agreement_with_ar=sum(compared) / len(compared) if compared else None,
        stage_seconds=stages,
        acceptance_histogram=acceptance_histogram(lengths) if drafted else None,
        peak_memory_bytes=max(peaks) if peaks else None,
        peak_memory_delta_bytes=max(deltas) if deltas else None,
        lookup=lookup,
    )


def best_budgets(summaries: Sequence[Summary]) -> dict[tuple[str, str], Summary]:
    """Per (dataset, series), the budget with the highest speedup over ar (the tau of that same budget is
    what bar charts show, so both bars describe one configuration)."""
    best: dict[tuple[str, str], Summary] = {}
    for s in summaries:
        key = (s.dataset, s.series)
        score = s.speedup_vs_ar if s.speedup_vs_ar is not None and not math.isnan(s.speedup_vs_ar) else -1.0
        old = best.get(key)
        if old is None or score > (old.speedup_vs_ar if old.speedup_vs_ar is not None else -1.0):
            best[key] = s
    return best
