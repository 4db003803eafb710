"""Where one drafter training step's time goes: examples, the padded drafter pass, the loss, the backward.

    python scripts/profile_training_step.py FEATURE_CACHE [--layers 1] [--threads 1]

Builds a fresh drafter like `treeflash train drafter` (block 8, 5 target layers, 8,192-token draft vocabulary,
8 sequences x 32 anchors), times 4 steps stage by stage, then prints torch's profiler table for one step.
"""

from __future__ import annotations

import argparse
import time

import torch

from treeflash.drafters import default_target_layer_ids, new_drafter
from treeflash.features import FeatureCache
from treeflash.targets import load_target
from treeflash.training import (CachedFeatures, TrainConfig, batch_hidden, batch_loss, draft_vocabulary,
                                make_example, position_weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    target = load_target()
    cache = FeatureCache(args.cache)
    vocab, _ = draft_vocabulary(cache.sequences[:500], 8192, always=target.eos_token_ids)
    drafter = new_drafter(target, num_hidden_layers=args.layers, block_size=8, draft_vocab=vocab,
                          target_layer_ids=default_target_layer_ids(target.num_layers, 5)).float()
    config = TrainConfig(features=args.cache, anchors=32, batch_size=8)
    source = CachedFeatures(cache, drafter.config.target_layer_ids)
    generator = torch.Generator().manual_seed(0)
    weights = position_weights(8, 4.0)
    drafter.train().requires_grad_(True)
    for step in range(4):
        t0 = time.perf_counter()
        batch = cache.sequences[step * 8:(step + 1) * 8]
        examples = [make_example(s, source, config, drafter, generator) for s in batch]
        t1 = time.perf_counter()
        batch_hidden(drafter, target, examples)
        t2 = time.perf_counter()
        loss, rows = batch_loss(drafter, target, examples, config, weights)
        t3 = time.perf_counter()
        loss.backward()
        t4 = time.perf_counter()
        print(f"step {step}: examples {t1 - t0:.3f} s, drafter pass {t2 - t1:.3f} s, whole forward with loss "
              f"{t3 - t2:.3f} s, backward {t4 - t3:.3f} s, {rows} labelled rows")
    with torch.profiler.profile() as prof:
        loss, _ = batch_loss(drafter, target, examples, config, weights)
        loss.backward()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
