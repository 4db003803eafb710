#!/usr/bin/env bash
# The fourteenth drafter (the shipped one) continued on first turns no drafter has trained on: 8,064-14,903
# (smollm2-sharegpt shards 126-171 and all of smollm2-sharegpt-rest, ~6,840 records), with the code records regenerated
# since the twelfth (smollm2-python-functions shards 32-64: 52-64 never trained on, 32-51 drawn about once by the v14
# run), so that about one sequence in four is code, as in the v14 run.
# The v14 recipe (head and backbone, 128 anchors, 8 sequences a step, peak lr 1e-4), a new seed (15). It starts from
# the fourteenth in float32: the uniform average of the twelfth and the v14 run, rebuilt with --dtype float32 (the
# shipped checkpoint is its bfloat16 export).
# It validates on the same 64 held-out records as the v14 run (the lineage's 32 first turns and the 32 held-out code
# records), which are never trained on: the data files below are built without them, and they come in a file of their own.
# Run as: train_v15.sh 85 2
# Usage: train_v15.sh MINUTES [THREADS]   (the same arguments resume the run)
set -eu
cd "$(dirname "$0")/../../.."  # the repository root
MINUTES=$1 THREADS=${2:-2}
H=training/runs/smollm2-v8/held_out.json,training/runs/smollm2-v11/held_out_code.json
R=$HOME/.cache/treeflash/runs/s31
S=$R/fourteenth-f32   # the fourteenth drafter in float32
mkdir -p $R/data
if [ ! -s $S/model.safetensors ]; then
    V12=$HOME/.cache/treeflash/runs/s28/v12/drafter V14=$HOME/.cache/treeflash/runs/s30/v14/drafter
    [ -d $V12 ] && [ -d $V14 ] || { echo "train_v15.sh: the float32 twelfth ($V12) and v14 ($V14) drafters are needed to rebuild the fourteenth in float32; run train_v12.sh and train_v14.sh first" >&2; exit 1; }
    .venv/bin/treeflash train average $S $V12 $V14 --dtype float32
fi
.venv/bin/python training/runs/split_data.py $R/data $H code=smollm2-python-functions:32-64 first=smollm2-sharegpt:126-171+smollm2-sharegpt-rest \
    --held-from smollm2-python-functions:0-31+smollm2-sharegpt+smollm2-sharegpt-rest
D=$R/data/code.jsonl,$R/data/first.jsonl,$R/data/held.jsonl
OMP_NUM_THREADS=$THREADS nice -n 5 .venv/bin/treeflash train head --data $D --held-out $H \
    --init $S --out $R/v15 --finetune-backbone --lr 1e-4 --anchors 128 --batch-size 8 --seed 15 \
    --time-budget $MINUTES --eval-every 128 --save-every 10 --export $R/export-v15 --export-dtype bfloat16 \
    > $R/v15.log 2>&1
echo done
