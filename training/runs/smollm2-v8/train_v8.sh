#!/usr/bin/env bash
# The eighth drafter's sitting (2-core AMD EPYC, no GPU): the shipped seventh drafter continued online on all
# 14,904 regenerated first turns with the seventh's recipe (128 anchors per sequence, head and backbone
# together, peak lr 2e-4), a new order (--seed 4), one run at one torch thread while the other core measures
# the drafters on the bench's own prompts (scripts/bench_prompt_validation.py). The seventh drafter's own
# held-out figures are the last line of training/runs/smollm2-v7/head-lr2e-4.log.jsonl (the held-out split does
# not depend on --seed).
set -u
cd "$(dirname "$0")/../../.."  # the repository root
D=training/data/smollm2-sharegpt,training/data/smollm2-sharegpt-rest
S=treeflash/checkpoints/smollm2-135m-instruct-treeflash   # the seventh drafter
R=$HOME/.cache/treeflash/runs/s22
TF=.venv/bin/treeflash
mkdir -p $R
OMP_NUM_THREADS=1 nice -n 5 $TF train head --data $D --init $S --out $R/head --finetune-backbone --lr 2e-4 \
    --anchors 128 --batch-size 8 --seed 4 --time-budget 110 --eval-every 80 --save-every 20 \
    --export $R/export --export-dtype bfloat16 > $R/head.log 2>&1
echo done
