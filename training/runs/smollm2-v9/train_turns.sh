#!/usr/bin/env bash
# The eighth drafter continued on text it has never seen: the target's replies to ShareGPT's later turns
# (regenerate_turns.sh; only what was regenerated when the run started, pinned by --max-sequences), with the
# eighth's own recipe (head and backbone, peak lr 2e-4, 128 anchors, 8 sequences a step), at one torch thread on a
# 2-core AMD EPYC beside the regeneration on the other core. turns-b first: it is not growing during the run, so
# the first N records stay the same if the run is resumed after turns (a) has grown.
# Usage: train_turns.sh N MINUTES  (N = the records in both directories at the start)
set -u
cd "$(dirname "$0")/../../.."  # the repository root
N=$1 MINUTES=$2
D=training/data/smollm2-sharegpt-turns-b,training/data/smollm2-sharegpt-turns
S=treeflash/checkpoints/smollm2-135m-instruct-treeflash   # the eighth drafter
R=$HOME/.cache/treeflash/runs/s24
mkdir -p $R
OMP_NUM_THREADS=1 nice -n 5 .venv/bin/treeflash train head --data $D --max-sequences $N --init $S --out $R/turns \
    --finetune-backbone --lr 2e-4 --anchors 128 --batch-size 8 --seed 7 --time-budget $MINUTES --eval-every 40 \
    --save-every 20 --export $R/export-turns --export-dtype bfloat16 > $R/turns.log 2>&1
echo done
