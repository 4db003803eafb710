"""Compare drafter training recipes at equal training time on a feature cache; table and plot.

    python scripts/recipe_sweep.py CACHE RUNS_DIR OUT_PREFIX [--minutes M] [--jobs J] [--only a,b]

Each variant is `treeflash train drafter --features CACHE --time-budget M` with the base flags below plus
its own; J runs go at once, each on one torch thread (so on a 2-core machine, J = 2 gives every run one
core). Runs resume, so an interrupted sweep continues. Writes OUT_PREFIX.md (the last validation of each run,
with its command) and OUT_PREFIX.png (validation chain tau and position-1 top-1 against training minutes;
the clock excludes validation).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

BASE = ["--layers", "1", "--block-size", "8", "--lr", "1e-3", "--loss", "ce", "--anchors", "32", "--batch-size", "8",
        "--draft-vocab", "8192", "--eval-every", "100", "--save-every", "200", "--val-sequences", "32"]

VARIANTS = {  # name: flags that override BASE (a later flag wins in argparse)
    "base": [],
    "layers2": ["--layers", "2"],
    "layers3": ["--layers", "3"],
    "block16": ["--block-size", "16"],
    "kl": ["--loss", "kl"],
    "ce+kl": ["--loss", "ce+kl"],
    "lr3e-3": ["--lr", "3e-3"],
    "anchors64": ["--anchors", "64", "--batch-size", "4"],
    "anchors128": ["--anchors", "128"],
    "vocab4096": ["--draft-vocab", "4096"],
    "vocab16384": ["--draft-vocab", "16384"],
    "target-init": ["--init-from-target"],
    "old-recipe": ["--layers", "5", "--block-size", "16", "--lr", "6e-4", "--init-from-target", "--anchors", "96",
                   "--batch-size", "1"],
}


def command(cache: str, run: Path, minutes: float, flags: list[str]) -> list[str]:
    exe = str(Path(sys.executable).with_name("treeflash"))
    return [exe, "train", "drafter", "--features", cache, "--out", str(run), "--time-budget", str(minutes),
            *BASE, *flags]


def evals(run: Path) -> list[dict]:
    log = run / "log.jsonl"
    if not log.exists():
        return []
    return [r for r in map(json.loads, log.read_text().splitlines()) if "marginal_chain_tau" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache")
    parser.add_argument("runs")
    parser.add_argument("out")
    parser.add_argument("--minutes", type=float, default=3.5)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", default=None, help="comma-separated variant names")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(VARIANTS)
    unknown = set(names) - set(VARIANTS)
    if unknown:
        sys.exit(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    pending, running = list(names), {}
    while pending or running:
        while pending and len(running) < args.jobs:
            name = pending.pop(0)
            cmd = command(args.cache, runs / name, args.minutes, VARIANTS[name])
            print(f"start {name}: {shlex.join(cmd)}", flush=True)
            log = open(runs / f"{name}.stderr", "a")
            running[name] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log)
        time.sleep(5)
        for name, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                print(f"done {name}: exit {proc.returncode}", flush=True)
                del running[name]
    report(args, names, runs)


def report(args, names: list[str], runs: Path) -> None:
    rows = ["| variant | flags | steps | s/step | val chain tau | top-1 at positions 1 / 2 / 4 / 7 | anchor sensitivity |",
            "|---|---|---|---|---|---|---|"]
    for name in names:
        e = evals(runs / name)
        if not e:
            rows.append(f"| {name} | `{' '.join(VARIANTS[name])}` | - | - | - | - | - |")
            continue
        last = e[-1]
        top = last["marginal_top1"]
        picks = " / ".join(f"{top[i]:.2f}" for i in (0, 1, 3, 6) if i < len(top))
        rows.append(f"| {name} | `{' '.join(VARIANTS[name]) or '(base)'}` | {last['step']} | "
                    f"{last['seconds'] / last['step']:.2f} | {last['marginal_chain_tau']:.3f} | {picks} | "
                    f"{last['anchor_sensitivity']:.2f} |")
    text = [f"# Drafter recipes at equal training time ({args.minutes} min each, 1 torch thread, {args.jobs} at once)",
            "", f"Command: `python scripts/recipe_sweep.py {args.cache} {args.runs} {args.out} --minutes {args.minutes} "
            f"--jobs {args.jobs}`", "", f"Base flags: `{' '.join(BASE)}`", "",
            "Validation: 32 held-out sequences, teacher-forced, the target's greedy token as reference; the clock "
            "counts training only.", "", *rows, ""]
    Path(args.out + ".md").write_text("\n".join(text))
    print("\n".join(text))
    plot(args.out + ".png", names, runs, args.minutes)


def plot(out: str, names: list[str], runs: Path, minutes: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name in names:
        e = evals(runs / name)
        if not e:
            continue
        t = [r["seconds"] / 60 for r in e]
        axes[0].plot(t, [r["marginal_chain_tau"] for r in e], marker=".", label=name)
        axes[1].plot(t, [r["marginal_top1"][0] for r in e], marker=".", label=name)
        axes[2].plot(range(1, len(e[-1]["marginal_top1"]) + 1), e[-1]["marginal_top1"], marker=".", label=name)
    axes[0].set(title="validation: expected chain tau", xlabel="training minutes (1 thread)", ylabel="tau")
    axes[1].set(title="validation: top-1 at block position 1", xlabel="training minutes (1 thread)", ylabel="top-1")
    axes[2].set(title=f"per-position top-1 after {minutes} min", xlabel="block position", ylabel="top-1")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
