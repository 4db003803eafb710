#!/usr/bin/env bash
# ShareGPT's later turns (each after the conversation so far; held-out conversations left out whole),
# regenerated as the target's float32 greedy replies through our own engine, at one torch thread beside other
# work on a 2-core AMD EPYC. Resumes where it stopped (finished shards are kept).
set -u
cd "$(dirname "$0")/../../.."  # the repository root
OMP_NUM_THREADS=1 nice -n 5 .venv/bin/treeflash train data --prompts sharegpt-turns \
    --out training/data/smollm2-sharegpt-turns --max-new-tokens 256 --max-prompt-tokens 512 --batch-size 64
