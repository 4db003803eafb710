#!/usr/bin/env bash
# A deeper drafter that starts from the trained one: the eighth drafter grown to 2 layers (`--add-layers 1`: the
# new layer starts as the identity, so the run starts exactly at the eighth's figures) and trained with its
# recipe (head and backbone, lr 2e-4, 128 anchors, 8 sequences a step) for 40 minutes at one torch thread on a
# 2-core AMD EPYC, beside the later-turn regeneration on the other core.
set -u
cd "$(dirname "$0")/../../.."  # the repository root
D=training/data/smollm2-sharegpt,training/data/smollm2-sharegpt-rest
S=treeflash/checkpoints/smollm2-135m-instruct-treeflash   # the eighth drafter
R=$HOME/.cache/treeflash/runs/s23
mkdir -p $R
OMP_NUM_THREADS=1 nice -n 5 .venv/bin/treeflash train head --data $D --init $S --add-layers 1 --out $R/grown-L2 \
    --finetune-backbone --lr 2e-4 --anchors 128 --batch-size 8 --seed 6 --time-budget 40 --eval-every 40 \
    --save-every 20 --export $R/export-grown-L2 --export-dtype bfloat16 > $R/grown-L2.log 2>&1
echo done
