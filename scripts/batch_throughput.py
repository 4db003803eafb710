"""Offline batched generation (`Decoder.generate_batch`) on the default model: tokens/s of 8 prompts at
max_batch 1, 4 and 8, per method, and whether every output equals the unbatched one.

    python scripts/batch_throughput.py --out results/serving/batch_cpu --max-new-tokens 64

Greedy, `stop_at_eos` off (every prompt yields exactly --max-new-tokens). tokens/s = all new tokens / wall
time of the whole generate_batch call, prefills included. Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from load_test import PROMPTS, machine  # noqa: E402  (the same prompts and machine line as the load test)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="ar,dflash,ddtree,treeflash")
    p.add_argument("--batches", default="1,4,8")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default="results/serving/batch_cpu")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import treeflash
    from treeflash.decoding import DecodeConfig

    decoder = treeflash.load()
    prompts = [decoder.target.encode_prompt(text) for text in PROMPTS]
    rows = []
    for method in args.methods.split(","):
        config = DecodeConfig(method=method, max_new_tokens=args.max_new_tokens, stop_at_eos=False)
        decoder.generate_batch(prompts[:2], config, max_batch=2)  # warm-up
        reference = None
        for batch in (int(b) for b in args.batches.split(",")):
            start = time.perf_counter()
            results = decoder.generate_batch(prompts, config, max_batch=batch)
            seconds = time.perf_counter() - start
            tokens = [r.token_ids for r in results]
            reference = reference or tokens
            rows.append({"method": method, "max_batch": batch, "budget": results[0].budget,
                         "tokens_per_second": sum(map(len, tokens)) / seconds, "seconds": seconds,
                         "tau": sum(r.tau for r in results) / len(results),
                         "same_as_batch_1": sum(a == b for a, b in zip(tokens, reference))})
            print(rows[-1], flush=True)
    command = " ".join(["python scripts/batch_throughput.py", *sys.argv[1:]])
    report = {"command": command, "machine": machine(), "load_average": os.getloadavg()[0], "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"# Batched generation offline (`Decoder.generate_batch`), {len(PROMPTS)} prompts x "
             f"{args.max_new_tokens} tokens, greedy", "", f"Command: `{command}`  ", f"Machine: {machine()}; "
             f"1-minute load average after: {report['load_average']:.1f}.", "",
             "| method | budget | max_batch | tokens/s | x max_batch 1 | tau | outputs equal to max_batch 1 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next(x for x in rows if x["method"] == r["method"])["tokens_per_second"]
        lines.append(f"| {r['method']} | {r['budget']} | {r['max_batch']} | {r['tokens_per_second']:.1f} | "
                     f"{r['tokens_per_second'] / base:.2f}x | {r['tau']:.2f} | {r['same_as_batch_1']}/{len(PROMPTS)} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
