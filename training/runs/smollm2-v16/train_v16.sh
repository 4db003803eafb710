#!/usr/bin/env bash
# The fifteenth drafter (the shipped one) continued on records no drafter has trained on: the last code shards
# (smollm2-python-functions 65-75, 665 records) and the later turns regenerated on 2026-12-06 (smollm2-sharegpt-turns-b
# shards 20 on; LAST_TURNS names the last one written), with the first turns of smollm2-sharegpt-rest shards 26-60 (2,228
# of their 2,232: four are held out)
# (drawn about 0.44 times by the v15 run) so that first turns stay more than half of what a step sees.
# The v15 recipe (head and backbone, 128 anchors, 8 sequences a step, peak lr 1e-4), a new seed (16). It starts from
# the fifteenth in float32: the uniform average of the fourteenth in float32 and the v15 run, rebuilt with
# --dtype float32 (the shipped checkpoint is its bfloat16 export).
# It validates on the same 64 held-out records as the v14 and v15 runs (the lineage's 32 first turns and the 32
# held-out code records), which are never trained on.
# Run as: LAST_TURNS=39 train_v16.sh 65 2
# Usage: [LAST_TURNS=N] train_v16.sh MINUTES [THREADS]   (the same arguments resume the run)
set -eu
cd "$(dirname "$0")/../../.."  # the repository root
MINUTES=$1 THREADS=${2:-2} LAST_TURNS=${LAST_TURNS:?set LAST_TURNS to the last smollm2-sharegpt-turns-b shard to train on}
H=training/runs/smollm2-v8/held_out.json,training/runs/smollm2-v11/held_out_code.json
R=$HOME/.cache/treeflash/runs/s32
S=$R/fifteenth-f32   # the fifteenth drafter in float32
mkdir -p $R/data
if [ ! -s $S/model.safetensors ]; then
    F14=$HOME/.cache/treeflash/runs/s31/fourteenth-f32 V15=$HOME/.cache/treeflash/runs/s31/v15/drafter
    [ -d $F14 ] && [ -d $V15 ] || { echo "train_v16.sh: the float32 fourteenth ($F14) and v15 ($V15) drafters are needed to rebuild the fifteenth in float32; they are the v15 run of training/runs/smollm2-v15/train_v15.sh at commit f09108d" >&2; exit 1; }
    .venv/bin/treeflash train average $S $F14 $V15 --dtype float32
fi
.venv/bin/python training/runs/split_data.py $R/data $H code=smollm2-python-functions:65-75 \
    turns=smollm2-sharegpt-turns-b:20-$LAST_TURNS first=smollm2-sharegpt-rest:26-60 \
    --held-from smollm2-python-functions:0-31+smollm2-sharegpt+smollm2-sharegpt-rest
D=$R/data/code.jsonl,$R/data/turns.jsonl,$R/data/first.jsonl,$R/data/held.jsonl
OMP_NUM_THREADS=$THREADS nice -n 5 .venv/bin/treeflash train head --data $D --held-out $H \
    --init $S --out $R/v16 --finetune-backbone --lr 1e-4 --anchors 128 --batch-size 8 --seed 16 \
    --time-budget $MINUTES --eval-every 128 --save-every 10 --export $R/export-v16 --export-dtype bfloat16 \
    > $R/v16.log 2>&1
echo done
