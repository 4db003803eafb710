#!/usr/bin/env bash
# The seventh drafter's sitting (2-core AMD EPYC, no GPU): the shipped sixth drafter continued online on all
# 14,904 regenerated first turns, 128 anchors per sequence (the sixth's recipe), a new order (--seed 3), head
# and backbone together. The sixth's runs dipped for ~90 minutes at the fresh-drafter peak of 6e-4
# (training/runs/smollm2-v6), so this sitting measures lower peaks for a continuation: two runs side by side at
# one torch thread each, equal CPU time, differing only in --lr. The sixth drafter's own held-out figures are
# the last line of training/runs/smollm2-v6/head-a128.log.jsonl (the held-out split does not depend on --seed).
# Usage: train_v7.sh 2e-4|1e-4
set -u
cd "$(dirname "$0")/../../.."  # the repository root
LR=$1
D=training/data/smollm2-sharegpt,training/data/smollm2-sharegpt-rest
S=treeflash/checkpoints/smollm2-135m-instruct-treeflash   # the sixth drafter
R=$HOME/.cache/treeflash/runs/s21
TF=.venv/bin/treeflash
mkdir -p $R
OMP_NUM_THREADS=1 nice -n 5 $TF train head --data $D --init $S --out $R/head-lr$LR --finetune-backbone --lr $LR \
    --anchors 128 --batch-size 8 --seed 3 --time-budget 100 --eval-every 80 --save-every 20 \
    --export $R/export-lr$LR --export-dtype bfloat16 > $R/head-lr$LR.log 2>&1
echo done
