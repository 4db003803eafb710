"""Does decoding accept what the teacher-forced validation predicts?

Runs dflash (greedy, 256 new tokens) on the prompts of the first held-out records of a training run and prints,
per record, the share of rounds that reject the first drafted token (validation predicts 1 - position-1 top-1)
and how far the output follows the record (records regenerated in bfloat16 drift from float32 decoding).

    python scripts/decode_vs_validation.py [HELD_OUT.json] [COUNT]   # from the repository root

Defaults: training/runs/smollm2-v7/held_out.json, 6 records, the shipped drafter, 2 threads.
"""

from __future__ import annotations

import glob
import json
import sys

import torch

from treeflash.api import load
from treeflash.decoding import DecodeConfig


def held_out_records(ids: list[str]) -> dict[str, dict]:
    wanted, found = set(ids), {}
    for path in sorted(glob.glob("training/data/smollm2-sharegpt*/shard-*.jsonl")):
        with open(path) as f:
            for line in f:
                record = json.loads(line)
                if record["id"] in wanted:
                    found[record["id"]] = record
    return found


def main(held_out: str = "training/runs/smollm2-v7/held_out.json", count: int = 6) -> None:
    torch.set_num_threads(2)
    ids = json.load(open(held_out))[:count]
    records = held_out_records(ids)
    treeflash = load()
    rounds = rejected = 0
    for rid in ids:
        record = records[rid]
        result = treeflash.generate(record["prompt_ids"], DecodeConfig(method="dflash", max_new_tokens=256))
        out, ref = result.token_ids, record["response_ids"]
        common = next((i for i, (a, b) in enumerate(zip(out, ref)) if a != b), min(len(out), len(ref)))
        zero = sum(1 for a in result.acceptance_lengths if a == 0)
        rounds, rejected = rounds + len(result.acceptance_lengths), rejected + zero
        print(f"{rid}: prompt {len(record['prompt_ids'])}, output {len(out)}, record {len(ref)}, common prefix "
              f"{common}, tau {len(out) / max(1, result.rounds):.2f}, "
              f"rounds rejecting position 1 {zero / max(1, len(result.acceptance_lengths)):.2f}", flush=True)
    print(f"pooled: {rejected / rounds:.2f} of {rounds} rounds reject position 1")


if __name__ == "__main__":
    main(*sys.argv[1:2], *[int(a) for a in sys.argv[2:3]])
