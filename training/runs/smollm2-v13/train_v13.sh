#!/usr/bin/env bash
# The twelfth drafter continued with its own recipe (head and backbone, peak lr 2e-4, 128 anchors, 8 sequences a
# step) on the same data as the eleventh's and twelfth's runs: the code (smollm2-python-functions), then turns-b,
# then the first turns, of which N keeps the first ones only (N = 7,528 keeps 4,200, so that the 14 held-out first
# turns below are in the data): about one sequence in four is code. The twelfth's run (562 steps of 8) rose on every
# held-out set; the lineage fit puts held-out position-1 top-1 (conditional) at 0.6 about one more such run away.
# A new seed (a new order). It validates on the same 14 first turns and 32 code records as the eleventh's and
# twelfth's runs (runs/smollm2-v11: never train on them).
# Run as: train_v13.sh 7528 95 2
# Usage: train_v13.sh N MINUTES [THREADS]   (the same arguments resume the run; N pins the data)
set -u
cd "$(dirname "$0")/../../.."  # the repository root
N=$1 MINUTES=$2 THREADS=${3:-2}
T=training/data/smollm2-sharegpt
D=training/data/smollm2-python-functions,$T-turns-b,$T
H=training/runs/smollm2-v11/held_out_first14.json,training/runs/smollm2-v11/held_out_code.json
S=treeflash/checkpoints/smollm2-135m-instruct-treeflash   # the twelfth drafter
R=$HOME/.cache/treeflash/runs/s29
mkdir -p $R
OMP_NUM_THREADS=$THREADS nice -n 5 .venv/bin/treeflash train head --data $D --max-sequences $N --held-out $H \
    --init $S --out $R/v13 --finetune-backbone --lr 2e-4 --anchors 128 --batch-size 8 --seed 13 \
    --time-budget $MINUTES --eval-every 100 --save-every 10 --export $R/export-v13 --export-dtype bfloat16 \
    > $R/v13.log 2>&1
echo done
