#!/usr/bin/env bash
# The ninth drafter continued with its own recipe (head and backbone, peak lr 2e-4, 128 anchors, 8 sequences a
# step) on code: the target's answers to HumanEval-style prompts from the Python standard library
# (smollm2-python-functions, `treeflash train data --prompts python-functions`), then the newest later turns
# (turns-b), then the first turns (smollm2-sharegpt), of which N keeps the first ones only (N = code + 1,280 +
# 4,200 keeps ~4,200), so that about one sequence in five is code. It validates on the 14 of the 32 held-out
# first turns every drafter is compared on that those 4,200 hold, and on 32 held-out code records
# (held_out_code.json, the first 32 of the code's shard 0: never train on them).
# Usage: train_v11.sh N MINUTES [THREADS]   (the same arguments resume the run; N pins the data)
set -u
cd "$(dirname "$0")/../../.."  # the repository root
N=$1 MINUTES=$2 THREADS=${3:-2}
T=training/data/smollm2-sharegpt
D=training/data/smollm2-python-functions,$T-turns-b,$T
H=training/runs/smollm2-v11/held_out_first14.json,training/runs/smollm2-v11/held_out_code.json
S=treeflash/checkpoints/smollm2-135m-instruct-treeflash   # the ninth drafter
R=$HOME/.cache/treeflash/runs/s27
mkdir -p $R
OMP_NUM_THREADS=$THREADS nice -n 5 .venv/bin/treeflash train head --data $D --max-sequences $N --held-out $H \
    --init $S --out $R/v11 --finetune-backbone --lr 2e-4 --anchors 128 --batch-size 8 --seed 11 \
    --time-budget $MINUTES --eval-every 100 --save-every 10 --export $R/export-v11 --export-dtype bfloat16 \
    > $R/v11.log 2>&1
echo done
