"""`treeflash bench`: load, run `treeflash.bench` over the datasets, write runs.json, summary.csv and report.md."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from ..api import SHIPPED_DRAFTERS, load
from ..bench.analysis import run_analyses
from ..bench.metrics import PeakMemory, summarize
from ..bench.plots import plot_results
from ..bench.render import (ANALYSIS_FILE, REPORT_FILE, RUNS_FILE, SUMMARY_FILE, fmt, round_floats, write_report,
                            write_runs, write_summary_csv)
from ..bench.runner import BenchConfig, dataset_label, run_bench
from ..errors import TreeFlashError
from ..machine import device_tag, machine_info
from ..targets import cache_dir
from ..train.prompts import load_prompts
from .flags import add_dataclass_flags, add_model_flags, dataclass_from_args, dataclass_to_argv


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="benchmark every method against ar and transformers generate; report, plots")
    add_model_flags(b)
    add_dataclass_flags(b, BenchConfig)
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    b.add_argument("--out", default=None,
                   help="output directory (default: a new one per run, <cache>/bench/<device>-<date-time>, where "
                        "<cache> is $TREEFLASH_CACHE or ~/.cache/treeflash)")
    b.set_defaults(func=cmd_bench)


def equivalent_command(args: argparse.Namespace, config: BenchConfig, out: Path) -> str:
    """The command line that reruns this benchmark exactly, every setting spelled out."""
    argv = ["treeflash", "bench"]
    for flag in ("target", "drafter", "drafter_dtype", "device", "dtype", "threads"):
        if getattr(args, flag, None) is not None:
            argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    argv += dataclass_to_argv(config)
    argv += ["--out", str(out)]
    return shlex.join(argv)


def cmd_bench(args: argparse.Namespace) -> int:
    config = dataclass_from_args(BenchConfig, args)  # validate flags before loading anything
    if config.analyses:
        try:
            import matplotlib  # noqa: F401  (optional: checked before the model loads)
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
    started = time.time()
    needs_drafter = any(m != "ar" for m in config.methods)
    decoder = load(args.target, args.drafter if needs_drafter else "none", device=args.device, dtype=args.dtype,
                   drafter_dtype=args.drafter_dtype)
    decoder.tuning = None  # every variant's budget and lookup are explicit; a tuned m would change treeflash's
    target, drafter = decoder.target, decoder.drafter
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
    prompts = {label: [(p.id, target.encode_prompt(p.text, chat=config.chat)) for p in items]
               for label, items in sources.items()}

    machine = machine_info(target.device)
    # Never into the source tree unasked: a run without --out gets a new directory in the cache.
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else cache_dir() / "bench" / f"{device_tag(machine)}-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    runs = run_bench(decoder, prompts, config)
    summaries = summarize(runs)
    meta = {
        "target": target.name, "drafter": drafter_name, "dtype": args.dtype,
        "drafter_dtype": str(next(drafter.parameters()).dtype).removeprefix("torch.") if drafter is not None else None,
        "device": str(target.device),
        "config": round_floats(dataclasses.asdict(config)), "machine": machine,
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
        plots = plot_results(summaries, out)
        analysis, analysis_plots = run_analyses(decoder, prompts, runs, config, out)
        plots.update(analysis_plots)
        (out / ANALYSIS_FILE).write_text(json.dumps(round_floats(analysis), indent=1) + "\n")
    meta["elapsed_seconds"] = round(time.time() - started, 1)
    write_runs(out / RUNS_FILE, meta, runs, summaries)
    write_summary_csv(out / SUMMARY_FILE, summaries)
    write_report(out / REPORT_FILE, meta, runs, summaries, plots, analysis)

    for s in (s for s in summaries if s.dataset == (summaries[-1].dataset)):
        print(f"{s.label:>22}  tau {fmt(s.tau):>5}  {fmt(s.tokens_per_second, '.1f'):>7} tokens/s  "
              f"speedup vs ar {fmt(s.speedup_vs_ar)}", file=sys.stderr)
    print(f"wrote {out / REPORT_FILE}, {out / RUNS_FILE}, {out / SUMMARY_FILE}", file=sys.stderr)
    return 0
