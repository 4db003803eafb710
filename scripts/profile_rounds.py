"""Per-round stage times of every method, at a short and a long context.

Shows where a round's time goes and that nothing but the model's own attention grows with the context.
Uses an untrained drafter by default: acceptance is ~0, so this measures cost per round, not speedup (that
is `treeflash bench`'s job). Writes a Markdown table to OUT if given, and prints it.

    python scripts/profile_rounds.py [OUT.md] [--target DIR] [--drafter untrained|PATH] [--drafter-dtype float32]
        [--threads 1] [--budget 64] [--context 1024] [--new-tokens 48]
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

from treeflash import METHODS, DecodeConfig, Decoder, load_target
from treeflash.api import default_drafter_dtype, parse_dtype, resolve_drafter
from treeflash.decoding import STAGES

LONG_TEXT = "The quick brown fox jumps over the lazy dog while the sea keeps rolling in. " * 200


def profile(args: argparse.Namespace) -> str:
    if args.threads:
        torch.set_num_threads(args.threads)
    target = load_target(args.target)
    dtype = parse_dtype(args.drafter_dtype) if args.drafter_dtype else default_drafter_dtype(target)
    decoder = Decoder(target, resolve_drafter(args.drafter, target, dtype))
    prompts = {"short": target.encode_prompt("Write a haiku about the sea."),
               "long": target.encode_prompt(LONG_TEXT)[:args.context]}
    decoder.generate(prompts["short"], DecodeConfig(method="treeflash", max_new_tokens=8))  # warm-up
    stages = [s for s in STAGES if s != "prefill"]  # prefill is once per generation, not per round
    lines = [
        f"Per-round stage times (ms), {args.new_tokens} new tokens, drafter {args.drafter}, greedy. Machine: "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, drafter in {str(dtype).removeprefix('torch.')}. Command: "
        f"`python scripts/profile_rounds.py {' '.join(sys.argv[1:])}`.",
        "",
        "| context | prompt tokens | method | budget | rounds | tau | " + " | ".join(stages) + " | round total |",
        "|---|---|---|---|---|---|" + "---|" * len(stages) + "---|",
    ]
    for name, prompt in prompts.items():
        for method in METHODS:
            config = DecodeConfig(method=method, budget=None if method in ("ar", "dflash") else args.budget,
                                  max_new_tokens=args.new_tokens, stop_at_eos=False)
            r = decoder.generate(prompt, config)
            per_round = {s: 1000 * r.stage_seconds.get(s, 0.0) / r.rounds for s in stages}
            cells = " | ".join(f"{per_round[s]:.1f}" for s in stages)
            lines.append(f"| {name} | {len(prompt)} | {method} | {r.budget} | {r.rounds} | {r.tau:.2f} | {cells} "
                         f"| {sum(per_round.values()):.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default=None, help="Markdown file to write (default: only print)")
    parser.add_argument("--target", default=None, help="target directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--drafter", default="untrained", help="untrained (default), or a drafter directory")
    parser.add_argument("--drafter-dtype", default=None, help="default: treeflash.api.default_drafter_dtype")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--budget", type=int, default=64, help="draft nodes per round of ddtree and treeflash")
    parser.add_argument("--context", type=int, default=1024, help="prompt tokens of the long context")
    parser.add_argument("--new-tokens", type=int, default=48, help="new tokens per generation")
    args = parser.parse_args()
    report = profile(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report)
    print(report)


if __name__ == "__main__":
    main()
