"""TreeFlash's head stage with every row evaluated against rows on demand (`lazy_conditional_tree`).

Runs treeflash on the default target with its shipped drafter, greedy, at each budget, once evaluating all
1 + (D-1)*m head rows per round and once only the rows the search reaches. The trees are the same (tau must
match); the script reports head ms per round and rows evaluated per round. Writes Markdown.

    python scripts/head_rows.py results/speed/head_rows_cpu.md [--threads 2] [--budgets 4,8,16,64]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from pathlib import Path

import torch

import treeflash
import treeflash.decoding as decoding
from treeflash.decoding import DecodeConfig

from _output import write_markdown  # scripts/_output.py (scripts run as `python scripts/NAME.py`)

PROMPTS = (
    "Write a Python function that checks whether a number is prime, with tests.",
    "Explain in a short paragraph why the sky is blue.",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--budgets", default="4,8,16,64")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    decoder = treeflash.load()
    decoder.tuning = None  # the drafter's own m (16), whatever `treeflash tune` chose here
    prompts = [decoder.target.encode_prompt(p) for p in PROMPTS]
    rows_seen: list[int] = []
    passes: list[int] = []
    lazy_tree = decoding.lazy_conditional_tree

    def counting(root, parents, evaluate, budget, prefetch=None):
        calls = [0]

        def counted(rows):
            calls[0] += 1
            return evaluate(rows)

        tree, rows = lazy_tree(root, parents, counted, budget, prefetch)
        rows_seen.append(rows)
        passes.append(calls[0])
        return tree, rows

    decoding.lazy_conditional_tree = counting
    build_tree = decoding.build_tree
    decoder.generate(prompts[0], DecodeConfig(method="treeflash", max_new_tokens=8))  # warm-up: packing
    lines = [
        f"TreeFlash head stage, all rows vs rows on demand. Machine: {platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}; default target (float32), shipped "
        f"drafter ({str(next(decoder.drafter.parameters()).dtype).removeprefix('torch.')}), greedy, "
        f"{len(prompts)} prompts x {args.max_new_tokens} tokens. Command: `python scripts/head_rows.py "
        f"{' '.join(sys.argv[1:])}`.",
        "",
        "| budget | head rows | rows per round | head passes per round | tau | head ms per round | tree ms per round | tokens/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    m = decoder.drafter.config.candidate_tokens
    for budget in [int(b) for b in args.budgets.split(",")]:
        for lazy in (False, True):
            decoding.build_tree = lambda *a, _lazy=lazy, **kw: build_tree(*a, lazy_rows=_lazy, **kw)
            rows_seen.clear()
            passes.clear()
            results = [decoder.generate(p, DecodeConfig(method="treeflash", budget=budget,
                                                        max_new_tokens=args.max_new_tokens)) for p in prompts]
            decoding.build_tree = build_tree
            rounds = sum(r.rounds for r in results)
            acceptance = [a for r in results for a in r.acceptance_lengths]
            per = {s: 1000 * sum(r.stage_seconds.get(s, 0.0) for r in results) / rounds for s in ("head", "tree")}
            depth = min(decoder.drafter.block_size - 1, budget)
            rows = statistics.mean(rows_seen) if lazy else 1 + (depth - 1) * m
            calls = statistics.mean(passes) if lazy else 1
            tps = sum(r.new_tokens for r in results) / sum(r.seconds for r in results)
            lines.append(f"| {budget} | {'on demand' if lazy else 'all'} | {rows:.1f} | {calls:.2f} | "
                         f"{decoding.tau(acceptance):.2f} | {per['head']:.1f} | {per['tree']:.1f} | {tps:.1f} |")
    text = "\n".join(lines) + "\n"
    write_markdown(text, args.out)


if __name__ == "__main__":
    main()
