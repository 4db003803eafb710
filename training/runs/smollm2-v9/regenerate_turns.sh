#!/usr/bin/env bash
# ShareGPT's later turns (each after the conversation so far; held-out conversations left out whole),
# regenerated as the target's float32 greedy replies through our own engine: two processes of one torch thread
# on a 2-core AMD EPYC, each on half of the 25,793 prompts (those within 512 tokens are kept: 6,848 in all),
# into two directories. Resumes where it stopped (finished shards are kept); run it again to continue.
set -u
cd "$(dirname "$0")/../../.."  # the repository root
run() {
    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/treeflash train data --prompts sharegpt-turns "$@" \
        --max-new-tokens 256 --max-prompt-tokens 512 --batch-size 64
}
run --limit 12900 --out training/data/smollm2-sharegpt-turns > "${LOG_DIR:-/tmp}/regen-turns-a.log" 2>&1 &
run --skip 12900 --out training/data/smollm2-sharegpt-turns-b > "${LOG_DIR:-/tmp}/regen-turns-b.log" 2>&1 &
wait
