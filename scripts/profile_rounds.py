"""Per-round stage times of every method on the default target, at a short and a long context.

Shows where a round's time goes and that nothing but the model's own attention grows with the context.
Uses an untrained drafter: acceptance is ~0, so this measures cost per round, not speedup (that is
`treeflash bench`'s job). Writes a Markdown table to the path given (default: stdout).

    python scripts/profile_rounds.py results/engine/stage_times_cpu.md [--drafter-dtype float32] [--threads 1]
"""

from __future__ import annotations

import argparse
import platform

import sys

import torch

from treeflash.decoding import METHODS, STAGES, DecodeConfig, Decoder
from treeflash.drafters import new_drafter
from treeflash.targets import load_target

NEW_TOKENS = 48
BUDGET = 64


def main(out: str | None, drafter_dtype: str | None, threads: int | None) -> None:
    from treeflash.api import default_drafter_dtype, parse_dtype

    if threads:
        torch.set_num_threads(threads)
    target = load_target()
    dtype = parse_dtype(drafter_dtype) if drafter_dtype else default_drafter_dtype(target)
    decoder = Decoder(target, new_drafter(target).to(dtype))
    short = target.encode_prompt("Write a haiku about the sea.")
    text = "The quick brown fox jumps over the lazy dog while the sea keeps rolling in. " * 80
    long = target.encode_prompt(text)[:1024]
    rows = []
    decoder.generate(short, DecodeConfig(method="treeflash", max_new_tokens=8))  # warm-up
    for name, prompt in (("short", short), ("long", long)):
        for method in METHODS:
            config = DecodeConfig(method=method, budget=None if method in ("ar", "dflash") else BUDGET,
                                  max_new_tokens=NEW_TOKENS, stop_at_eos=False)
            r = decoder.generate(prompt, config)
            per_round = {s: 1000 * r.stage_seconds.get(s, 0.0) / r.rounds for s in STAGES if s != "prefill"}
            rows.append((name, len(prompt), method, r.budget, r.rounds, r.tau, per_round,
                         1000 * sum(per_round.values())))
    lines = [
        f"Per-round stage times (ms), {NEW_TOKENS} new tokens, untrained drafter, greedy. Machine: "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, drafter in {str(dtype).removeprefix('torch.')}. Command: "
        f"`python scripts/profile_rounds.py {' '.join(sys.argv[1:])}`.",
        "",
        "| context | prompt tokens | method | budget | rounds | tau | " + " | ".join(s for s in STAGES[1:]) + " | round total |",
        "|---|---|---|---|---|---|" + "---|" * (len(STAGES) - 1) + "---|",
    ]
    for name, n, method, budget, rounds, tau, per_round, total in rows:
        cells = " | ".join(f"{per_round[s]:.1f}" for s in STAGES[1:])
        lines.append(f"| {name} | {n} | {method} | {budget} | {rounds} | {tau:.2f} | {cells} | {total / 1000:.1f} |")
    report = "\n".join(lines) + "\n"
    if out:
        from pathlib import Path

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(report)
    print(report)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=None)
    parser.add_argument("--drafter-dtype", default=None, help="default: treeflash.api.default_drafter_dtype")
    parser.add_argument("--threads", type=int, default=None)
    a = parser.parse_args()
    main(a.out, a.drafter_dtype, a.threads)
