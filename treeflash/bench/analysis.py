"""The analyses behind `treeflash bench --analyses`: plots of a benchmark, draft distributions against the
target's (teacher-forced), and drawings of draft trees.

Teacher forcing. For a prompt, the target's greedy continuation is the sequence s (prompt + continuation).
At an anchor position a in the continuation, the drafter drafts a block from the target features of
s[:a] with s[a] as the anchor, exactly as in decoding when s[a] is the bonus token. At depth d its output is
compared with the target's softmax for the token at a + d (the target's logits at row a + d - 1 of one
forward pass over s):
  marginal     the drafter's block distribution at depth d (what DFlash and DDTree use);
  conditional  TreeFlash's head at depth d given the true previous token s[a + d - 1].
Only depths whose true token exists (a + d < len(s)) count.

matplotlib is imported only inside the plotting functions, and only through `matplotlib.figure.Figure`,
which renders with Agg and keeps no global pyplot state.
"""

from __future__ import annotations

import dataclasses
import math
import textwrap
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from ..decoding import DecodeConfig, Decoder, build_tree
from ..trees import DraftTree
from ..verification import Acceptance, follow

KS = (1, 4, 16)  # top-k sizes whose share of the target's mass is reported
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
# Distances between distributions


def total_variation(p: Tensor, q: Tensor) -> Tensor:
    """Total variation distance 0.5 * sum_y |p(y) - q(y)| between probability rows.

    p, q: [..., V] probabilities over the same vocabulary. Returns [...], in [0, 1]."""
    return 0.5 * (p - q).abs().sum(dim=-1)


def top_k_coverage(p: Tensor, q: Tensor, k: int) -> Tensor:
    """The target's probability mass on the drafter's k most likely tokens: sum of p(y) over y in top-k(q).

    p (target), q (drafter): [..., V]. Returns [...]. k = 1 is the probability that the target's sample is
    the drafter's argmax; under greedy decoding what matters is whether the target's argmax is among them."""
    index = q.topk(min(k, q.shape[-1]), dim=-1).indices
    return p.gather(-1, index).sum(dim=-1)


def full_vocab_probs(logits: Tensor, columns: Tensor, vocab_size: int) -> Tensor:
    """Softmax of drafter logits [n, Vd] placed on the target's vocabulary: [n, V] float32, zero outside the
    draft vocabulary. columns [Vd]: the target token id of each logit column."""
    probs = torch.softmax(logits.float(), dim=-1)
    out = probs.new_zeros(probs.shape[0], vocab_size)
    out[:, columns.to(out.device)] = probs
    return out


# --------------------------------------------------------------------------------------------------
# Trees


def teacher_forced_acceptance(tree: DraftTree, sequence: Sequence[int], anchor: int) -> Acceptance:
    """What verification accepts when the target's tokens are `sequence` (its greedy continuation) and the
    tree's root is sequence[anchor]: the target's token after an entry at depth d is sequence[anchor + d + 1]
    (-1, matching nothing, past the end). Entries off the true path are never reached by the walk, so their
    target tokens do not matter."""
    after = [anchor + int(d) + 1 for d in tree.depths]
    chosen = torch.tensor([sequence[i] if i < len(sequence) else -1 for i in after])
    return follow(tree, chosen)


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
# Teacher-forced analysis


@dataclasses.dataclass
class _DepthSums:
    """Running sums per depth (index d - 1)."""

    depth: int
    ks: tuple[int, ...]
    conditional: bool

    def __post_init__(self):
        zeros = lambda: [0.0] * self.depth  # noqa: E731
        self.count = [0] * self.depth
        self.tv = {"marginal": zeros(), "conditional": zeros()}
        self.coverage = {(kind, k): zeros() for kind in ("marginal", "conditional") for k in self.ks}

    def add(self, kind: str, p: Tensor, q: Tensor) -> None:
        """p, q: [n, V] for depths 1..n."""
        for d, value in enumerate(total_variation(p, q).tolist()):
            self.tv[kind][d] += value
            if kind == "marginal":
                self.count[d] += 1
        for k in self.ks:
            for d, value in enumerate(top_k_coverage(p, q, k).tolist()):
                self.coverage[(kind, k)][d] += value

    def means(self) -> dict:
        used = [d for d in range(self.depth) if self.count[d]]

        def mean(values: list[float]) -> list[float]:
            return [values[d] / self.count[d] for d in used]

        kinds = ("marginal", "conditional") if self.conditional else ("marginal",)
        out = {"depth": [d + 1 for d in used], "count": [self.count[d] for d in used],
               "tv_marginal": mean(self.tv["marginal"]), "tv_conditional": None, "coverage_conditional": None}
        for kind in kinds:
            out[f"tv_{kind}"] = mean(self.tv[kind])
            out[f"coverage_{kind}"] = {str(k): mean(self.coverage[(kind, k)]) for k in self.ks}
        return out


