"""Build a run's data files from committed shards, leaving out held-out records, which go in a file of their own.

`treeflash train head --max-sequences` can only count from a data set's first record, so a run that trains on a
slice of the shards (the records no earlier run saw) builds its files here. The held-out records are taken from
all the shards named with `--held-from`, so the held-out file is the same for every run.

    python training/runs/split_data.py OUT HELD_OUT.json[,HELD_OUT.json] \
        code=smollm2-python-functions:32-64 first=smollm2-sharegpt:126-171+smollm2-sharegpt-rest \
        --held-from smollm2-python-functions:0-31+smollm2-sharegpt+smollm2-sharegpt-rest

A part is NAME=SOURCE[+SOURCE...], a source being a directory of training/data, optionally with a range of shard
numbers (both ends included; without one, every shard). Writes OUT/NAME.jsonl for each part, without the held-out
records, and OUT/held.jsonl with only them. A later turn of a held-out record's conversation (`ID-turnN`) is left
out of the parts too: its prompt holds the held-out turn.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data"


def shard_files(spec: str) -> list[Path]:
    files = []
    for source in spec.split("+"):
        name, _, span = source.partition(":")
        if not (DATA / name).is_dir():
            sys.exit(f"split_data.py: {DATA / name} is not a directory of shards; name one under training/data")
        if span:
            first, _, last = span.partition("-")
            found = [DATA / name / f"shard-{i:05d}.jsonl.gz" for i in range(int(first), int(last or first) + 1)]
            missing = [f.name for f in found if not f.is_file()]
            if missing:
                sys.exit(f"split_data.py: {name} has no {missing[0]}; regenerate it or name a range it holds")
            files += found
        else:
            files += sorted((DATA / name).glob("shard-*.jsonl.gz"))
    return files


def records(files: list[Path]) -> list[str]:
    return [line for f in files for line in gzip.open(f, "rt").read().splitlines() if line.strip()]


def conversation(record_id: str) -> str:
    return record_id.split("-turn")[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("held_out", help="held_out.json files of earlier runs, comma-separated")
    parser.add_argument("parts", nargs="+", help="NAME=SOURCE[+SOURCE...]")
    parser.add_argument("--held-from", required=True, help="the sources the held-out records are taken from")
    args = parser.parse_args()
    held = set()
    for f in args.held_out.split(","):
        held.update(json.loads(Path(f).read_text()))
    args.out.mkdir(parents=True, exist_ok=True)
    parts = [part.partition("=")[::2] for part in args.parts] + [("held", args.held_from)]
    held_conversations = {conversation(i) for i in held}
    for name, spec in parts:
        ids = [(line, json.loads(line)["id"]) for line in records(shard_files(spec))]
        if name == "held":
            keep = [line for line, i in ids if i in held]
        else:
            keep = [line for line, i in ids if conversation(i) not in held_conversations]
        (args.out / f"{name}.jsonl").write_text("".join(line + "\n" for line in keep))
        print(name, len(keep), "records")


if __name__ == "__main__":
    main()
