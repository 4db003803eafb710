#!/usr/bin/env bash
# The twelfth drafter (the shipped one) continued on records its last three runs never saw: the 1,280 code records
# regenerated after them (smollm2-python-functions shards 32-51) and the 3,840 first turns 4,224-8,063 (smollm2-sharegpt
# shards 66-125; the v11-v13 runs drew ~1.6 passes from the first 4,200), so that again one sequence in four is code.
# The thirteenth candidate, the same recipe on repeated data, fell on the first turns: data, not steps, was the limit.
# The same recipe (head and backbone, 128 anchors, 8 sequences a step) but half the peak lr (1e-4, not 2e-4): the
# thirteenth's warm restart at 2e-4 cost 4% of held-out tau that it never won back. A new seed (14).
# It validates on the 32 first turns every drafter is compared on (runs/smollm2-v8/held_out.json, the position-1
# goal's set) and the 32 held-out code records (runs/smollm2-v11/held_out_code.json). Those records are never
# trained on: the data files below are built without them, and they come in a file of their own.
# Run as: train_v14.sh 90 2
# Usage: train_v14.sh MINUTES [THREADS]   (the same arguments resume the run)
set -eu
cd "$(dirname "$0")/../../.."  # the repository root
MINUTES=$1 THREADS=${2:-2}
H=training/runs/smollm2-v8/held_out.json,training/runs/smollm2-v11/held_out_code.json
S=$HOME/.cache/treeflash/runs/s28/v12/drafter   # the twelfth drafter in float32 (the shipped one is its bf16 export)
R=$HOME/.cache/treeflash/runs/s30
mkdir -p $R/data
.venv/bin/python training/runs/split_data.py $R/data $H code=smollm2-python-functions:32-51 first=smollm2-sharegpt:66-125 \
    --held-from smollm2-python-functions:0-31+smollm2-sharegpt+smollm2-sharegpt-rest
D=$R/data/code.jsonl,$R/data/first.jsonl,$R/data/held.jsonl
OMP_NUM_THREADS=$THREADS nice -n 5 .venv/bin/treeflash train head --data $D --held-out $H \
    --init $S --out $R/v14 --finetune-backbone --lr 1e-4 --anchors 128 --batch-size 8 --seed 14 \
    --time-budget $MINUTES --eval-every 128 --save-every 10 --export $R/export-v14 --export-dtype bfloat16 \
    > $R/v14.log 2>&1
echo done
