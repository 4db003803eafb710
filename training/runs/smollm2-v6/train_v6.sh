#!/usr/bin/env bash
# The sixth drafter's sitting (2-core AMD EPYC, no GPU): the shipped fifth drafter continued online on all
# 14,904 regenerated first turns (the 11,008 trained on before and the 3,896 never seen), in a new order
# (--seed 2), head and backbone together. Two runs side by side at one torch thread each, equal CPU time,
# differing only in anchors per sequence (32, the recipe so far, vs 128: 3.7x the rows per step for ~1.8x the
# step time, results/training/anchor_cost_cpu_amd.md: 6.2 vs 11.2 s per 8-sequence step at 2 threads).
# Usage: train_v6.sh 32|128
set -u
cd "$(dirname "$0")/../../.."  # the repository root
A=$1
D=training/data/smollm2-sharegpt,training/data/smollm2-sharegpt-rest
S=treeflash/checkpoints/smollm2-135m-instruct-treeflash   # the fifth drafter
R=$HOME/.cache/treeflash/runs/s20
TF=.venv/bin/treeflash
mkdir -p $R
if [ "$A" = 32 ]; then  # the fifth drafter on the held-out records of all the data, before any training
    OMP_NUM_THREADS=1 $TF train head --data $D --init $S --out $R/baseline-v5 --finetune-backbone --anchors 32 \
        --batch-size 8 --max-steps 0 > $R/baseline-v5.log 2>&1
fi
OMP_NUM_THREADS=1 nice -n 5 $TF train head --data $D --init $S --out $R/head-a$A --finetune-backbone --lr 6e-4 \
    --anchors $A --batch-size 8 --seed 2 --time-budget 125 --eval-every 100 --save-every 25 \
    --export $R/export-a$A --export-dtype bfloat16 > $R/head-a$A.log 2>&1
echo done
