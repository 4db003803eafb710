#!/usr/bin/env bash
# Print the directory of a shipped drafter of lineage.json as it was shipped, taking it from the commit that shipped
# it into $HOME/.cache/treeflash/lineage/checkpoints/NAME the first time. Usage: checkpoint.sh NAME
set -eu
cd "$(dirname "$0")/../../.."  # the repository root
L=training/runs/lineage/lineage.json
DIR=$HOME/.cache/treeflash/lineage/checkpoints/$1
if [ ! -s "$DIR/model.safetensors" ]; then
    COMMIT=$(python3 -c "import json, sys; print(*[d['commit'] for d in json.load(open(sys.argv[1]))['drafters'] if d['name'] == sys.argv[2] and d['commit']])" $L "$1")
    [ -n "$COMMIT" ] || { echo "checkpoint.sh: $1 is no shipped drafter of $L" >&2; exit 1; }
    CKPT=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['checkpoint'])" $L)
    mkdir -p "$DIR"
    git show "$COMMIT:$CKPT/config.json" > "$DIR/config.json"
    git show "$COMMIT:$CKPT/model.safetensors" > "$DIR/model.safetensors"
fi
echo "$DIR"
