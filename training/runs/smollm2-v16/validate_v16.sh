#!/usr/bin/env bash
# Validate the v16 run's drafters exactly as the v14 and v15 runs' were (smollm2-v14/validate_v14.sh: the run's 64
# held-out records, 32 held-out code records, 32 held-out later turns, the lineage's 32 first turns, the bench's
# 80 + 80 prompts), against the fifteenth as shipped (commit 629c01a), validated again under the same commands.
# Figures go to training/runs/smollm2-v16/validate-NAME-{run64,code,turns}.json, training/runs/lineage/validations/
# and results/training/bench_prompt_validation_v16_{mtbench,humaneval}_cpu_amd.*. ~25 min for two candidates.
# Usage: validate_v16.sh NAME=DRAFTER [NAME=DRAFTER ...]   (after train_v16.sh, whose data/ it reads)
set -eu
V=training/runs/smollm2-v16 R=$HOME/.cache/treeflash/runs/s32 BASE=fifteenth TAG=v16 \
    exec "$(dirname "$0")/../smollm2-v14/validate_v14.sh" "$@"
