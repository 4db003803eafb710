#!/usr/bin/env bash
# Validate every shipped drafter (lineage.json) the same way: teacher-forced on the 32 held-out first turns that
# drafters five to nine were compared on (smollm2-v8/held_out.json: none of them was trained on by any drafter),
# 128 anchors each, the same anchors and seeds for all. Each checkpoint is taken from the commit that shipped it.
# Writes OUT/NAME.json (the validation metrics) and skips drafters already there, so it resumes; the checkpoints
# taken from git and the runs' directories go to $HOME/.cache/treeflash/lineage.
# Usage: validate_lineage.sh OUT [NAME=CHECKPOINT ...]   (extra candidates beside the shipped ones)
#   e.g. validate_lineage.sh training/runs/lineage/validations
# About 1.6 minutes a drafter at one thread on a 2-core AMD EPYC.
set -eu
OUT=$(realpath -m "$1"); shift  # before the cd below
cd "$(dirname "$0")/../../.."  # the repository root
WORK=$HOME/.cache/treeflash/lineage
mkdir -p "$OUT" "$WORK"
T=training/data/smollm2-sharegpt
validate() {  # NAME CHECKPOINT
    [ -s "$OUT/$1.json" ] && return 0
    OMP_NUM_THREADS=1 .venv/bin/treeflash train head --init "$2" --data $T,$T-rest \
        --held-out training/runs/smollm2-v8/held_out.json --finetune-backbone --anchors 128 --batch-size 8 \
        --max-steps 0 --out "$WORK/run-$1" > "$WORK/$1.json" 2> "$WORK/$1.err"
    cp "$WORK/$1.json" "$OUT/$1.json"
    echo "$1: $(tail -c 300 "$WORK/$1.err" | grep -o 'val .*' | head -1)"
}
python3 -c "import json; [print(d['name']) for d in json.load(open('training/runs/lineage/lineage.json'))['drafters'] if d['commit']]" |
while read -r name; do
    validate "$name" "$(training/runs/lineage/checkpoint.sh "$name")"
done
for extra in "$@"; do validate "${extra%%=*}" "${extra#*=}"; done
