"""Regeneration throughput: our engine (`train data --engine treeflash`) against transformers' `generate()`.

The same ShareGPT training prompts (chat-templated, at most 384 tokens), greedy, the same response cap, once
through `Decoder.generate_batch` (method ar, all prompts batched, packed weights) and once through
`model.generate` (one left-padded batch), as `treeflash.data.regenerate` runs them. Reports tokens/s and how
many responses are identical. Writes Markdown.

    python scripts/regeneration_speed.py results/speed/regeneration_cpu.md [--prompts 32] [--max-new-tokens 128]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from treeflash.api import load
from treeflash.packing import cpu_model
from treeflash.data import load_prompts, transformers_responses
from treeflash.decoding import DecodeConfig

from _output import write_markdown  # scripts/_output.py (scripts run as `python scripts/NAME.py`)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    decoder = load(drafter="none")
    target, tokenizer = decoder.target, decoder.target.tokenizer
    prompts = []
    for p in load_prompts("sharegpt", limit=4 * args.prompts):
        ids = tokenizer.apply_chat_template(p.messages(), add_generation_prompt=True, return_dict=False)
        if len(ids) <= 384 and len(prompts) < args.prompts:
            prompts.append([int(i) for i in ids])
    target.pack()  # as the first generation would; kept out of the timing

    start = time.perf_counter()
    ours = decoder.generate_batch(prompts, DecodeConfig(method="ar", max_new_tokens=args.max_new_tokens),
                                  max_batch=len(prompts))
    ours_seconds = time.perf_counter() - start
    ours = [r.token_ids for r in ours]

    start = time.perf_counter()
    theirs = transformers_responses(target.model, tokenizer, prompts, args.max_new_tokens)
    theirs_seconds = time.perf_counter() - start

    ours_tokens, theirs_tokens = sum(map(len, ours)), sum(map(len, theirs))
    same = sum(a == b for a, b in zip(ours, theirs))
    text = "\n".join([
        f"{len(prompts)} ShareGPT prompts ({sum(map(len, prompts))} prompt tokens), greedy, up to "
        f"{args.max_new_tokens} new tokens, float32, all prompts in one batch. Machine: "
        f"{cpu_model()}, {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}. Command: `python scripts/regeneration_speed.py {' '.join(sys.argv[1:])}`.",
        "",
        "| engine | new tokens | seconds | tokens/s |",
        "|---|---|---|---|",
        f"| treeflash (`ar`, `generate_batch`) | {ours_tokens} | {ours_seconds:.1f} | {ours_tokens / ours_seconds:.1f} |",
        f"| transformers `generate()` | {theirs_tokens} | {theirs_seconds:.1f} | {theirs_tokens / theirs_seconds:.1f} |",
        "",
        f"Identical responses: {same} of {len(prompts)}; our engine at "
        f"{(ours_tokens / ours_seconds) / (theirs_tokens / theirs_seconds):.2f}x transformers' tokens/s.",
        "",
    ])
    write_markdown(text, args.out)


if __name__ == "__main__":
    main()
