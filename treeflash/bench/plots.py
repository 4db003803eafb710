"""The pictures of `treeflash bench --analyses`: bar charts of a benchmark, the teacher-forced statistics by depth,
and drawings of draft trees with the accepted path highlighted.

matplotlib is an optional dependency (the `bench` extra), imported only inside the plotting functions, and only
through `matplotlib.figure.Figure`, which renders with Agg and keeps no global pyplot state.
"""

from __future__ import annotations

import dataclasses
import math
import textwrap
from pathlib import Path
from typing import Sequence

from ..trees import DraftTree
from .metrics import BASELINES, best_budgets

COLOURS = {"ar": "#7f7f7f", "hf-generate": "#8c564b", "hf-prompt-lookup": "#e377c2", "dflash": "#1f77b4",
           "ddtree": "#ff7f0e", "treeflash": "#2ca02c"}
LOOKUP_COLOURS = {"ddtree": "#ffbb78", "treeflash": "#98df8a"}  # the same series with n-gram lookup: lighter
HIGHLIGHT = "#ffb000"


def _colour(summary) -> str:
    """A bench summary's colour: its method's, lighter with n-gram lookup."""
    if summary.lookup:
        return LOOKUP_COLOURS.get(summary.method, "#bbbbbb")
    return COLOURS.get(summary.method, "black")


# --------------------------------------------------------------------------------------------------
# Trees


def tree_layout(tree: DraftTree) -> tuple[list[float], list[float]]:
    """Coordinates for drawing: x = depth; y = leaves one unit apart in depth-first order (better children
    first, since entries are in best-first order), a parent midway between its first and last child."""
    n = tree.tokens.shape[0]
    children: list[list[int]] = [[] for _ in range(n)]
    for i, parent in enumerate(tree.parents.tolist()):
        if i:
            children[parent].append(i)
    y = [0.0] * n
    next_leaf = 0.0
    # Iterative post-order: a node is placed after all its children.
    stack = [(0, False)]
    while stack:
        node, expanded = stack.pop()
        if not children[node]:
            y[node], next_leaf = next_leaf, next_leaf + 1
        elif expanded:
            y[node] = (y[children[node][0]] + y[children[node][-1]]) / 2
        else:
            stack.append((node, True))
            stack.extend((child, False) for child in reversed(children[node]))
    return [float(d) for d in tree.depths.tolist()], y


def token_label(tokenizer, token: int, width: int = 12) -> str:
    """A token as a short, visible label: newlines and tabs escaped, a leading space shown as '_'."""
    text = tokenizer.decode([token]) if tokenizer is not None else str(token)
    text = text.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    if text.startswith(" "):
        text = "_" + text[1:]
    if not text:
        text = f"<{token}>"
    return text if len(text) <= width else text[: width - 1] + "…"


@dataclasses.dataclass
class TreePanel:
    """One tree to draw."""

    title: str
    tree: DraftTree
    accepted_path: list[int]  # tree indices from the root to the last accepted node
    labels: list[str]  # one per tree entry


