#!/usr/bin/env bash
# ShareGPT's later turns (each after the conversation so far; held-out conversations left out whole),
# regenerated as the target's float32 greedy replies through our own engine: two processes of one torch thread
# on a 2-core AMD EPYC, each on half of the 25,793 prompts (those within 512 tokens are kept: 6,848 in all),
# into two directories. Resumes where it stopped (finished shards are kept); run it again to continue.
# Since 2026-12-05 (shards 19 of turns and 3 of turns-b on) each also writes the feature cache of its shards
# (--features, taken from the generating passes; not committed: ~7 KB a token), which the shards made before get
# by a feature pass once all are regenerated. PARTS=a or PARTS=b runs one of the two (default: both); THREADS sets
# each process's torch threads (default 1; part a is finished, so PARTS=b THREADS=2 uses both cores since 2026-12-06).
set -u
cd "$(dirname "$0")/../../.."  # the repository root
F=$HOME/.cache/treeflash/features
run() {
    OMP_NUM_THREADS=${THREADS:-1} nice -n 5 .venv/bin/treeflash train data --prompts sharegpt-turns "$@" \
        --max-new-tokens 256 --max-prompt-tokens 512 --batch-size 64
}
case "${PARTS:-a b}" in *a*)
run --limit 12900 --out training/data/smollm2-sharegpt-turns --features $F/smollm2-sharegpt-turns \
    > "${LOG_DIR:-/tmp}/regen-turns-a.log" 2>&1 & ;; esac
case "${PARTS:-a b}" in *b*)
run --skip 12900 --out training/data/smollm2-sharegpt-turns-b --features $F/smollm2-sharegpt-turns-b \
    > "${LOG_DIR:-/tmp}/regen-turns-b.log" 2>&1 & ;; esac
wait
