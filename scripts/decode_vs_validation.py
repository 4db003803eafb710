"""Does decoding accept what the teacher-forced validation predicts?

Runs dflash (greedy, 256 new tokens) on the prompts of the first held-out records of a training run and prints,
per record, the share of rounds that reject the first drafted token (validation predicts 1 - position-1 top-1)
and how far the output follows the record (records regenerated in bfloat16 drift from float32 decoding).

    python scripts/decode_vs_validation.py [HELD_OUT.json] [COUNT] [DATA]   # from the repository root

Defaults: training/runs/smollm2-v7/held_out.json, 6 records, the data the seventh drafter trained on (DATA as
`treeflash train --data`), the shipped drafter, 2 threads.
"""

from __future__ import annotations

import json
import sys

import torch

from treeflash.api import load
from treeflash.data import load_sequences
from treeflash.decoding import DecodeConfig

DATA = "training/data/smollm2-sharegpt,training/data/smollm2-sharegpt-rest"


def main(held_out: str = "training/runs/smollm2-v7/held_out.json", count: int = 6, data: str = DATA) -> None:
    torch.set_num_threads(2)
    ids = json.load(open(held_out))[:count]
    wanted = set(ids)
    records = {seq.id: seq for seq in load_sequences(data) if seq.id in wanted}
    treeflash = load()
    rounds = rejected = 0
    for rid in ids:
        seq = records[rid]
        prompt, ref = seq.tokens[:seq.prompt_length], seq.tokens[seq.prompt_length:]
        result = treeflash.generate(prompt, DecodeConfig(method="dflash", max_new_tokens=256))
        out = result.token_ids
        common = next((i for i, (a, b) in enumerate(zip(out, ref)) if a != b), min(len(out), len(ref)))
        zero = sum(1 for a in result.acceptance_lengths if a == 0)
        rounds, rejected = rounds + len(result.acceptance_lengths), rejected + zero
        print(f"{rid}: prompt {len(prompt)}, output {len(out)}, record {len(ref)}, common prefix "
              f"{common}, tau {len(out) / max(1, result.rounds):.2f}, "
              f"rounds rejecting position 1 {zero / max(1, len(result.acceptance_lengths)):.2f}", flush=True)
    print(f"pooled: {rejected / rounds:.2f} of {rounds} rounds reject position 1")


if __name__ == "__main__":
    main(*sys.argv[1:2], *[int(a) for a in sys.argv[2:3]], *sys.argv[3:4])
