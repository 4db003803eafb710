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

import argparse
import csv
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from ..decoding import DEFAULT_LOOKUP, METHODS, STAGES, DecodeConfig, Decoder, tau
from ..errors import TreeFlashError
from ..packing import cpu_model
from ..trees import check_budget

HF_GENERATE = "hf-generate"
HF_PROMPT_LOOKUP = "hf-prompt-lookup"
BASELINES = (HF_GENERATE, HF_PROMPT_LOOKUP)
DEFAULT_DATASETS = ("mtbench", "humaneval", "sharegpt-heldout")
WARMUP_TOKENS = 32  # new tokens per warm-up generation: enough for lazy initialisation, cheap on a CPU
RUNS_FILE, SUMMARY_FILE, REPORT_FILE, ANALYSIS_FILE = "runs.json", "summary.csv", "report.md", "analysis.json"


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


def tokens_per_second(new_tokens: int, seconds: float) -> float:
    """Throughput of one or several generations: new tokens / wall seconds (prefill included)."""
    return new_tokens / seconds if seconds > 0 else math.nan


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


# --------------------------------------------------------------------------------------------------
# Running


@dataclasses.dataclass
class BenchConfig:
    """What `treeflash bench` runs. Flags map one-to-one onto these fields."""

    methods: tuple[str, ...] = METHODS  # ar always runs: it is every speedup's and every agreement's reference
    budgets: tuple[int, ...] = (16, 32, 64, 128)  # node budgets for ddtree and treeflash (dflash: its chain)
    # n-gram lookup lengths for ddtree and treeflash, each a series of its own (0 = off; default: off and the
    # default of DecodeConfig, so that both the paper's trees and `treeflash generate` are measured)
    lookups: tuple[int, ...] = tuple(sorted({0, DEFAULT_LOOKUP.get("treeflash", 0)}))
    lookup_ngram: int = DecodeConfig.lookup_ngram  # the shortest context suffix a lookup matches, every variant
    datasets: tuple[str, ...] = DEFAULT_DATASETS  # names for treeflash.train.records.load_prompts, or JSONL paths
    prompts: int = 10  # prompts per dataset (the first ones)
    max_new_tokens: int = 256  # per generation; EOS also stops every variant
    temperature: float = 0.0  # 0 = greedy
    seed: int = 0  # sampling seed (temperature > 0), the same for every variant
    warmup: int = 1  # untimed generations of every variant before timing (WARMUP_TOKENS tokens each)
    hf_baselines: bool = True  # also time transformers generate and its prompt-lookup decoding
    prompt_lookup_tokens: int = 10  # hf-prompt-lookup: candidate tokens per round
    chat: bool = True  # prompts as one user turn of the chat template
    analyses: bool = False  # also write plots and the teacher-forced analyses (needs matplotlib)
    analysis_prompts: int = 4  # prompts for the teacher-forced analyses
    anchors: int = 16  # anchor positions drafted per analysed prompt
    draw_budget: int = 24  # nodes of the drawn DDTree and TreeFlash trees

    def __post_init__(self):
        self.methods = tuple(dict.fromkeys(("ar", *self.methods)))
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise TreeFlashError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
        self.budgets = tuple(sorted({check_budget(b) for b in self.budgets}))
        if not self.budgets:
            raise TreeFlashError("give at least one budget, e.g. --budgets 16,32,64")
        if not self.lookups or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in self.lookups):
            raise TreeFlashError(f"lookups must be whole numbers >= 0 (0 = off), e.g. --lookups 0,8; got {self.lookups!r}")
        self.lookups = tuple(sorted(set(self.lookups)))
        if not self.datasets:
            raise TreeFlashError("give at least one dataset, e.g. --datasets mtbench")
        for name, value, least in (("prompts", self.prompts, 1), ("max_new_tokens", self.max_new_tokens, 1),
                                   ("warmup", self.warmup, 0), ("prompt_lookup_tokens", self.prompt_lookup_tokens, 1),
                                   ("analysis_prompts", self.analysis_prompts, 1), ("anchors", self.anchors, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise TreeFlashError(f"{name} must be a whole number >= {least}; got {value!r}")
        check_budget(self.draw_budget)
        DecodeConfig(temperature=self.temperature, seed=self.seed, lookup_ngram=self.lookup_ngram)  # validates them

    def variants(self) -> list[tuple[str, int | None, int]]:
        """(method, budget, lookup) in the order each prompt runs them; budget None = the method's own
        (dflash). ar, dflash and the baselines run without lookup: they are the references."""
        out: list[tuple[str, int | None, int]] = [("ar", 0, 0)]
        if self.hf_baselines:
            out += [(HF_GENERATE, 0, 0), (HF_PROMPT_LOOKUP, self.prompt_lookup_tokens, 0)]
        for method in self.methods[1:]:
            out += [(method, None, 0)] if method == "dflash" else [
                (method, b, lookup) for lookup in self.lookups for b in self.budgets]
        return out


def dataset_label(source: str) -> str:
    """A dataset's name in tables: the name itself, or a JSONL file's stem."""
    return source if source in DEFAULT_DATASETS or source == "sharegpt" else Path(source).stem


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


def _generate(decoder: Decoder, method: str, budget: int | None, lookup: int, prompt_ids: list[int],
              config: BenchConfig, max_new_tokens: int, dataset: str, prompt_id: str) -> Run:
    if method in BASELINES:
        tokens, seconds, stop = hf_generate(
            decoder.target.model, prompt_ids, max_new_tokens, decoder.target.eos_token_ids, config.temperature,
            config.seed, prompt_lookup_tokens=budget if method == HF_PROMPT_LOOKUP else None)
        return Run(dataset, prompt_id, method, budget, len(prompt_ids), tokens, seconds, stop)
    result = decoder.generate(prompt_ids, DecodeConfig(method=method, budget=budget or None,
                                                       max_new_tokens=max_new_tokens, lookup=lookup,
                                                       lookup_ngram=config.lookup_ngram,
                                                       temperature=config.temperature, seed=config.seed))
    return Run(dataset, prompt_id, method, result.budget, len(prompt_ids), list(result.token_ids), result.seconds,
               result.stop_reason, rounds=result.rounds, acceptance_lengths=list(result.acceptance_lengths),
               stage_seconds=dict(result.stage_seconds), lookup=lookup)


def run_bench(decoder: Decoder, prompts: dict[str, list[tuple[str, list[int]]]], config: BenchConfig,
              progress: bool = True) -> list[Run]:
    """Time every variant of `config` on every prompt. `prompts`: dataset -> [(prompt id, token ids)].

    Each run's `matches_ar` compares its tokens with our ar's on the same prompt: every method of ours must
    match (it is lossless, greedy or seeded); transformers' baselines are compared only when greedy, since
    they sample with other noise."""
    from tqdm.auto import tqdm

    variants = config.variants()
    if any(m != "ar" and m not in BASELINES for m, _, _ in variants) and decoder.drafter is None:
        raise TreeFlashError("methods other than ar need a drafter; pass --drafter PATH or 'untrained'")
    memory = PeakMemory(decoder.target.device)
    first = next((ids for items in prompts.values() for _, ids in items), None)
    if first is not None and config.warmup:
        bar = tqdm(total=config.warmup * len(variants), desc="warm-up", unit="run", disable=not progress)
        for _ in range(config.warmup):
            for method, budget, lookup in variants:
                _generate(decoder, method, budget, lookup, first, config, min(config.max_new_tokens, WARMUP_TOKENS),
                          "", "")
                bar.update(1)
        bar.close()

    runs: list[Run] = []
    total = sum(len(items) for items in prompts.values()) * len(variants)
    bar = tqdm(total=total, desc="bench", unit="run", disable=not progress)
    for dataset, items in prompts.items():
        for prompt_id, ids in items:
            reference = None
            for method, budget, lookup in variants:
                bar.set_postfix_str(f"{dataset} {variant_label(method, budget or 0, lookup)}", refresh=False)
                memory.start()
                run = _generate(decoder, method, budget, lookup, ids, config, config.max_new_tokens, dataset,
                                prompt_id)
                run.peak_memory_bytes, run.peak_memory_delta_bytes = memory.stop()
                if method == "ar":
                    reference = run.token_ids
                if method not in BASELINES or config.temperature == 0:
                    run.matches_ar = run.token_ids == reference
                runs.append(run)
                bar.update(1)
    bar.close()
    return runs


# --------------------------------------------------------------------------------------------------
# Where it ran


def machine_info(device: torch.device) -> dict:
    """What the numbers were measured on."""
    import transformers

    info = {
        "device": device.type,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    try:
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip() + ("+local changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def device_tag(info: dict) -> str:
    """A folder name for results from this machine: gpu-<name> or cpu-<model>-<threads>t."""
    name = info.get("gpu") if info["device"] == "cuda" else info["cpu"]
    slug = re.sub(r"\((r|tm)\)|\bnvidia\b|\bcpu\b|\bprocessor\b|@.*", " ", name.lower())
    slug = re.sub(r"[^a-z0-9]+", "-", slug).strip("-") or "unknown"
    return f"gpu-{slug}" if info["device"] == "cuda" else f"cpu-{slug}-{info['torch_threads']}t"


# --------------------------------------------------------------------------------------------------
# Writing results


def _round(x, digits: int = 6):
    if isinstance(x, float):
        return None if math.isnan(x) else round(x, digits)
    if isinstance(x, dict):
        return {k: _round(v, digits) for k, v in x.items()}
    if isinstance(x, list):
        return [_round(v, digits) for v in x]
    return x


def write_runs(path: Path, meta: dict, runs: Sequence[Run], summaries: Sequence[Summary]) -> None:
    data = {"meta": meta, "runs": [_round(r.to_dict()) for r in runs],
            "summary": [_round(s.to_dict()) for s in summaries]}
    path.write_text(json.dumps(data, indent=1) + "\n")


SUMMARY_COLUMNS = ("dataset", "method", "budget", "lookup", "runs", "new_tokens", "seconds", "rounds", "tau",
                   "tokens_per_second", "seconds_per_token", "speedup_vs_ar", "speedup_vs_hf_generate",
                   "agreement_with_ar", "peak_memory_bytes", "peak_memory_delta_bytes")


def write_summary_csv(path: Path, summaries: Sequence[Summary]) -> None:
    """One row per (dataset, variant): the Summary fields, then `<stage>_ms_per_round` per stage
    (prefill_ms_per_round is per generation)."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*SUMMARY_COLUMNS, *(f"{s}_ms_per_round" for s in STAGES)])
        for s in summaries:
            values = [_round(getattr(s, c)) for c in SUMMARY_COLUMNS]
            stages = [_round(s.stage_ms_per_round(stage), 3) if s.rounds is not None else None for stage in STAGES]
            writer.writerow(["" if v is None else v for v in (*values, *stages)])


def _fmt(x, spec: str = ".2f", none: str = "–") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return format(x, spec)


def _mib(x) -> str:
    return _fmt(None if x is None else x / 2**20, ".0f")


def write_report(path: Path, meta: dict, runs: Sequence[Run], summaries: Sequence[Summary],
                 plots: dict[str, str] | None = None, analysis: dict | None = None) -> None:
    """The Markdown report: headline tables, stage breakdown, checks, plots, analyses, machine, command."""
    config, machine = meta["config"], meta["machine"]
    threads = machine["torch_threads"]
    where = machine.get("gpu") or f"{machine['cpu']} ({threads} thread{'s' * (threads != 1)})"
    lines = [
        f"# treeflash bench: {meta['target']} on {where}",
        "",
        f"{meta['prompts']} prompts ({', '.join(f'{n} {d}' for d, n in meta['prompts_per_dataset'].items())}), "
        f"up to {config['max_new_tokens']} new tokens each, temperature {config['temperature']}"
        + (f" (seed {config['seed']})" if config["temperature"] > 0 else " (greedy)")
        + f", {meta['dtype']}. Drafter: {meta['drafter']}"
        + (f" ({meta['drafter_dtype']})" if meta.get("drafter_dtype") else "") + ". Every variant ran on every prompt, interleaved; "
        f"{config['warmup']} untimed warm-up generation(s) of each first. Started {meta['started']}, took "
        f"{meta['elapsed_seconds'] / 60:.1f} min.",
        "",
        "tau = mean tokens committed per round, bonus included; tokens/s = new tokens / wall seconds (prefill "
        "included), pooled over prompts; speedup = the baseline's seconds per token / the variant's. "
        "See docs/benchmarking.md.",
        "",
        "## Headline",
        "",
    ]
    best = best_budgets(summaries)
    for dataset in dict.fromkeys(s.dataset for s in summaries):
        lines += [f"### {dataset}", "",
                  "| variant | budget | prompts | new tokens | tau | tokens/s | speedup vs ar | speedup vs HF generate "
                  "| same output as ar |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for s in (s for s in summaries if s.dataset == dataset):
            mark = " **(best)**" if s.method in ("ddtree", "treeflash") and best[(dataset, s.series)] is s \
                and len(config["budgets"]) > 1 else ""
            agreement = "–" if s.agreement_with_ar is None else f"{100 * s.agreement_with_ar:.0f}%"
            lines.append(f"| {s.series}{mark} | {s.budget} | {s.runs} | {s.new_tokens} | {_fmt(s.tau)} | "
                         f"{_fmt(s.tokens_per_second, '.1f')} | {_fmt(s.speedup_vs_ar)} | "
                         f"{_fmt(s.speedup_vs_hf_generate)} | {agreement} |")
        lines.append("")

    pooled = [s for s in summaries if s.dataset == "all"] or list(summaries)
    scope = "all datasets pooled" if any(s.dataset == "all" for s in summaries) else pooled[0].dataset
    lines += [
        "## Where the time goes",
        "",
        f"Milliseconds per round ({scope}); prefill in milliseconds per generation. `draft`: the drafter's "
        "pass; `head`: TreeFlash's conditional passes (on a CPU, with the search that asks for their rows); `tree`: "
        "top-k tables, best-first search, mask; `verify`: the "
        "target's pass and token choice; `commit`: the walk, cache compaction, stop checks.",
        "",
        "| variant | rounds | " + " | ".join(STAGES) + " | round total | share in verify |",
        "|---|---|" + "---|" * len(STAGES) + "---|---|",
    ]
    for s in pooled:
        if s.rounds is None:
            continue
        per_round = {st: s.stage_ms_per_round(st) for st in STAGES}
        round_total = sum(v for st, v in per_round.items() if st != "prefill" and not math.isnan(v))
        share = per_round["verify"] / round_total if round_total else math.nan
        lines.append(f"| {s.label} | {s.rounds} | " + " | ".join(_fmt(per_round[st], '.1f') for st in STAGES)
                     + f" | {_fmt(round_total, '.1f')} | {_fmt(100 * share, '.0f')}% |")
    lines += ["", "## Acceptance lengths", "",
              f"Share of rounds ({scope}) that accepted L drafted tokens (the bonus not counted).", "",
              "| variant | rounds | " + " | ".join(f"L={i}" for i in range(_longest(pooled))) + " |",
              "|---|---|" + "---|" * _longest(pooled)]
    for s in pooled:
        if s.acceptance_histogram is None or s.method == "ar":
            continue
        hist = s.acceptance_histogram + [0] * (_longest(pooled) - len(s.acceptance_histogram))
        lines.append(f"| {s.label} | {s.rounds} | " + " | ".join(f"{100 * c / s.rounds:.0f}%" for c in hist) + " |")

    lines += ["", "## Checks", ""]
    lines += _check_lines(runs, config)
    lines += ["", f"Peak memory ({meta['memory']}):", "",
              "| variant | peak MiB | added over the start MiB |", "|---|---|---|"]
    for s in pooled:
        lines.append(f"| {s.label} | {_mib(s.peak_memory_bytes)} | {_mib(s.peak_memory_delta_bytes)} |")

    if plots:
        lines += ["", "## Plots", ""]
        for title, file in plots.items():
            lines += [f"### {title}", "", f"![{title}]({file})", ""]
    if analysis:
        lines += ["", *_analysis_lines(analysis)]
    lines += ["", "## Machine", "", *(f"- {k}: {v}" for k, v in machine.items()), "",
              "## Command", "", "```", meta["command"], "```", ""]
    if meta.get("skipped"):
        lines += ["Skipped: " + "; ".join(meta["skipped"]), ""]
    path.write_text("\n".join(lines))


def _longest(summaries: Sequence[Summary]) -> int:
    return max((len(s.acceptance_histogram) for s in summaries if s.acceptance_histogram), default=1)


def _check_lines(runs: Sequence[Run], config: dict) -> list[str]:
    lines = []
    greedy = config["temperature"] == 0
    hf = [r for r in runs if r.method == HF_GENERATE and r.matches_ar is not None]
    if hf:
        agree = sum(r.matches_ar for r in hf)
        lines.append(f"- transformers `generate` (greedy) produced exactly our `ar` tokens on {agree} of {len(hf)} "
                     f"prompts ({100 * agree / len(hf):.0f}%).")
    elif any(r.method == HF_GENERATE for r in runs) and not greedy:
        lines.append("- transformers baselines sample with their own noise at temperature > 0, so their outputs are "
                     "not compared with ours.")
    ours = [r for r in runs if r.method not in BASELINES and r.method != "ar"]
    if ours:
        agree = sum(bool(r.matches_ar) for r in ours)
        lines.append(f"- Speculative runs with exactly the `ar` output: {agree} of {len(ours)}"
                     + (" (lossless)." if agree == len(ours) else "."))
    misses = [r for r in runs if r.matches_ar is False]
    if misses:
        ar = {(r.dataset, r.prompt_id): r.token_ids for r in runs if r.method == "ar"}
        lines.append("- Outputs that differ from `ar` (in float32 only genuine near-ties of the top two logits should "
                     "do this; listed, never hidden):")
        for r in misses:
            ref = ar[(r.dataset, r.prompt_id)]
            at = next((i for i, (a, b) in enumerate(zip(r.token_ids, ref)) if a != b), min(len(ref), r.new_tokens))
            lines.append(f"  - {r.dataset} {r.prompt_id} {variant_label(r.method, r.budget, r.lookup)}: first difference at new "
                         f"token {at}")
    return lines


def _analysis_lines(analysis: dict) -> list[str]:
    depth = analysis["depth"]
    conditional = depth.get("tv_conditional") is not None
    lines = ["## Draft distributions against the target (teacher-forced)", "",
             f"{analysis['sequences']} prompts, the target's greedy continuation, {analysis['anchors']} anchors "
             "drafted in all. At each depth d, the drafter's distribution for the token at anchor + d is compared "
             "with the target's softmax there: TV = ½ Σ|p − q|, and the target's mass on the drafter's top-k "
             "tokens. Marginal: the drafter's block output (DFlash, DDTree). Conditional: TreeFlash's head given "
             "the true previous token.", "",
             "| depth | anchors | TV marginal" + (" | TV conditional" if conditional else "")
             + "".join(f" | top-{k} mass marginal" + (f" | top-{k} mass conditional" if conditional else "")
                       for k in analysis["ks"]) + " |",
             "|---|---|---" + ("|---" if conditional else "") + "|---" * (len(analysis["ks"]) * (1 + conditional)) + "|"]
    for i, d in enumerate(depth["depth"]):
        cells = [str(d), str(depth["count"][i]), _fmt(depth["tv_marginal"][i], ".3f")]
        if conditional:
            cells.append(_fmt(depth["tv_conditional"][i], ".3f"))
        for k in analysis["ks"]:
            cells.append(_fmt(depth["coverage_marginal"][str(k)][i], ".3f"))
            if conditional:
                cells.append(_fmt(depth["coverage_conditional"][str(k)][i], ".3f"))
        lines.append("| " + " | ".join(cells) + " |")
    accepted = analysis.get("teacher_forced_acceptance")
    if accepted:
        lines += ["", f"Mean accepted length at the same anchors if the target's greedy continuation is verified "
                      f"(trees of {analysis['draw_budget']} nodes; dflash: its chain): "
                  + ", ".join(f"{m} {_fmt(v)}" for m, v in accepted.items()) + ". This is a mean over anchor "
                  "positions, not over decoding rounds: a stretch that is drafted whole counts at every one of its "
                  "positions here, but decoding crosses it in one round, so these means can exceed tau - 1."]
    return lines


# --------------------------------------------------------------------------------------------------
# The command


def _csv_list(kind: Callable):
    def parse(text: str):
        try:
            return tuple(kind(x.strip()) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None
    return parse


def add_bench_flags(p: argparse.ArgumentParser) -> None:
    """`treeflash bench` flags (the model flags come from cli.py); one per BenchConfig field, plus --out."""
    d = BenchConfig()
    p.add_argument("--methods", type=_csv_list(str), default=d.methods,
                   help=f"comma-separated methods; ar always runs (default: {','.join(d.methods)})")
    p.add_argument("--budgets", type=_csv_list(int), default=d.budgets,
                   help="comma-separated node budgets for ddtree and treeflash, the root not counted "
                        f"(default: {','.join(map(str, d.budgets))})")
    p.add_argument("--lookups", type=_csv_list(int), default=d.lookups,
                   help="comma-separated n-gram lookup lengths for ddtree and treeflash, each a series of its own; "
                        f"0 = off (default: {','.join(map(str, d.lookups))})")
    p.add_argument("--lookup-ngram", type=int, default=d.lookup_ngram,
                   help=f"the shortest context suffix a lookup matches, 1-4 (default: {d.lookup_ngram})")
    p.add_argument("--datasets", type=_csv_list(str), default=d.datasets,
                   help=f"comma-separated: mtbench (first turns), humaneval, sharegpt-heldout, or JSONL paths "
                        f"(default: {','.join(d.datasets)})")
    p.add_argument("--prompts", type=int, default=d.prompts, help=f"prompts per dataset (default: {d.prompts})")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help=f"(default: {d.max_new_tokens})")
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy (default: 0)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"sampling seed, the same for all (default: {d.seed})")
    p.add_argument("--warmup", type=int, default=d.warmup,
                   help=f"untimed generations of each variant first (default: {d.warmup})")
    p.add_argument("--no-hf-baselines", dest="hf_baselines", action="store_false",
                   help="skip transformers generate and its prompt-lookup decoding")
    p.add_argument("--prompt-lookup-tokens", type=int, default=d.prompt_lookup_tokens,
                   help=f"hf-prompt-lookup candidate tokens (default: {d.prompt_lookup_tokens})")
    p.add_argument("--no-chat", dest="chat", action="store_false", help="prompts as raw text, without the chat template")
    p.add_argument("--analyses", action="store_true",
                   help="also write plots and the teacher-forced draft analyses (needs matplotlib: the bench extra)")
    p.add_argument("--analysis-prompts", type=int, default=d.analysis_prompts,
                   help=f"prompts for the teacher-forced analyses (default: {d.analysis_prompts})")
    p.add_argument("--anchors", type=int, default=d.anchors,
                   help=f"anchors drafted per analysed prompt (default: {d.anchors})")
    p.add_argument("--draw-budget", type=int, default=d.draw_budget,
                   help=f"nodes of the drawn trees (default: {d.draw_budget})")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="output directory (default: results/bench/<device>)")
    p.set_defaults(func=cmd_bench)


def bench_config_from_args(args: argparse.Namespace) -> BenchConfig:
    fields = {f.name for f in dataclasses.fields(BenchConfig)}
    return BenchConfig(**{k: v for k, v in vars(args).items() if k in fields})


def equivalent_command(args: argparse.Namespace, config: BenchConfig, out: Path) -> str:
    """The command line that reruns this benchmark exactly, every setting spelled out."""
    argv = ["treeflash", "bench"]
    for flag in ("target", "drafter", "drafter_dtype", "device", "dtype", "threads"):
        if getattr(args, flag, None) is not None:
            argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    argv += ["--methods", ",".join(config.methods), "--budgets", ",".join(map(str, config.budgets)),
             "--lookups", ",".join(map(str, config.lookups)), "--lookup-ngram", str(config.lookup_ngram),
             "--datasets", ",".join(config.datasets), "--prompts", str(config.prompts),
             "--max-new-tokens", str(config.max_new_tokens), "--temperature", str(config.temperature),
             "--seed", str(config.seed), "--warmup", str(config.warmup)]
    if config.hf_baselines:
        argv += ["--prompt-lookup-tokens", str(config.prompt_lookup_tokens)]
    else:
        argv.append("--no-hf-baselines")
    if not config.chat:
        argv.append("--no-chat")
    if config.analyses:
        argv += ["--analyses", "--analysis-prompts", str(config.analysis_prompts), "--anchors", str(config.anchors),
                 "--draw-budget", str(config.draw_budget)]
    argv += ["--out", str(out)]
    return shlex.join(argv)


def cmd_bench(args: argparse.Namespace) -> int:
    from ..train.records import load_prompts

    config = bench_config_from_args(args)  # validate flags before loading anything
    if config.analyses:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise TreeFlashError("--analyses needs matplotlib; install it with `pip install -e '.[bench]'`") from None
    if args.threads is not None and args.threads < 1:
        raise TreeFlashError(f"threads must be a whole number >= 1; got {args.threads}")
    sources = {dataset_label(s): load_prompts(s, limit=config.prompts) for s in config.datasets}
    if len(sources) < len(config.datasets):
        raise TreeFlashError("two datasets share a name; rename one of the JSONL files")
    for label, items in sources.items():
        if not items:
            raise TreeFlashError(f"dataset {label} has no prompts; check the file or the dataset name")

    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _bench(args, config, sources)
    finally:
        torch.set_num_threads(threads)  # the setting is process-wide; main() may be called from Python


def _bench(args: argparse.Namespace, config: BenchConfig, sources: dict) -> int:
    from ..api import SHIPPED_DRAFTERS, TextDecoder, default_device, parse_dtype, resolve_drafter
    from ..targets import load_target

    started = time.time()
    dtype = parse_dtype(args.dtype)
    target = load_target(args.target, dtype=dtype, device=args.device or default_device())
    needs_drafter = any(m != "ar" for m in config.methods)
    drafter_dtype = parse_dtype(args.drafter_dtype) if getattr(args, "drafter_dtype", None) else None
    drafter = resolve_drafter(args.drafter, target, drafter_dtype) if needs_drafter else None
    if args.drafter is None and needs_drafter:
        shipped = SHIPPED_DRAFTERS.get(target.name)
        drafter_name = str(shipped) if shipped and (shipped / "config.json").exists() else "untrained (none shipped)"
    else:
        drafter_name = args.drafter or "none"
    skipped = []
    if "treeflash" in config.methods and drafter is not None and drafter.ar_approximation is None:
        config.methods = tuple(m for m in config.methods if m != "treeflash")
        skipped.append("treeflash: the drafter has no TreeFlash head")
        print("treeflash bench: skipping treeflash, the drafter has no TreeFlash head", file=sys.stderr)
    decoder = TextDecoder(target, drafter)
    prompts = {label: [(p.id, target.encode_prompt(p.text, chat=config.chat)) for p in items]
               for label, items in sources.items()}

    machine = machine_info(target.device)
    out = Path(args.out) if args.out else Path("results") / "bench" / device_tag(machine)
    out.mkdir(parents=True, exist_ok=True)
    runs = run_bench(decoder, prompts, config)
    summaries = summarize(runs)
    meta = {
        "target": target.name, "drafter": drafter_name, "dtype": args.dtype,
        "drafter_dtype": str(next(drafter.parameters()).dtype).removeprefix("torch.") if drafter is not None else None,
        "device": str(target.device),
        "config": _round(dataclasses.asdict(config)), "machine": machine,
        "prompts": sum(len(v) for v in prompts.values()),
        "prompts_per_dataset": {k: len(v) for k, v in prompts.items()},
        "datasets": {label: source for label, source in zip(sources, config.datasets)},
        "memory": PeakMemory(target.device).description,
        "command": equivalent_command(args, config, out), "argv": sys.argv,
        "started": datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
        "elapsed_seconds": 0.0, "skipped": skipped,
    }
    plots, analysis = None, None
    if config.analyses:
        from . import analysis as analyses

        plots = analyses.plot_results(summaries, out)
        analysis, analysis_plots = analyses.run_analyses(decoder, prompts, runs, config, out)
        plots.update(analysis_plots)
        (out / ANALYSIS_FILE).write_text(json.dumps(_round(analysis), indent=1) + "\n")
    meta["elapsed_seconds"] = round(time.time() - started, 1)
    write_runs(out / RUNS_FILE, meta, runs, summaries)
    write_summary_csv(out / SUMMARY_FILE, summaries)
    write_report(out / REPORT_FILE, meta, runs, summaries, plots, analysis)

    for s in (s for s in summaries if s.dataset == (summaries[-1].dataset)):
        print(f"{s.label:>22}  tau {_fmt(s.tau):>5}  {_fmt(s.tokens_per_second, '.1f'):>7} tokens/s  "
              f"speedup vs ar {_fmt(s.speedup_vs_ar)}", file=sys.stderr)
    print(f"wrote {out / REPORT_FILE}, {out / RUNS_FILE}, {out / SUMMARY_FILE}", file=sys.stderr)
    return 0