def draw_trees(panels: Sequence[TreePanel], path: str | Path, caption: str | None = None) -> Path:
    """Draw trees one above the other: nodes by depth (x) and layout (y), labelled with their tokens; the
    accepted path in the highlight colour. Writes a PNG to `path`."""
    from matplotlib.figure import Figure

    layouts = [tree_layout(p.tree) for p in panels]
    heights = [max(max(y) + 1, 2) for _, y in layouts]
    depth = max(max(x) for x, _ in layouts)
    width = max(7.0, 1.35 * (depth + 1) + 1)
    caption = textwrap.fill(caption, width=int(width * 13)) if caption else None  # ~13 characters per inch
    fig = Figure(figsize=(width, 0.28 * sum(heights) + 1.2 * len(panels) + 0.3 * (caption or "").count("\n") + 0.6),
                 layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for ax, panel, (x, y) in zip(axes, panels, layouts):
        on_path = set(panel.accepted_path)
        for i, parent in enumerate(panel.tree.parents.tolist()):
            if i:
                hot = i in on_path
                ax.plot([x[parent], x[i]], [y[parent], y[i]], color=HIGHLIGHT if hot else "#b0b0b0",
                        linewidth=2.5 if hot else 0.8, zorder=1)
        for i, label in enumerate(panel.labels):
            face = HIGHLIGHT if i in on_path and i else ("#d9d9d9" if i == 0 else "white")
            ax.text(x[i], y[i], label, ha="center", va="center", fontsize=8, parse_math=False, zorder=2,
                    bbox=dict(boxstyle="round,pad=0.25", facecolor=face, edgecolor="#555555", linewidth=0.6))
        ax.set_title(panel.title, fontsize=10, loc="left")
        ax.set_xlim(-0.6, depth + 0.6)
        ax.set_ylim(max(y) + 0.7, -0.7)
        ax.set_xticks(range(int(depth) + 1))
        ax.set_xlabel("depth (0 = root, the last committed token)", fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
        ax.set_yticks([])
        for side in ("left", "right", "top"):
            ax.spines[side].set_visible(False)
    if caption:
        fig.suptitle(caption, fontsize=9)
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


# --------------------------------------------------------------------------------------------------
# Plots of a benchmark


def _new_figure(width: float, height: float, panels: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(1, panels, squeeze=False)[0]


def _legend_below(fig, axes) -> None:
    """One legend for the whole figure, under the plots, so that it never hides data."""
    entries: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    fig.legend(list(entries.values()), list(entries), loc="outside lower center", fontsize=7,
               ncol=min(len(entries), 4), frameon=False)


def _bars(ax, groups: list[str], series: list[tuple[str, str, list[float | None], list[str]]], ylabel: str,
          reference: float | None = None) -> None:
    """Grouped bars: series = [(legend label, colour, value per group, note per group)]."""
    width = 0.8 / max(len(series), 1)
    for i, (label, colour, values, notes) in enumerate(series):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        heights = [v if v is not None and not math.isnan(v) else 0.0 for v in values]
        ax.bar(xs, heights, width * 0.92, label=label, color=colour)
        for x, v, note in zip(xs, values, notes):
            if v is not None and not math.isnan(v):
                ax.text(x, v, f"{v:.2f}" + (f"\n{note}" if note else ""), ha="center", va="bottom", fontsize=6.5,
                        parse_math=False)
    if reference is not None:
        ax.axhline(reference, color="#555555", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.margins(y=0.15)
    ax.grid(axis="y", alpha=0.3)


def plot_results(summaries, out: str | Path) -> dict[str, str]:
    """Bar charts by dataset, the budget sweep and the acceptance-length histogram of a benchmark
    (`bench.summarize` output). Trees show their best budget (highest speedup over ar). Returns
    {title: file name} of the PNGs written into `out`."""
    out = Path(out)
    best = best_budgets(summaries)
    datasets = list(dict.fromkeys(s.dataset for s in summaries))
    first = {}  # series name -> one of its summaries
    for s in summaries:
        first.setdefault(s.series, s)
    methods = list(first)
    plots = {}

    def series(metric: str, which: list[str]):
        rows = []
        for m in which:
            tree = first[m].method in ("ddtree", "treeflash")
            values = [getattr(best[(d, m)], metric) if (d, m) in best else None for d in datasets]
            notes = [f"B{best[(d, m)].budget}" if tree and (d, m) in best else "" for d in datasets]
            rows.append((m + (" (best budget)" if tree else ""), _colour(first[m]), values, notes))
        return rows

    drafted = [m for m in methods if first[m].method not in BASELINES]
    fig, (ax,) = _new_figure(max(4.5, 1.6 + 1.1 * len(datasets) * max(len(drafted), 1) / 2), 4.0)
    _bars(ax, datasets, series("tau", drafted), "tau (tokens per round, bonus included)", reference=1.0)
    ax.set_title("tau by dataset", fontsize=10)
    _legend_below(fig, [ax])
    fig.savefig(out / "tau_by_dataset.png", dpi=120)
    plots["tau by dataset"] = "tau_by_dataset.png"

    baselines = [("speedup_vs_ar", "our ar")]
    if any(s.speedup_vs_hf_generate is not None for s in summaries):
        baselines.append(("speedup_vs_hf_generate", "transformers generate"))
    fig, axes = _new_figure(2.0 + 0.8 * len(baselines) * len(datasets) * max(len(methods), 1) / 2, 4.2,
                            panels=len(baselines))
    for ax, (metric, base) in zip(axes, baselines):
        _bars(ax, datasets, series(metric, methods), "speedup (ratio of time per token)", reference=1.0)
        ax.set_title(f"speedup over {base}", fontsize=10)
    _legend_below(fig, axes[:1])
    fig.savefig(out / "speedup_by_dataset.png", dpi=120)
    plots["speedup by dataset"] = "speedup_by_dataset.png"

    scope = "all" if "all" in datasets else datasets[0]
    pooled = [s for s in summaries if s.dataset == scope]
    fig, axes = _new_figure(9.0, 4.0, panels=2)
    for ax, metric, ylabel in zip(axes, ("tau", "speedup_vs_ar"), ("tau", "speedup over our ar")):
        for m in (m for m in methods if first[m].method in ("ddtree", "treeflash")):
            rows = sorted((s for s in pooled if s.series == m), key=lambda s: s.budget)
            if rows:
                ax.plot([s.budget for s in rows], [getattr(s, metric) for s in rows], marker="o", label=m,
                        color=_colour(rows[0]))
        for s in pooled:
            if s.method in ("dflash", "ar", "hf-prompt-lookup") and getattr(s, metric) is not None:
                ax.axhline(getattr(s, metric), color=COLOURS[s.method], linestyle="--", linewidth=1,
                           label=f"{s.method}" + (f" (chain of {s.budget})" if s.method == "dflash" else ""))
        budgets = sorted({s.budget for s in pooled if s.method in ("ddtree", "treeflash")})
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("node budget (draft nodes per round, root not counted)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} vs budget ({scope})", fontsize=10)
        ax.grid(alpha=0.3)
    _legend_below(fig, axes)
    fig.savefig(out / "budget_sweep.png", dpi=120)
    plots["tau and speedup vs budget"] = "budget_sweep.png"

    shown = [best[(scope, m)] for m in methods if first[m].method in ("dflash", "ddtree", "treeflash")
             and (scope, m) in best and best[(scope, m)].acceptance_histogram]
    if shown:
        longest = max(len(s.acceptance_histogram) for s in shown)
        fig, (ax,) = _new_figure(max(6.5, 0.45 * longest * len(shown) / 2 + 2), 3.8)
        width = 0.8 / len(shown)
        for i, s in enumerate(shown):
            hist = s.acceptance_histogram + [0] * (longest - len(s.acceptance_histogram))
            xs = [L + (i - (len(shown) - 1) / 2) * width for L in range(longest)]
            ax.bar(xs, [c / s.rounds for c in hist], width * 0.92, color=_colour(s),
                   label=f"{s.label} (tau {s.tau:.2f}, {s.rounds} rounds)")
        ax.set_xticks(range(longest))
        ax.set_xlabel("acceptance length (drafted tokens accepted per round, bonus not counted)", fontsize=9)
        ax.set_ylabel("share of rounds")
        ax.set_title(f"acceptance lengths ({scope})", fontsize=10)
        _legend_below(fig, [ax])
        ax.grid(axis="y", alpha=0.3)
        fig.savefig(out / "acceptance_lengths.png", dpi=120)
        plots["acceptance lengths"] = "acceptance_lengths.png"
    return plots


def plot_depth_stats(stats: dict, out: str | Path) -> dict[str, str]:
    """TV distance and top-k mass per depth, marginal against conditional. Returns {title: file name}."""
    out = Path(out)
    depth = stats["depth"]
    fig, (ax,) = _new_figure(6.5, 4.0)
    ax.plot(depth["depth"], depth["tv_marginal"], marker="o", color=COLOURS["ddtree"],
            label="marginal (DFlash / DDTree)")
    if depth["tv_conditional"] is not None:
        ax.plot(depth["depth"], depth["tv_conditional"], marker="s", color=COLOURS["treeflash"],
                label="conditional on the true previous token (TreeFlash)")
    ax.set_ylim(0, 1.03)
    ax.set_xlabel("depth d (block position, the token at anchor + d)")
    ax.set_ylabel("total variation to the target")
    ax.set_title(f"TV(target, drafter) by depth ({stats['anchors']} anchors, {stats['sequences']} prompts)", fontsize=10)
    ax.grid(alpha=0.3)
    _legend_below(fig, [ax])
    fig.savefig(out / "tv_by_depth.png", dpi=120)

    fig, (ax,) = _new_figure(6.5, 4.2)
    shades = ["#3b0f70", "#d62728", "#17becf", "#8c564b"]
    for i, k in enumerate(stats["ks"]):
        colour = shades[i % len(shades)]
        ax.plot(depth["depth"], depth["coverage_marginal"][str(k)], marker="o", color=colour, label=f"top-{k} marginal")
        if depth["coverage_conditional"] is not None:
            ax.plot(depth["depth"], depth["coverage_conditional"][str(k)], marker="s", linestyle="--", color=colour,
                    label=f"top-{k} conditional")
    ax.set_ylim(0, 1.03)
    ax.set_xlabel("depth d")
    ax.set_ylabel("target probability mass on the drafter's top-k")
    ax.set_title("target mass covered by the drafter's top-k", fontsize=10)
    ax.grid(alpha=0.3)
    _legend_below(fig, [ax])
    fig.savefig(out / "coverage_by_depth.png", dpi=120)
    return {"TV distance by depth": "tv_by_depth.png", "target mass on the drafter's top-k": "coverage_by_depth.png"}
