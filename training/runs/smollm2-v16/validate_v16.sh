#!/usr/bin/env bash
# Validate candidate drafters against a shipped one, teacher-forced (--max-steps 0, 128 anchors, the same records,
# anchors and seeds for every drafter), in two one-thread lanes side by side:
#   lane 1: 32 held-out code records and 32 held-out later turns -> $V/validate-NAME-{code,turns}.json;
#   lane 2: the run's own 64 held-out records (the lineage's 32 first turns and the 32 code records, as train_v16.sh
#           validates) -> $V/validate-NAME-run64.json; the lineage's 32 first turns (validate_lineage.sh) ->
#           training/runs/lineage/validations/NAME.json.
# The bench-prompt validations (results/training/bench_prompt_validation_v16_*) were made in the same lanes by
# scripts/bench_prompt_validation.py, which is in the git history (commit f09108d); its commands head those reports.
# Both lanes validate the baseline too (BASE, a drafter of training/runs/lineage/lineage.json taken from the commit
# that shipped it) under the same commands. Files already written are kept, so the script resumes.
# Defaults are the v16 run's: V (where the figures go), R (the run's cache, whose data/ train_v16.sh wrote)
# and BASE (fifteenth). About 20 minutes for two candidates on a 2-core CPU.
# Usage: validate_v16.sh NAME=DRAFTER [NAME=DRAFTER ...]   (after train_v16.sh)
set -eu
cd "$(dirname "$0")/../../.."  # the repository root
V=${V:-training/runs/smollm2-v16} R=${R:-$HOME/.cache/treeflash/runs/s32} BASE=${BASE:-fifteenth}
W=$R/validate
mkdir -p $W
B=$(training/runs/lineage/checkpoint.sh $BASE)  # the baseline as shipped (the shipped path moves on)
held() {  # NAME DRAFTER KIND DATA HELD_OUT
    [ -s "$V/validate-$1-$3.json" ] && return 0
    OMP_NUM_THREADS=1 .venv/bin/treeflash train head --init "$2" --data "$4" --held-out "$5" --finetune-backbone \
        --anchors 128 --batch-size 8 --max-steps 0 --out "$W/$1-$3" > "$W/$1-$3.json" 2> "$W/$1-$3.err"
    cp "$W/$1-$3.json" "$V/validate-$1-$3.json"
}
T=training/data/smollm2-sharegpt
lane1() {
    for pair in $BASE=$B "$@"; do  # the baseline
        held "${pair%%=*}" "${pair#*=}" code training/data/smollm2-python-functions training/runs/smollm2-v11/held_out_code.json
        held "${pair%%=*}" "${pair#*=}" turns $T-turns,$T-turns-b training/runs/smollm2-v9/held_out_turns.json
    done
}
lane2() {
    for pair in $BASE=$B "$@"; do
        held "${pair%%=*}" "${pair#*=}" run64 $R/data/code.jsonl,$R/data/first.jsonl,$R/data/held.jsonl \
            training/runs/smollm2-v8/held_out.json,training/runs/smollm2-v11/held_out_code.json
    done
    training/runs/lineage/validate_lineage.sh training/runs/lineage/validations "$@"
}
lane1 "$@" > $W/lane1.log 2>&1 &
lane2 "$@" > $W/lane2.log 2>&1 &
wait
echo done
