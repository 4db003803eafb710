#!/usr/bin/env bash
# The eleventh drafter continued with its own recipe (head and backbone, peak lr 2e-4, 128 anchors, 8 sequences a
# step) on the same data as the eleventh's run (which saw about 40% of it: 383 steps of 8 out of 7,482): the code
# (smollm2-python-functions), then turns-b, then the first turns, of which N keeps the first ones only (N = 7,528
# keeps 4,200, so that the 14 held-out first turns below are in the data): about one sequence in four is code.
# The seventy-minute continuation of the ninth on chat alone (the tenth candidate) stayed level; code moved in
# sixty-five minutes, so this run goes on with it, under a new seed (a new order). It validates on the same 14
# first turns and 32 code records as the eleventh's run (runs/smollm2-v11: never train on them).
# Run as: train_v12.sh 7528 100 2
# Usage: train_v12.sh N MINUTES [THREADS]   (the same arguments resume the run; N pins the data)
set -u
cd "$(dirname "$0")/../../.."  # the repository root
N=$1 MINUTES=$2 THREADS=${3:-2}
T=training/data/smollm2-sharegpt
D=training/data/smollm2-python-functions,$T-turns-b,$T
H=training/runs/smollm2-v11/held_out_first14.json,training/runs/smollm2-v11/held_out_code.json
S=treeflash/checkpoints/smollm2-135m-instruct-treeflash   # the eleventh drafter
R=$HOME/.cache/treeflash/runs/s28
mkdir -p $R
OMP_NUM_THREADS=$THREADS nice -n 5 .venv/bin/treeflash train head --data $D --max-sequences $N --held-out $H \
    --init $S --out $R/v12 --finetune-backbone --lr 2e-4 --anchors 128 --batch-size 8 --seed 12 \
    --time-budget $MINUTES --eval-every 100 --save-every 10 --export $R/export-v12 --export-dtype bfloat16 \
    > $R/v12.log 2>&1
echo done
