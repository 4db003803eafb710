#!/usr/bin/env bash
# The fourth drafter: two candidates side by side (one torch thread each) on the new chunk's features.
set -u
cd "$(dirname "$0")/../../.."  # the repository root
# The features first, two one-thread processes side by side (71 and 76 minutes on a 2-core AMD EPYC; the
# same now runs as one command with --workers 2 --skip 4224):
#   OMP_NUM_THREADS=1 treeflash train features --data training/data/smollm2-sharegpt --skip 4224 --limit 3456 \
#       --out ~/.cache/treeflash/features/smollm2-sharegpt-from4224
#   OMP_NUM_THREADS=1 treeflash train features --data training/data/smollm2-sharegpt --skip 7680 \
#       --out ~/.cache/treeflash/features/smollm2-sharegpt-from7680
C=$HOME/.cache/treeflash/features/smollm2-sharegpt-from4224,$HOME/.cache/treeflash/features/smollm2-sharegpt-from7680
R=$HOME/.cache/treeflash/runs/s18
S=treeflash/checkpoints/smollm2-135m-instruct-treeflash
TF=.venv/bin/treeflash
mkdir -p $R
# The third drafter on this chunk's held-out sequences, before any training.
OMP_NUM_THREADS=2 $TF train head --features $C --init $S --out $R/baseline-v3 --finetune-backbone --anchors 32 \
    --batch-size 8 --max-steps 0 > $R/baseline-v3.log 2>&1
# X: one stage, head and backbone together, from the third drafter.
(OMP_NUM_THREADS=1 $TF train head --features $C --init $S --out $R/head-v4x --finetune-backbone --lr 6e-4 --anchors 32 \
    --batch-size 8 --time-budget 25 --eval-every 200 --save-every 100 --export $R/export-v4x --export-dtype bfloat16 \
    > $R/head-v4x.log 2>&1) &
# Y: the backbone first (cross-entropy), then head and backbone.
(OMP_NUM_THREADS=1 $TF train drafter --features $C --init $S --out $R/drafter-v4y --lr 6e-4 --loss ce --anchors 32 \
    --batch-size 8 --time-budget 15 --eval-every 300 --save-every 100 > $R/drafter-v4y.log 2>&1 && \
 OMP_NUM_THREADS=1 $TF train head --features $C --init $R/drafter-v4y/drafter --out $R/head-v4y --finetune-backbone \
    --lr 6e-4 --anchors 32 --batch-size 8 --time-budget 9 --eval-every 200 --save-every 100 --export $R/export-v4y \
    --export-dtype bfloat16 > $R/head-v4y.log 2>&1) &
wait
echo done
