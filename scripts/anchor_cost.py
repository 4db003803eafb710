"""What more anchors per sequence cost in an online head step: the target's feature pass vs the drafter's
forward and backward, for a few anchor counts (the shipped drafter, head and backbone trained together).

    python scripts/anchor_cost.py THREADS ANCHORS[,ANCHORS...]     e.g. 2 32,64,128

Two 8-sequence batches of training/data/smollm2-sharegpt-rest per anchor count (every 5th of its first 200
records), each timed once: the target pass scales with the tokens, the drafter with the labelled rows.
"""

from __future__ import annotations

import sys
import time

import torch

from treeflash import training as T
from treeflash.data import load_sequences
from treeflash.drafters import load_drafter
from treeflash.targets import load_target


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]))
    target = load_target(None, dtype=torch.float32)
    drafter = load_drafter("treeflash/checkpoints/smollm2-135m-instruct-treeflash", target, dtype=torch.float32)
    seqs = load_sequences("training/data/smollm2-sharegpt-rest")[:200:5]
    for anchors in [int(a) for a in sys.argv[2].split(",")]:
        config = T.TrainConfig(stage="head", finetune_backbone=True, anchors=anchors, batch_size=8)
        source = T.OnlineFeatures(target, drafter.config.target_layer_ids)
        weights = T.position_weights(drafter.block_size, T.default_gamma(drafter.block_size))
        module = T._BatchLoss(drafter, target, config, weights)
        for p in T.trainable_parameters(drafter, config):
            p.requires_grad_(True)
        for rep in range(2):
            batch = seqs[rep * 8:(rep + 1) * 8]
            t0 = time.perf_counter()
            ex = [T.make_example(s, source, config, drafter, torch.Generator().manual_seed(i))
                  for i, s in enumerate(batch)]
            ex = [e for e in ex if e is not None]
            t1 = time.perf_counter()
            loss, w, rows = module(ex)
            (loss / w).backward()
            t2 = time.perf_counter()
            print(f"anchors {anchors}: tokens {sum(e.tokens.numel() for e in ex)} target {t1 - t0:.2f}s "
                  f"drafter fwd+bwd {t2 - t1:.2f}s rows {rows}", flush=True)


if __name__ == "__main__":
    main()
