"""Training records: the `Sequence` type, and the shards of JSONL records that hold them on disk.

A record is {"id", "prompt_ids", "response_ids"}, where the response is the target's own output for the
chat-templated prompt (`treeflash.train.regenerate`; DFlash: regenerating responses with the target is decisive
for acceptance). The loss mask is the response part of `prompt_ids + response_ids`. Shards are written by
`write_shards` (resumable: a shard that holds its batch already is skipped) and read by `load_sequences`.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from ..errors import TreeFlashError
from .prompts import Prompt

@dataclasses.dataclass
class Sequence:
    id: str
    tokens: list[int]  # prompt + response
    prompt_length: int  # loss mask: positions >= prompt_length


# Shards are gzip-compressed JSONL (token ids compress ~6x); plain `.jsonl` shards, as written before, read the same.
SHARD_SUFFIXES = (".jsonl.gz", ".jsonl")


def _shard_path(out: Path, index: int) -> Path:
    """Where shard `index` is: the existing file (compressed or plain), else where a new one is written."""
    for suffix in SHARD_SUFFIXES:
        path = out / f"shard-{index:05d}{suffix}"
        if path.exists():
            return path
    return out / f"shard-{index:05d}{SHARD_SUFFIXES[0]}"


def shard_files(data: Path) -> list[Path]:
    """The shards of a data directory in order, compressed or plain."""
    return sorted(p for p in data.glob("shard-*") if p.name.endswith(SHARD_SUFFIXES))


def read_shard_lines(path: Path) -> list[str]:
    """The lines of a shard or JSONL file, gzip-compressed (`.gz`) or plain."""
    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return f.read().splitlines()
    return path.read_text().splitlines()


def write_shard_lines(path: Path, lines: list[str]) -> None:
    """Write a shard atomically (a temporary file, then a rename); `.gz` paths are compressed reproducibly."""
    text = "\n".join(lines) + "\n"
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".gz":
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as f:
            f.write(text.encode("utf-8"))
    else:
        tmp.write_text(text)
    tmp.rename(path)


def check_data_settings(out: Path, meta: dict) -> None:
    """Refuse to continue a data directory made with other settings (before anything is written anywhere)."""
    meta_file = out / "regenerate.json"
    if meta_file.exists():
        old = {"engine": "transformers"} | json.loads(meta_file.read_text())  # written before there was a choice
        if {k: old.get(k) for k in meta if k != "prompts"} != {k: v for k, v in meta.items() if k != "prompts"}:
            raise TreeFlashError(f"{out} holds data made with other settings ({old}); use a new output directory, "
                                 "or the same settings to continue it")


def write_shards(tokenizer, prompts: list[Prompt], out: str | Path, meta: dict,
                 responses: Callable[[int, list[tuple[str, list[int]]]], list[list[int]]], progress: bool,
                 desc: str = "regenerating") -> dict:
    """The resumable shard loop behind `regenerate` and `regenerate_via_server`: template the prompts, batch
    them `meta["batch_size"]` to a shard, and write `responses(shard index, [(id, prompt ids)])` for every
    shard not written yet."""
    out = Path(out)
    check_data_settings(out, meta)
    out.mkdir(parents=True, exist_ok=True)
    (out / "regenerate.json").write_text(json.dumps(meta, indent=2) + "\n")

    encoded = []
    for p in prompts:
        ids = tokenizer.apply_chat_template(p.messages(), add_generation_prompt=True, return_dict=False)
        if len(ids) <= meta["max_prompt_tokens"]:
            encoded.append((p.id, [int(i) for i in ids]))
    size = meta["batch_size"]
    batches = [encoded[i:i + size] for i in range(0, len(encoded), size)]
    written = 0
    bar = tqdm(total=len(batches), desc=desc, unit="batch", disable=not progress)
    for index, batch in enumerate(batches):
        path = _shard_path(out, index)
        # A shard counts as done only if it holds exactly this batch (a run may be extended with more prompts).
        if path.exists() and [json.loads(line)["id"] for line in read_shard_lines(path)] == [i for i, _ in batch]:
            bar.update(1)
            continue
        lines = [json.dumps({"id": pid, "prompt_ids": ids, "response_ids": response})
                 for (pid, ids), response in zip(batch, responses(index, batch))]
        write_shard_lines(path, lines)
        written += len(batch)
        bar.update(1)
    bar.close()
    return {"prompts": len(prompts), "kept": len(encoded), "skipped_long": len(prompts) - len(encoded),
            "shards": len(batches), "written_now": written}



def load_sequences(data: str | Path, max_length: int | None = None) -> list[Sequence]:
    """Read regenerated shards (or any JSONL of {"prompt_ids", "response_ids"}), checking the format.

    data: a directory of shards or one JSONL file, or several of them comma-separated (their records in
    that order). A record id that two of them share, or that one repeats, is refused, since the record would be
    trained on twice or sit on both sides of the validation split.
    """
    parts = [p.strip() for p in str(data).split(",")] if isinstance(data, str) and "," in data else [data]
    if not all(parts):
        raise TreeFlashError(f"--data {data!r} holds an empty name; separate the directories by single commas")
    sequences, origin = [], {}
    for part in parts:
        for seq in load_data_set(Path(part), max_length):
            if origin.get(seq.id) == part:
                raise TreeFlashError(f"record {seq.id!r} appears twice in {part}; record ids must be unique, "
                                     "so drop or rename one of the two")
            if seq.id in origin:
                raise TreeFlashError(f"record {seq.id!r} is in both {origin[seq.id]} and {part}; "
                                     "pass each data set once (or regenerate one of them)")
            origin[seq.id] = part
            sequences.append(seq)
    return sequences


def load_data_set(data: Path, max_length: int | None) -> list[Sequence]:
    """The records of one data directory (its shards in order) or one JSONL file, checked; see `load_sequences`."""
    files = shard_files(data) if data.is_dir() else [data]
    if not files or not files[0].exists():
        raise TreeFlashError(f"no training data at {data}; run `treeflash train data` first")
    sequences = []
    for f in files:
        for n, line in enumerate(read_shard_lines(f), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                prompt, response = r["prompt_ids"], r["response_ids"]
                assert all(isinstance(t, int) for t in prompt + response)
            except (json.JSONDecodeError, KeyError, TypeError, AssertionError):
                raise TreeFlashError(f"{f} line {n} is not a training record; expected JSON with integer lists "
                                     '"prompt_ids" and "response_ids" (made by `treeflash train data`)') from None
            tokens = prompt + response
            if max_length is not None:
                tokens = tokens[:max_length]
            if len(tokens) > len(prompt) + 1:
                sequences.append(Sequence(str(r.get("id", f"{f.name}:{n}")), tokens, len(prompt)))
    if not sequences:
        raise TreeFlashError(f"{data} holds no record with a response; regenerate the data")
    return sequences
