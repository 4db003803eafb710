"""The analyses behind `treeflash bench --analyses`: draft distributions against the target's (teacher-forced),
and the tree drawn for the report.

Teacher forcing. For a prompt, the target's greedy continuation is the sequence s (prompt + continuation).
At an anchor position a in the continuation, the drafter drafts a block from the target features of
s[:a] with s[a] as the anchor, exactly as in decoding when s[a] is the bonus token. At depth d its output is
compared with the target's softmax for the token at a + d (the target's logits at row a + d - 1 of one
forward pass over s):
  marginal     the drafter's block distribution at depth d (what DFlash and DDTree use);
  conditional  TreeFlash's head at depth d given the true previous token s[a + d - 1].
Only depths whose true token exists (a + d < len(s)) count.

Plots and drawings of trees are `treeflash.bench.plots`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from ..decoding import DecodeConfig, Decoder, build_tree
from ..trees import DraftTree
from ..verification import Acceptance, follow
from .plots import TreePanel, draw_trees, plot_depth_stats, token_label

KS = (1, 4, 16)  # top-k sizes whose share of the target's mass is reported


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
