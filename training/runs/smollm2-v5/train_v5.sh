#!/usr/bin/env bash
# The fifth drafter's sitting (2-core AMD EPYC, no GPU): the shipped fourth drafter continued online (the
# target runs in each step; no feature cache on this fresh machine) on all 11,008 regenerated records, in
# another order than before (--seed 1), at one torch thread, beside the regeneration of the remaining first
# turns (training/data/smollm2-sharegpt-rest, the other thread).
set -u
cd "$(dirname "$0")/../../.."  # the repository root
D=training/data/smollm2-sharegpt
S=treeflash/checkpoints/smollm2-135m-instruct-treeflash   # the fourth drafter
R=$HOME/.cache/treeflash/runs/s19
TF=.venv/bin/treeflash
mkdir -p $R
# The fourth drafter on this data's held-out sequences, before any training.
OMP_NUM_THREADS=1 $TF train head --data $D --init $S --out $R/baseline-v4 --finetune-backbone --anchors 32 \
    --batch-size 8 --max-steps 0 > $R/baseline-v4.log 2>&1
# Head and backbone together (the fourth drafter's recipe), 40 minutes.
OMP_NUM_THREADS=1 nice -n 5 $TF train head --data $D --init $S --out $R/head-v5 --finetune-backbone --lr 6e-4 \
    --anchors 32 --batch-size 8 --seed 1 --time-budget 40 --eval-every 100 --save-every 50 --export $R/export-v5 \
    --export-dtype bfloat16 > $R/head-v5.log 2>&1
echo done
