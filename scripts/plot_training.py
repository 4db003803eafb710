"""Plot training runs from their log.jsonl against training minutes: loss, validation chain tau, and
per-position top-1 agreement at the last validation.

    python scripts/plot_training.py OUT.png RUN [RUN ...] [--baseline NAME=METRICS.json ...]

Each RUN is a `treeflash train drafter|head --out` directory or its log.jsonl file (e.g.
training/runs/smollm2/*.log.jsonl). A baseline is the JSON a `--max-steps 0` run prints (the drafter a run
starts from, validated on the same held-out records): a dashed line in the tau panel and its profile in the
last. Needs matplotlib (the `bench` extra).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(run: Path) -> tuple[list[dict], list[dict]]:
    log = run if run.is_file() else run / "log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "marginal_chain_tau" in r]
    return steps, evals


def smooth(values: list[float], window: int = 25) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def main(out: str, runs: list[str], baselines: list[str] = ()) -> None:
    import matplotlib  # optional (the `bench` extra): imported here so that --help works without it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for run in map(Path, runs):
        steps, evals = load(run)
        stage = "head" if any("conditional" in k and r.get(k) != r.get(k.replace("conditional", "marginal"))
                              for r in evals for k in r if k.startswith("conditional")) else "drafter"
        name = run.name.removesuffix(".jsonl").removesuffix(".log")
        label = f"{name} ({stage})"
        axes[0].plot([r["seconds"] / 60 for r in steps], smooth([r["loss"] for r in steps]), label=label)
        key = "conditional_chain_tau" if stage == "head" else "marginal_chain_tau"
        axes[1].plot([r["seconds"] / 60 for r in evals], [r[key] for r in evals], marker="o", label=label)
        if evals:
            last = evals[-1]
            depth = range(1, len(last["marginal_top1"]) + 1)
            axes[2].plot(depth, last["marginal_top1"], marker=".", label=f"{name}: marginal")
            if stage == "head":
                axes[2].plot(depth, last["conditional_top1"], marker=".", label=f"{name}: conditional")
    for spec in baselines:
        name, _, path = spec.rpartition("=")
        metrics = json.loads(Path(path).read_text())
        key = "conditional_chain_tau" if "conditional_chain_tau" in metrics else "marginal_chain_tau"
        line = axes[1].axhline(metrics[key], linestyle="--", color="gray", label=f"{name or Path(path).stem} (start)")
        depth = range(1, len(metrics["marginal_top1"]) + 1)
        for kind, style in (("marginal", ":"), ("conditional", "--")):
            if f"{kind}_top1" in metrics:
                axes[2].plot(depth, metrics[f"{kind}_top1"], linestyle=style, color=line.get_color(),
                             label=f"{name or Path(path).stem}: {kind} (start)")
    axes[0].set(title="training loss (moving average of 25 steps)", xlabel="training minutes", ylabel="loss", yscale="log")
    axes[1].set(title="validation: expected tau of a chain", xlabel="training minutes", ylabel="tau")
    axes[2].set(title="validation: top-1 agreement with the target, last eval", xlabel="block position",
                ylabel="top-1 agreement")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="the PNG to write")
    parser.add_argument("runs", nargs="+", help="`treeflash train --out` directories or their log.jsonl files")
    parser.add_argument("--baseline", action="append", default=[], metavar="NAME=METRICS.json",
                        help="a starting drafter's validation (the JSON of a `--max-steps 0` run); repeatable")
    args = parser.parse_args()
    main(args.out, args.runs, args.baseline)
