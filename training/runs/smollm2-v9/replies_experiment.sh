#!/usr/bin/env bash
# Does text the target did not write help? The eighth drafter continued for 40 minutes on ShareGPT's own
# replies (training/data/smollm2-sharegpt-replies: `treeflash train data --prompts sharegpt-replies --responses
# dataset`, no generation) with the target's greedy tokens as labels (--labels target) and its distributions for
# the head's KL; two runs side by side at one torch thread each on a 2-core AMD EPYC: the default position
# weights (gamma 4 for block 8) and gamma 0.5 (almost only position 1, whose label the drafter can infer: deeper
# labels depend on ShareGPT's tokens in between, which the drafter does not see).
set -u
cd "$(dirname "$0")/../../.."  # the repository root
D=training/data/smollm2-sharegpt-replies
S=treeflash/checkpoints/smollm2-135m-instruct-treeflash   # the eighth drafter
R=$HOME/.cache/treeflash/runs/s23
TF=.venv/bin/treeflash
mkdir -p $R
common="--data $D --init $S --finetune-backbone --lr 2e-4 --anchors 128 --batch-size 8 --seed 5 --labels target
        --time-budget 40 --eval-every 40 --save-every 20 --export-dtype bfloat16"
OMP_NUM_THREADS=1 nice -n 5 $TF train head $common --out $R/replies-g4 --export $R/export-replies-g4 > $R/replies-g4.log 2>&1 &
OMP_NUM_THREADS=1 nice -n 5 $TF train head $common --gamma 0.5 --out $R/replies-g05 --export $R/export-replies-g05 > $R/replies-g05.log 2>&1 &
wait
echo done