@torch.inference_mode()
def teacher_forced(decoder: Decoder, sequences: Sequence[tuple[str, list[int], list[int]]], anchors: int,
                   generator: torch.Generator, ks: Sequence[int] = KS, draw_budget: int = 24) -> tuple[dict, dict | None]:
    """Draft distributions against the target's along the target's own continuations.

    sequences: [(name, prompt ids, continuation ids)]. Up to `anchors` anchor positions per sequence are
    drawn with `generator` from the continuation. Returns (statistics as a JSON-ready dict, the anchor to
    draw: the one whose TreeFlash tree (else DDTree tree) of `draw_budget` nodes accepts the most, with its
    trees, or None)."""
    target, drafter = decoder.target, decoder.drafter
    head = drafter.ar_approximation is not None
    depth = drafter.block_size - 1
    sums = _DepthSums(depth, tuple(ks), head)
    columns = drafter.token_ids(torch.arange(drafter.config.draft_vocab_size or target.vocab_size,
                                             device=target.device))
    methods = ("dflash", "ddtree", "treeflash") if head else ("dflash", "ddtree")
    accepted = {m: [] for m in methods}
    best, best_score, total = None, None, 0
    for name, prompt, continuation in sequences:
        sequence = list(prompt) + list(continuation)
        n = len(prompt)
        if len(continuation) < 2:
            continue
        out = target.forward(torch.tensor(sequence, device=target.device),
                             torch.arange(len(sequence), device=target.device), target.new_cache(len(sequence)),
                             feature_layers=drafter.config.target_layer_ids)
        candidates = len(sequence) - 1 - n  # anchors n .. len-2: at least depth 1 has a true token
        picks = torch.randperm(candidates, generator=generator)[:anchors].sort().values + n
        for anchor in picks.tolist():
            total += 1
            block = drafter.draft(target, sequence[anchor], out.features[:anchor],
                                  drafter.new_cache(anchor + drafter.block_size))
            reach = min(depth, len(sequence) - 1 - anchor)
            p = torch.softmax(out.logits[anchor: anchor + reach].float(), dim=-1)  # [reach, V]
            sums.add("marginal", p, full_vocab_probs(block.logits[:reach], columns, target.vocab_size))
            if head:
                parents = torch.tensor(sequence[anchor: anchor + reach], device=target.device)
                q = drafter.conditional_logits(target, block.hidden[:reach], parents)
                sums.add("conditional", p, full_vocab_probs(q, columns, target.vocab_size))
            trees = {m: build_tree(drafter, target, m, sequence[anchor], block, depth if m == "dflash" else draw_budget)
                     for m in methods}
            walks = {m: teacher_forced_acceptance(t, sequence, anchor) for m, t in trees.items()}
            for m, walk in walks.items():
                accepted[m].append(len(walk.tokens))
            score = (len(walks[methods[-1]].tokens), len(walks["ddtree"].tokens))
            if best_score is None or score > best_score:
                best_score = score
                best = {"name": name, "sequence": sequence, "prompt_tokens": n, "anchor": anchor,
                        "trees": trees, "walks": walks}
    labels = {"dflash": "dflash", "ddtree": f"ddtree@{draw_budget}", "treeflash": f"treeflash@{draw_budget}"}
    stats = {
        "sequences": sum(1 for _, _, c in sequences if len(c) >= 2), "anchors": total, "ks": list(ks),
        "depth": sums.means(), "draw_budget": draw_budget,
        "teacher_forced_acceptance": {labels[m]: sum(v) / len(v) for m, v in accepted.items() if v},
    }
    return stats, best


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
    from . import BASELINES, best_budgets

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


# --------------------------------------------------------------------------------------------------
# The bench entry point


def run_analyses(decoder: Decoder, prompts: dict[str, list[tuple[str, list[int]]]], runs, config,
                 out: str | Path) -> tuple[dict, dict[str, str]]:
    """Teacher-forced statistics and the tree drawing for `treeflash bench --analyses`.

    Prompts are taken round-robin over the datasets; their greedy continuations are reused from the
    benchmark's ar runs when it was greedy, else generated here. Returns (statistics, {title: PNG})."""
    out = Path(out)
    chosen, queues = [], [list(items) for items in prompts.values()]
    names = list(prompts)
    while len(chosen) < config.analysis_prompts and any(queues):
        for name, queue in zip(names, queues):
            if queue and len(chosen) < config.analysis_prompts:
                chosen.append((name, *queue.pop(0)))
    greedy = {(r.dataset, r.prompt_id): r.token_ids for r in runs if r.method == "ar" and config.temperature == 0}
    sequences = []
    for dataset, prompt_id, ids in chosen:
        continuation = greedy.get((dataset, prompt_id))
        if continuation is None:
            continuation = decoder.generate(ids, DecodeConfig(method="ar", max_new_tokens=config.max_new_tokens)).token_ids
        sequences.append((f"{dataset} {prompt_id}", ids, list(continuation)))
    generator = torch.Generator().manual_seed(config.seed)
    stats, best = teacher_forced(decoder, sequences, config.anchors, generator, draw_budget=config.draw_budget)
    plots = {}
    if stats["anchors"]:
        plots.update(plot_depth_stats(stats, out))
    if best is not None:
        tokenizer = decoder.target.tokenizer
        panels = []
        for method, title in (("ddtree", "DDTree"), ("treeflash", "TreeFlash")):
            if method not in best["trees"]:
                continue
            tree, walk = best["trees"][method], best["walks"][method]
            panels.append(TreePanel(
                title=f"{title}, {tree.size} nodes: {len(walk.tokens)} accepted + the bonus "
                      f"{token_label(tokenizer, walk.bonus)!r}",
                tree=tree, accepted_path=walk.path,
                labels=[token_label(tokenizer, t) for t in tree.tokens.tolist()]))
        sequence, anchor = best["sequence"], best["anchor"]
        before = _text(tokenizer, sequence[max(best["prompt_tokens"], anchor - 12): anchor + 1])
        after = _text(tokenizer, sequence[anchor + 1: anchor + 9])
        caption = f"{best['name']}, anchor at position {anchor}: …{before!r} → the target continues {after!r}"
        draw_trees(panels, out / "trees.png", caption=caption)
        plots["one DDTree and one TreeFlash tree, accepted path highlighted"] = "trees.png"
        stats["drawn"] = {"sequence": best["name"], "anchor": anchor,
                          **{m: {"nodes": best["trees"][m].size, "accepted": len(w.tokens)}
                             for m, w in best["walks"].items()}}
    return stats, plots


def _text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids))
