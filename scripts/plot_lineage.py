"""Every shipped drafter on one learning curve: held-out chain tau and position-1 agreement against the training
its lineage has had in total, with a log-linear fit and where that fit would reach a goal.

    python scripts/plot_lineage.py LINEAGE.json VALIDATIONS OUT [--goal 3.0] [--fit-from third]

LINEAGE.json (training/runs/lineage/lineage.json) lists the drafters, oldest first, each with the training logs
of the runs that made it (continuing its "parent", if named). VALIDATIONS is the folder that
training/runs/lineage/validate_lineage.sh wrote (NAME.json per drafter: the same held-out records, anchors and
seeds for all). Writes OUT.md (the table, the fit) and OUT.png. Needs matplotlib (the `bench` extra).

The training a drafter has had is counted in labelled rows: one row is one block position trained on (a block
of 8 has up to 7), summed over every step of every run in its lineage. Runs that did not log their rows (the
first drafter's) count `rows_per_step` from the lineage file, marked as estimated.
"""

from __future__ import annotations

import argparse
import json
import math
import textwrap
from pathlib import Path

from _output import write_markdown


def run_totals(log: Path, until_step: int | None = None, rows_per_step: float | None = None) -> dict:
    """Steps, sequence passes, labelled rows and training seconds of one run's log (the last record of each
    step wins: a resumed run logs a step again)."""
    steps: dict[int, dict] = {}
    for line in log.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if "loss" in record and (until_step is None or record["step"] <= until_step):
                steps[record["step"]] = record
    if not steps:
        raise SystemExit(f"{log} has no training steps; check the lineage file's logs")
    estimated = any("rows" not in r for r in steps.values())
    if estimated and rows_per_step is None:
        raise SystemExit(f"{log} does not log its rows; give the drafter a rows_per_step in the lineage file")
    rows = sum(r.get("rows", rows_per_step) for r in steps.values())
    return {"steps": len(steps), "sequences": sum(r.get("sequences", 1) for r in steps.values()), "rows": rows,
            "seconds": max(r["seconds"] for r in steps.values()), "estimated": estimated}


def lineage_totals(spec: dict) -> tuple[dict[str, dict], dict[str, dict]]:
    """Per drafter, the training of its own runs and the cumulative training of its lineage (its parent's, then
    its own)."""
    own: dict[str, dict] = {}
    totals: dict[str, dict] = {}
    for drafter in spec["drafters"]:
        zero = {"steps": 0, "sequences": 0, "rows": 0, "seconds": 0.0, "estimated": False}
        mine = dict(zero)
        for log in drafter["logs"]:
            run = run_totals(Path(log), drafter.get("until_step"), drafter.get("rows_per_step"))
            for key in ("steps", "sequences", "rows", "seconds"):
                mine[key] += run[key]
            mine["estimated"] = mine["estimated"] or run["estimated"]
        before = totals[drafter["parent"]] if "parent" in drafter else zero
        totals[drafter["name"]] = {k: (before[k] or mine[k]) if k == "estimated" else before[k] + mine[k]
                                   for k in zero}
        own[drafter["name"]] = mine
    return own, totals


