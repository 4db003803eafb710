#!/usr/bin/env bash
# The eighth drafter continued on first turns and later turns together (the later turns alone lost more on first
# turns than they gained: README, "The later turns alone"), with the eighth's recipe (head and backbone, peak lr
# 2e-4, 128 anchors, 8 sequences a step), online at one torch thread on a 2-core AMD EPYC beside the later turns'
# regeneration on the other core. The data is every regenerated record at the start, pinned by --max-sequences
# (turns-b, which grows, comes last); validation is on the held-out records of both earlier comparisons: the 32
# first turns every drafter is compared on and the 32 later turns of train_turns.sh (--held-out), so neither is
# trained on.
# Usage: train_mixed.sh N MINUTES  (N = the records in the four directories at the start)
set -u
cd "$(dirname "$0")/../../.."  # the repository root
N=$1 MINUTES=$2
T=training/data/smollm2-sharegpt
D=$T,$T-rest,$T-turns,$T-turns-b
H=training/runs/smollm2-v8/held_out.json,training/runs/smollm2-v9/held_out_turns.json
S=treeflash/checkpoints/smollm2-135m-instruct-treeflash   # the eighth drafter
R=$HOME/.cache/treeflash/runs/s25
mkdir -p $R
OMP_NUM_THREADS=1 nice -n 5 .venv/bin/treeflash train head --data $D --max-sequences $N --held-out $H --init $S \
    --out $R/mixed --finetune-backbone --lr 2e-4 --anchors 128 --batch-size 8 --seed 8 --time-budget $MINUTES \
    --eval-every 80 --save-every 20 --export $R/export-mixed --export-dtype bfloat16 > $R/mixed.log 2>&1
echo done
