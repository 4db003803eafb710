#!/usr/bin/env bash
# The ninth drafter continued with its own recipe (head and backbone, peak lr 2e-4, 128 anchors, 8 sequences a
# step) on every regenerated record, first and later turns (`--max-sequences N` pins the data while turns-b grows),
# validated on the same held-out first and later turns as the ninth (--held-out), now at THREADS torch threads:
# the lineage's learning curve (training/README.md, "What limits it") says sequence passes decide, so the run
# takes both cores when nothing else needs them.
# Usage: train_v10.sh N MINUTES [THREADS]   (the same arguments resume the run)
set -u
cd "$(dirname "$0")/../../.."  # the repository root
N=$1 MINUTES=$2 THREADS=${3:-2}
T=training/data/smollm2-sharegpt
D=$T,$T-rest,$T-turns,$T-turns-b
H=training/runs/smollm2-v8/held_out.json,training/runs/smollm2-v9/held_out_turns.json
S=treeflash/checkpoints/smollm2-135m-instruct-treeflash   # the ninth drafter
R=$HOME/.cache/treeflash/runs/s26
mkdir -p $R
OMP_NUM_THREADS=$THREADS nice -n 5 .venv/bin/treeflash train head --data $D --max-sequences $N --held-out $H \
    --init $S --out $R/v10 --finetune-backbone --lr 2e-4 --anchors 128 --batch-size 8 --seed 10 \
    --time-budget $MINUTES --eval-every 150 --save-every 10 --export $R/export-v10 --export-dtype bfloat16 \
    > $R/v10.log 2>&1
echo done
