#!/usr/bin/env bash
# Validate the v15 run's drafters exactly as the v14 run's were (smollm2-v14/validate_v14.sh: the run's 64 held-out
# records, 32 held-out code records, 32 held-out later turns, the lineage's 32 first turns, the bench's 80 + 80
# prompts), against the fourteenth as shipped (commit a2e070c), validated again under the same commands.
# Figures go to training/runs/smollm2-v15/validate-NAME-{run64,code,turns}.json, training/runs/lineage/validations/
# and results/training/bench_prompt_validation_v15_{mtbench,humaneval}_cpu_amd.*. ~25 min for two candidates.
# Usage: validate_v15.sh NAME=DRAFTER [NAME=DRAFTER ...]   (after train_v15.sh, whose data/ it reads)
set -eu
V=training/runs/smollm2-v15 R=$HOME/.cache/treeflash/runs/s31 BASE=fourteenth TAG=v15 \
    exec "$(dirname "$0")/../smollm2-v14/validate_v14.sh" "$@"