def fit_log_linear(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b log10(x)."""
    lx = [math.log10(x) for x in xs]
    mx, my = sum(lx) / len(lx), sum(ys) / len(ys)
    b = sum((u - mx) * (v - my) for u, v in zip(lx, ys)) / sum((u - mx) ** 2 for u in lx)
    return my - b * mx, b


def main(lineage: str, validations: str, out: str, goal: float, fit_from: str = "third") -> None:
    spec = json.loads(Path(lineage).read_text())
    own, totals = lineage_totals(spec)
    names = [d["name"] for d in spec["drafters"]]
    missing = [n for n in names if not (Path(validations) / f"{n}.json").is_file()]
    if missing:
        raise SystemExit(f"no validation for {', '.join(missing)} in {validations}; run "
                         "training/runs/lineage/validate_lineage.sh first")
    metrics = {n: json.loads((Path(validations) / f"{n}.json").read_text()) for n in names}
    shipped = [d["name"] for d in spec["drafters"] if d.get("commit")]  # candidates (no commit) are not fitted
    if fit_from not in shipped:
        raise SystemExit(f"--fit-from {fit_from!r} is not a shipped drafter of {lineage} ({', '.join(shipped)})")
    fitted = shipped[shipped.index(fit_from):]
    xs = [totals[n]["rows"] for n in fitted]

    lines = ["# Every shipped drafter on one learning curve", "",
             f"`python scripts/plot_lineage.py {lineage} {validations} {out}`; validations by "
             "`training/runs/lineage/validate_lineage.sh` (teacher-forced, the 32 held-out first turns, 128 anchors, "
             "the same anchors and seeds for every drafter). Training is cumulative over each drafter's lineage; "
             "minutes are training time on whichever machine ran it, at one thread unless a note says otherwise.", "",
             "| drafter | steps | sequence passes | labelled rows | training min | marginal chain tau | "
             "conditional chain tau | position 1 marginal / conditional | anchor sensitivity |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        t, m = totals[n], metrics[n]
        rows = f"{t['rows'] / 1e6:.2f}M" + (" (est.)" if t["estimated"] else "")
        name = n if n in shipped else f"{n} (not shipped)"
        lines.append(f"| {name} | {t['steps']:,} | {t['sequences']:,} | {rows} | {t['seconds'] / 60:.0f} | "
                     f"{m['marginal_chain_tau']:.3f} | {m['conditional_chain_tau']:.3f} | "
                     f"{m['marginal_top1'][0]:.2f} / {m['conditional_top1'][0]:.2f} | {m['anchor_sensitivity']:.2f} |")
    lines += [""] + [f"- {d['name']}: {d['note']}" for d in spec["drafters"] if d.get("note")]
    lines += ["", f"Log-linear fits over {fitted[0]} to {fitted[-1]} (tau = a + b log10 rows), and the rows at which "
              f"each fit reaches {goal} (an extrapolation far past the data, not a prediction):", ""]
    fits = {}
    for key, label in (("marginal_chain_tau", "marginal chain tau (DFlash's chain)"),
                       ("conditional_chain_tau", "conditional chain tau (TreeFlash's chain)"),
                       ("marginal_top1", "position-1 top-1, marginal"),
                       ("conditional_top1", "position-1 top-1, conditional")):
        ys = [metrics[n][key] if key.endswith("tau") else metrics[n][key][0] for n in fitted]
        a, b = fit_log_linear(xs, ys)
        fits[key] = (a, b)
        target = goal if key.endswith("tau") else 0.6
        reach = f"{10 ** ((target - a) / b):.3g} rows ({10 ** ((target - a) / b) / xs[-1]:.3g}x {fitted[-1]}'s)" \
            if b > 0 else "never (the fit does not rise)"
        lines.append(f"- {label}: {a:.3f} + {b:.3f} log10 rows, so +{b * math.log10(2):.3f} per doubling; "
                     f"reaches {target} at {reach}.")
    last = next(d for d in reversed(spec["drafters"]) if d["name"] in shipped)
    rate = own[last["name"]]["rows"] / (own[last["name"]]["seconds"] / 60)
    a, b = fits["marginal_chain_tau"]
    more = max(10 ** ((goal - a) / b) - xs[-1], 0) if b > 0 else math.inf
    lines += ["", f"At {last['name']}'s own rate ({rate:,.0f} rows per training minute, as its minutes are "
              f"counted above), the rows the marginal fit asks for beyond {fitted[-1]} would take {more / rate / 60:,.0f} "
              "such hours."]
    write_markdown("\n".join(lines) + "\n", out + ".md")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    for ax, keys, goal_line, ylabel in (
            (axes[0], ("marginal_chain_tau", "conditional_chain_tau"), goal, "held-out chain tau (teacher-forced)"),
            (axes[1], ("marginal_top1", "conditional_top1"), 0.6, "held-out position-1 top-1")):
        for key, color in zip(keys, ("tab:blue", "tab:orange")):
            value = (lambda n: metrics[n][key]) if key.endswith("tau") else (lambda n: metrics[n][key][0])
            label = key.split("_")[0]
            ax.plot([totals[n]["rows"] for n in shipped], [value(n) for n in shipped], marker="o", color=color,
                    label=label)
            candidates = [n for n in names if n not in shipped]
            if candidates:
                ax.scatter([totals[n]["rows"] for n in candidates], [value(n) for n in candidates], marker="o",
                           facecolors="none", edgecolors=color, zorder=3,
                           label=f"{label}, not shipped" if key.startswith("marginal") else None)
            a, b = fits[key]
            span = [xs[0], xs[-1] * 8]
            ax.plot(span, [a + b * math.log10(x) for x in span], linestyle=":", color=color,
                    label=f"{label} fit: +{b * math.log10(2):.3f} per doubling")
        if ax is axes[0]:  # numbered once, under the marginal points (names would crowd)
            for i, n in enumerate(names, 1):
                ax.annotate(str(i), (totals[n]["rows"], metrics[n]["marginal_chain_tau"]),
                            textcoords="offset points", xytext=(0, -12 - 8 * (i % 2)), fontsize=7, ha="center")
        ax.axhline(goal_line, color="grey", linestyle="--", linewidth=1, label=f"goal {goal_line}")
        ax.set_xscale("log")
        ax.set_xlabel("labelled rows trained on, cumulative over the lineage (log)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    title = ("Every shipped drafter (hollow: not shipped), validated alike (numbered in order: "
             + ", ".join(f"{i} {n}" for i, n in enumerate(names, 1)) + ")")
    fig.suptitle("\n".join(textwrap.wrap(title, 150)), fontsize=10)  # wrapped: the names outgrow one line
    fig.tight_layout()
    fig.savefig(out + ".png", dpi=110)
    print(f"wrote {out}.md and {out}.png")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lineage")
    parser.add_argument("validations")
    parser.add_argument("out", help="output path without extension: OUT.md and OUT.png")
    parser.add_argument("--goal", type=float, default=3.0, help="the chain tau to extrapolate to (default: 3.0)")
    parser.add_argument("--fit-from", default="third",
                        help="the first drafter in the fits (default: third, from which each drafter continues the "
                             "one before it, head included)")
    args = parser.parse_args()
    main(args.lineage, args.validations, args.out, args.goal, args.fit_from)
