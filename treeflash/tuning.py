"""`treeflash tune`: measure which budget, candidate count and lookup length decode fastest on this machine, and
keep them.

The best draft tree depends on the hardware: a GPU verifies hundreds of nodes for the price of one, a CPU pays
for each (see docs/speed.md). A short calibration, greedy on a few built-in prompts, times

  ar, dflash,
  ddtree at each budget,
  treeflash at each budget (with the drafter's m), then at the best budget with each candidate count m,
  ddtree and treeflash then at their best settings with each n-gram lookup length (0 = off),

and writes the fastest settings to `<cache>/tuned/<key>.json`. The key is the machine (processor, torch
threads, device), the target, the drafter (its config and a fingerprint of its weights) and their dtypes, so
a tuning never leaks to another setup. `treeflash.load()` reads it back: `generate`, the Python API and
`serve` then use the tuned budget, m and lookup whenever none is given. `treeflash bench` never does: it always says
what it runs.

Greedy outputs are the same for every setting, so each setting is timed on exactly the same tokens.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

from .decoding import DecodeConfig, Decoder, resolve_lookup, tau
from .errors import TreeFlashError
from .machine import cpu_model
from .targets import cache_dir
from .trees import check_budget

# Chat and code, like the benchmarks the defaults are judged on (MT-Bench, HumanEval); none of them is from
# those sets.
CALIBRATION_PROMPTS = (
    "Write a Python function that returns the n-th Fibonacci number, with a docstring.",
    "Explain in a short paragraph why the sky is blue.",
    "Give three tips for writing clear emails at work.",
)
DEFAULT_BUDGETS = (2, 4, 8, 16, 32, 64)
DEFAULT_CANDIDATES = (4, 8, 16)
DEFAULT_LOOKUPS = (0, 8, 16)  # n-gram lookup lengths; a CPU pays ~0.6 ms a round per grafted token, a GPU ~nothing
DEFAULT_TUNE_TOKENS = 64
DEFAULT_REPEATS = 2
TUNED_DIR = "tuned"


@dataclasses.dataclass
class Setting:
    """One timed setting and what it measured over all calibration prompts."""

    method: str
    budget: int  # draft nodes per round, the root not counted (0 for ar)
    candidate_tokens: int | None  # TreeFlash's m (None for the other methods)
    new_tokens: int
    seconds: float
    acceptance_lengths: list[int]  # per round, all prompts
    lookup: int = 0  # n-gram lookup tokens per round (0 = off; tunings saved before it was tuned have none)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def tau(self) -> float:
        return tau(self.acceptance_lengths)


@dataclasses.dataclass
class Tuning:
    """The best settings per method on one machine, for one target and drafter."""

    key: dict  # what the settings are valid for (see `tuning_key`)
    best: dict  # method -> {"budget": B, "candidate_tokens": m (treeflash only), "lookup": L (trees only),
    #                        "tokens_per_second": x}
    settings: list[Setting]  # everything that was timed
    fastest_method: str  # the method with the most tokens/s
    created: str = ""
    command: str = ""

    def budget(self, method: str) -> int | None:
        return (self.best.get(method) or {}).get("budget")

    def candidate_tokens(self, method: str) -> int | None:
        return (self.best.get(method) or {}).get("candidate_tokens")

    def lookup(self, method: str) -> int | None:
        """The tuned lookup length, None if this tuning did not time any (then DEFAULT_LOOKUP applies)."""
        return (self.best.get(method) or {}).get("lookup")

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        for s, row in zip(self.settings, d["settings"]):
            row["tokens_per_second"] = s.tokens_per_second
            row["tau"] = s.tau
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Tuning":
        fields = {f.name for f in dataclasses.fields(Setting)}
        settings = [Setting(**{k: v for k, v in row.items() if k in fields}) for row in d["settings"]]
        return cls(key=d["key"], best=d["best"], settings=settings, fastest_method=d["fastest_method"],
                   created=d.get("created", ""), command=d.get("command", ""))


def drafter_fingerprint(drafter) -> str:
    """A short hash of a drafter's config and weights: two checkpoints tune separately. It runs on every
    `treeflash.load()`, so it reads ~1,000 evenly spaced values of each tensor rather than all of them (a
    noticeable share of start-up on a CPU); two trainings never agree on all of those."""
    h = hashlib.sha1(json.dumps(drafter.config.to_json_dict(), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in drafter.state_dict().items():
            sample = p.detach().flatten()[:: max(1, p.numel() // 1024)].double().cpu()
            h.update(f"{name}{tuple(p.shape)}".encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def tuning_key(decoder: Decoder) -> dict:
    """What a tuning is valid for: machine, threads, device, target, drafter and dtypes."""
    target, drafter = decoder.target, decoder.drafter
    device = target.device
    accelerator = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "processor": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device.type,
        "accelerator": accelerator,
        "torch": torch.__version__,
        "target": target.name,
        "target_dtype": str(target.dtype).removeprefix("torch."),
        "drafter": None if drafter is None else drafter_fingerprint(drafter),
        "drafter_dtype": None if drafter is None else str(next(drafter.parameters()).dtype).removeprefix("torch."),
    }


def tuning_path(key: dict) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / TUNED_DIR / f"{digest}.json"


def load_tuning(decoder: Decoder) -> Tuning | None:
    """The tuning saved for this decoder's setup, or None if `treeflash tune` was not run for it."""
    if decoder.drafter is None:
        return None
    path = tuning_path(tuning_key(decoder))
    if not path.exists():
        return None
    try:
        return Tuning.from_json(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        print(f"[treeflash] ignoring the unreadable tuning {path} ({e}); run `treeflash tune` again",
              file=sys.stderr)
        return None


def save_tuning(tuning: Tuning) -> Path:
    path = tuning_path(tuning.key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(tuning.to_json(), indent=1) + "\n")
    tmp.replace(path)
    return path


def tune(
    decoder: Decoder,
    prompts: Sequence[Sequence[int]],
    budgets: Sequence[int] = DEFAULT_BUDGETS,
    candidates: Sequence[int] = DEFAULT_CANDIDATES,
    lookups: Sequence[int] = DEFAULT_LOOKUPS,
    max_new_tokens: int = DEFAULT_TUNE_TOKENS,
    methods: Sequence[str] = ("ar", "dflash", "ddtree", "treeflash"),
    progress: Callable[[str], None] | None = None,
    repeats: int = DEFAULT_REPEATS,
) -> Tuning:
    """Time every setting on `prompts` (token ids), greedy, and pick the fastest per method. Each prompt is
    timed `repeats` times and its fastest time kept: on a shared machine the slow outliers are the noise."""
    if decoder.drafter is None:
        raise TreeFlashError("tuning needs a drafter; load one (the default target ships with one)")
    if not prompts:
        raise TreeFlashError("tuning needs at least one prompt")
    for b in budgets:
        check_budget(b)
    if any(m < 1 for m in candidates):
        raise TreeFlashError(f"candidate counts must be >= 1; got {list(candidates)}")
    if any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in lookups):
        raise TreeFlashError(f"lookup lengths must be whole numbers >= 0 (0 = off); got {list(lookups)}")
    if repeats < 1:
        raise TreeFlashError(f"repeats must be >= 1; got {repeats}")
    if decoder.drafter.ar_approximation is None:
        methods = [m for m in methods if m != "treeflash"]
    settings: list[Setting] = []

    def run(method: str, budget: int | None, m: int | None, lookup: int) -> Setting:
        config = DecodeConfig(method=method, budget=budget, max_new_tokens=max_new_tokens, candidate_tokens=m,
                              lookup=lookup)
        decoder.generate(list(prompts[0]), dataclasses.replace(config, max_new_tokens=8))  # warm-up
        tokens, seconds, acceptance = 0, 0.0, []
        for ids in prompts:
            runs = [decoder.generate(list(ids), config) for _ in range(repeats)]  # greedy: the same tokens
            r = min(runs, key=lambda run: run.seconds)
            tokens, seconds = tokens + r.new_tokens, seconds + r.seconds
            acceptance += r.acceptance_lengths
        s = Setting(method, r.budget, m, tokens, seconds, acceptance, lookup)
        settings.append(s)
        if progress:
            label = f"{method}" + (f"@{s.budget}" if method in ("ddtree", "treeflash") else "")
            label += f" m={m}" if m else ""
            label += f" lookup {lookup}" if lookup else ""
            progress(f"{label:<22} {s.tokens_per_second:7.1f} tokens/s  tau {s.tau:.2f}")
        return s

    best: dict[str, dict] = {}
    for method in methods:
        if method in ("ar", "dflash"):  # the plain references: no lookup unless asked for
            s = run(method, None, None, 0)
            best[method] = {"budget": s.budget, "tokens_per_second": s.tokens_per_second}
            continue
        # Budgets (and m) are timed with the method's default lookup, then lookups at the best of them.
        default_m = decoder.drafter.config.candidate_tokens if method == "treeflash" else None
        default_lookup = resolve_lookup(method, None)
        by_budget = [run(method, b, default_m, default_lookup) for b in budgets]
        top = max(by_budget, key=lambda s: s.tokens_per_second)
        if method == "treeflash":
            for m in candidates:
                if m != default_m:
                    top = max(top, run(method, top.budget, m, default_lookup), key=lambda s: s.tokens_per_second)
        for lookup in lookups:
            if lookup != default_lookup:
                top = max(top, run(method, top.budget, top.candidate_tokens, lookup),
                          key=lambda s: s.tokens_per_second)
        best[method] = {"budget": top.budget, "tokens_per_second": top.tokens_per_second, "lookup": top.lookup}
        if method == "treeflash":
            best[method]["candidate_tokens"] = top.candidate_tokens
    fastest = max(best, key=lambda k: best[k]["tokens_per_second"])
    return Tuning(key=tuning_key(decoder), best=best, settings=settings, fastest_method=fastest,
                  created=datetime.datetime.now().isoformat(timespec="seconds"))


def report(tuning: Tuning) -> str:
    """A Markdown table of every timed setting, the chosen ones in bold."""
    lines = [
        "| method | budget | m | lookup | tau | tokens/s | chosen |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in tuning.settings:
        chosen = tuning.best.get(s.method, {})
        is_best = (chosen.get("budget") == s.budget
                   and chosen.get("candidate_tokens", s.candidate_tokens) == s.candidate_tokens
                   and chosen.get("lookup", s.lookup) == s.lookup)
        mark = "**yes**" if is_best else ""
        lines.append(f"| {s.method} | {s.budget} | {s.candidate_tokens or '–'} | {s.lookup or '–'} | {s.tau:.2f} | "
                     f"{s.tokens_per_second:.1f} | {mark} |")
    return "\n".join(lines)
