"""A disk cache of target features, so that drafter and head training never run the target.

Training a drafter needs, for every token of every training sequence, the outputs of the chosen target
layers (the drafter's context) and, for a KL loss, the target's distribution at that token. Computing them
online costs one target pass per sequence per epoch, about as much as the drafter's own forward and
backward on a CPU. `build_feature_cache` runs the target once over a data set and stores:

  shard-NNNNN.tokens.npy    [T] int32      the tokens of the shard's sequences, back to back
  shard-NNNNN.features.npy  [T, k*H] f16   outputs of the cached target layers, concatenated in their order
  shard-NNNNN.final.npy     [T, H] f16     the target's last hidden state after its final norm: the target's
                                           logits at a token are `lm_head(final)`, so any KL loss (full or
                                           draft vocabulary) is exact up to float16 rounding of this input
  shard-NNNNN.json          [{"id", "offset", "length", "prompt_length"}, ...]  written last: marks the shard done
  cache.json                what was cached: target, layers, hidden size, the data it came from

Shards are written to temporary names and renamed, so an interrupted run resumes at the first shard without
its index. The arrays are memory-mapped when read: a cache larger than memory trains fine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from tqdm.auto import tqdm

from ..errors import TreeFlashError
from ..targets import Target
from .records import Sequence

CACHE_FILE = "cache.json"
DEFAULT_SHARD_SEQUENCES = 256


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def bytes_per_token(num_layers: int, hidden_size: int) -> int:
    """Disk cost of one cached token: k layers and the final state in float16, and its int32 id."""
    return 2 * (num_layers + 1) * hidden_size + 4


@torch.no_grad()
def sequence_features(target: Target, tokens: Tensor, layers: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """One target pass over tokens [L]: (features [L, k*H] of `layers`, final [L, H] = final_norm(last layer))."""
    last = target.num_layers - 1
    wanted = tuple(layers) + ((last,) if last not in layers else ())
    out = target.forward(tokens, torch.arange(tokens.numel(), device=tokens.device), target.new_cache(tokens.numel()),
                         feature_layers=wanted, logits_rows=None)
    H = target.hidden_size
    features = out.features[:, : len(layers) * H]
    final = target.final_norm(out.features[:, wanted.index(last) * H:(wanted.index(last) + 1) * H])
    return features, final


def build_feature_cache(
    target: Target,
    sequences: list[Sequence],
    out: str | Path,
    layers: tuple[int, ...],
    shard_sequences: int = DEFAULT_SHARD_SEQUENCES,
    source: str | None = None,
    progress: bool = True,
    part: tuple[int, int] = (0, 1),
) -> dict:
    """Run `target` once over `sequences` and store their features in `out` (resumes where it stopped).

    `part` = (k, n): write only the shards i with i % n == k, so that n processes share the work (each shard
    is written by one of them, under temporary names). Returns counts: sequences, tokens, shards written now
    and in all."""
    if shard_sequences < 1:
        raise TreeFlashError(f"shard size must be at least 1 sequence; got {shard_sequences}")
    layers = tuple(int(i) for i in layers)
    if not layers or min(layers) < 0 or max(layers) >= target.num_layers:
        raise TreeFlashError(f"feature layers {list(layers)} are not all layers of target {target.name!r} "
                             f"(0..{target.num_layers - 1}); choose layers the target has")
    out = start_feature_cache(target, out, layers, shard_sequences, source)
    k, n = part
    shards, todo = plan_feature_cache(sequences, out, shard_sequences)
    todo = [i for i in todo if i % n == k]
    check_disk(out, sum(len(s.tokens) for i in todo for s in shards[i]), len(layers), target.hidden_size)
    mine = [i for i in range(len(shards)) if i % n == k]
    bar = tqdm(total=sum(len(s.tokens) for i in mine for s in shards[i]), desc="caching features", unit="tok",
               unit_scale=True, disable=not progress)
    bar.update(sum(len(s.tokens) for i in mine if i not in todo for s in shards[i]))
    for index in todo:
        _cache_shard(target, shards[index], out, index, layers, bar)
    bar.close()
    return {"sequences": len(sequences), "tokens": sum(len(s.tokens) for s in sequences),
            "shards": len(shards), "written_now": len(todo)}


def build_feature_cache_in_workers(target: Target, sequences: list[Sequence], out: str | Path,
                                   layers: tuple[int, ...], shard_sequences: int, workers: int,
                                   command: list[str]) -> dict:
    """`build_feature_cache` shared by `workers` processes of one torch thread each (on a small CPU two 1-thread
    passes make more tokens per second than one 2-thread pass), each writing every N-th shard; one progress bar
    here. Each worker runs `python -m treeflash.cli *command --part K/N`: `command` is the `treeflash` command
    line that caches these sequences (`--part` takes precedence over `--workers` in it). Returns counts."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards, todo = plan_feature_cache(sequences, out, shard_sequences)
    check_disk(out, sum(len(s.tokens) for i in todo for s in shards[i]), len(layers), target.hidden_size)
    n = workers
    threads = max(1, torch.get_num_threads() // n)
    print(f"{n} processes x {threads} torch threads; their logs in {out}/worker-K.log", file=sys.stderr)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    running = []
    for k in range(n):
        log = open(out / f"worker-{k}.log", "w")
        running.append((subprocess.Popen([sys.executable, "-m", "treeflash.cli", *command, "--part", f"{k}/{n}"],
                                         stdout=subprocess.DEVNULL, stderr=log, env=env), log, k))
    bar = tqdm(total=sum(len(s.tokens) for s in sequences), desc="caching features", unit="tok", unit_scale=True)
    try:
        # Until all are done or one failed.
        while any(p.poll() is None for p, _, _ in running) and all(p.poll() in (None, 0) for p, _, _ in running):
            time.sleep(2)
            bar.update(shards_done_tokens(out, shards) - bar.n)
    finally:
        failed = [(p, k) for p, _, k in running if p.poll() not in (None, 0)]
        for p, log, _ in running:
            if p.poll() is None:
                p.terminate()
                p.wait()
            log.close()
        bar.close()
    if failed:
        p, k = failed[0]
        lines = [line for line in (out / f"worker-{k}.log").read_text().splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {p.returncode}"
        raise TreeFlashError(f"feature worker {k} of {n} failed ({reason}); the others were stopped and the "
                             "finished shards kept: run the same command again to resume")
    return {"sequences": len(sequences), "tokens": sum(len(s.tokens) for s in sequences), "shards": len(shards),
            "written_now": len(todo)}


def start_feature_cache(target: Target, out: str | Path, layers: tuple[int, ...], shard_sequences: int,
                        source: str | None = None) -> Path:
    """Create `out` with its cache.json, or check that the cache already there was made with these settings."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"target": target.name, "layers": list(layers), "hidden_size": target.hidden_size,
            "num_target_layers": target.num_layers, "vocab_size": target.vocab_size, "dtype": "float16",
            "shard_sequences": shard_sequences, "source": source}
    meta_file = out / CACHE_FILE
    if meta_file.exists():
        old = json.loads(meta_file.read_text())
        if {k: old.get(k) for k in meta if k != "source"} != {k: v for k, v in meta.items() if k != "source"}:
            raise TreeFlashError(f"{out} holds features cached with other settings (target {old.get('target')!r}, "
                                 f"layers {old.get('layers')}, {old.get('shard_sequences')} sequences a shard); "
                                 "use a new output directory")
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    return out


def shards_done_tokens(out: str | Path, shards: list[list[Sequence]]) -> int:
    """Tokens of the shards that `out` holds finished (for a progress bar over several processes)."""
    return sum(len(s.tokens) for i, shard in enumerate(shards) if _shard_done(Path(out), i, shard) for s in shard)


def plan_feature_cache(sequences: list[Sequence], out: str | Path,
                       shard_sequences: int = DEFAULT_SHARD_SEQUENCES) -> tuple[list[list[Sequence]], list[int]]:
    """(the shards of `sequences`, the indices of those `out` does not hold yet)."""
    shards = [sequences[i:i + shard_sequences] for i in range(0, len(sequences), shard_sequences)]
    return shards, [i for i, shard in enumerate(shards) if not _shard_done(Path(out), i, shard)]


def check_disk(out: str | Path, tokens: int, num_layers: int, hidden_size: int) -> None:
    """Raise TreeFlashError unless `out` has room for `tokens` more cached tokens."""
    need = tokens * bytes_per_token(num_layers, hidden_size)
    free = shutil.disk_usage(out).free
    if need and free < need + (256 << 20):
        raise TreeFlashError(f"caching these features needs {need / 2**30:.1f} GiB at {out} but only "
                             f"{free / 2**30:.1f} GiB are free; free some space, cache fewer sequences "
                             "(--limit) or choose another --out")


def _shard_done(out: str | Path, index: int, shard: list[Sequence]) -> bool:
    """Whether `out` holds shard `index` finished, with exactly these sequences."""
    path = Path(out) / f"{_shard_name(index)}.json"
    if not path.exists():
        return False
    entries = json.loads(path.read_text())
    return [(e["id"], e["length"]) for e in entries] == [(s.id, len(s.tokens)) for s in shard]


def _cache_shard(target: Target, shard: list[Sequence], out: str | Path, index: int, layers: tuple[int, ...],
                 bar=None) -> None:
    """Write shard `index` of a feature cache by one target pass per sequence of `shard` (`bar`: a tqdm bar to
    advance by their tokens)."""
    def passes():  # one target pass per sequence, as the shard is written
        for seq in shard:
            yield sequence_features(target, torch.tensor(seq.tokens, device=target.device), layers)
            if bar is not None:
                bar.update(len(seq.tokens))

    write_shard(out, index, shard, passes(), len(layers), target.hidden_size)


def write_shard(out: str | Path, index: int, shard: list[Sequence], arrays, num_layers: int, hidden_size: int) -> None:
    """Write shard `index` of a feature cache: `arrays` gives, for each sequence of `shard` in turn, its
    (features [L, k*H], final [L, H]) over all its L tokens (any float dtype; stored as float16)."""
    out = Path(out)
    total = sum(len(s.tokens) for s in shard)
    H = hidden_size
    name = _shard_name(index)
    # Written under temporary names and renamed; the index goes last, so a shard without one is redone.
    tmp = {kind: out / f"{name}.{kind}.tmp.npy" for kind in ("tokens", "features", "final")}
    tokens = np.lib.format.open_memmap(tmp["tokens"], mode="w+", dtype=np.int32, shape=(total,))
    features = np.lib.format.open_memmap(tmp["features"], mode="w+", dtype=np.float16, shape=(total, num_layers * H))
    final = np.lib.format.open_memmap(tmp["final"], mode="w+", dtype=np.float16, shape=(total, H))
    entries, offset = [], 0
    for seq, (f, z) in zip(shard, arrays, strict=True):
        n = len(seq.tokens)
        if f.shape != (n, num_layers * H) or z.shape != (n, H):
            raise ValueError(f"features {tuple(f.shape)} and final {tuple(z.shape)} for {seq.id!r} do not cover its "
                             f"{n} tokens")
        tokens[offset:offset + n] = np.asarray(seq.tokens, dtype=np.int32)
        features[offset:offset + n] = f.to(torch.float16).cpu().numpy()
        final[offset:offset + n] = z.to(torch.float16).cpu().numpy()
        entries.append({"id": seq.id, "offset": offset, "length": n, "prompt_length": seq.prompt_length})
        offset += n
    for array in (tokens, features, final):
        array.flush()
    del tokens, features, final
    for kind, path in tmp.items():
        path.replace(out / f"{name}.{kind}.npy")
    index_tmp = out / f"{name}.json.tmp"
    index_tmp.write_text(json.dumps(entries) + "\n")
    index_tmp.replace(out / f"{name}.json")


@dataclasses.dataclass
class CachedSequence(Sequence):
    """A training sequence whose target features come from a feature cache."""

    shard: int = 0
    offset: int = 0


class FeatureCache:
    """A finished (or partly finished) feature cache, memory-mapped, or several of them given as
    "DIR1,DIR2,...". `sequences` lists the cached ones in order; `features(seq)` and `final(seq)` give their
    arrays as float32 tensors."""

    def __init__(self, path: str | Path):
        # Several caches of the same target and layers, comma-separated, read as one (chunks cached apart:
        # by separate processes, or in separate sittings with `train features --skip`).
        paths = [Path(p) for p in str(path).split(",") if p.strip()] if isinstance(path, str) else [Path(path)]
        self.path = paths[0]
        self.meta = None
        self.sequences: list[CachedSequence] = []
        self._shard_prefixes: list[Path] = []  # CachedSequence.shard indexes this
        self._arrays: dict[int, tuple] = {}
        for directory in paths:
            meta_file = directory / CACHE_FILE
            if not meta_file.exists():
                raise TreeFlashError(f"{directory} is not a feature cache (no {CACHE_FILE}); make one with "
                                     "`treeflash train features`")
            meta = json.loads(meta_file.read_text())
            if self.meta is None:
                self.meta = meta
            elif any(meta.get(k) != self.meta.get(k) for k in ("layers", "hidden_size", "num_target_layers", "vocab_size")):
                raise TreeFlashError(f"the feature caches {self.path} and {directory} hold different targets or "
                                     "layers; combine only caches made with the same target and --layers")
            # Every finished shard (its index written last), in order; a shard still being written, or lost to an
            # interruption, is a gap that the others do not wait for.
            for index_file in sorted(directory.glob("shard-[0-9][0-9][0-9][0-9][0-9].json")):
                shard = len(self._shard_prefixes)
                prefix = index_file.with_suffix("")
                self._shard_prefixes.append(prefix)
                tokens = np.load(f"{prefix}.tokens.npy", mmap_mode="r")
                for e in json.loads(index_file.read_text()):
                    ids = tokens[e["offset"]:e["offset"] + e["length"]].tolist()
                    self.sequences.append(CachedSequence(e["id"], ids, e["prompt_length"], shard=shard,
                                                         offset=e["offset"]))
        self.layers = tuple(self.meta["layers"])
        if not self.sequences:
            raise TreeFlashError(f"{path} holds no finished shard yet; let `treeflash train features` run longer")
        seen: dict[str, Path] = {}
        for seq in self.sequences:
            directory = self._shard_prefixes[seq.shard].parent
            if seen.setdefault(seq.id, directory) != directory:
                raise TreeFlashError(f"the feature caches {seen[seq.id]} and {directory} both hold sequence "
                                     f"{seq.id!r}; combine caches of disjoint chunks (`train features --skip/--limit`)")

    def _shard(self, index: int) -> tuple:
        if index not in self._arrays:
            name = self._shard_prefixes[index]
            self._arrays[index] = (np.load(f"{name}.features.npy", mmap_mode="r"),
                                   np.load(f"{name}.final.npy", mmap_mode="r"))
        return self._arrays[index]

    def check(self, target: Target, layers: tuple[int, ...]) -> None:
        """Raise TreeFlashError unless this cache was made by `target` and holds `layers`."""
        if self.meta["hidden_size"] != target.hidden_size or self.meta["num_target_layers"] != target.num_layers \
                or self.meta["vocab_size"] != target.vocab_size:
            raise TreeFlashError(f"the feature cache {self.path} was made with target {self.meta['target']!r}, "
                                 f"not shaped like {target.name!r}; cache features with this target")
        missing = [i for i in layers if i not in self.layers]
        if missing:
            raise TreeFlashError(f"the feature cache {self.path} holds target layers {list(self.layers)}, not "
                                 f"{missing}; train a drafter that reads cached layers or cache these layers")

    def features(self, seq: CachedSequence, layers: tuple[int, ...], length: int | None = None) -> Tensor:
        """[L, len(layers)*H] float32: the cached outputs of `layers` for the first `length` tokens of `seq`."""
        n = len(seq.tokens) if length is None else length
        array = self._shard(seq.shard)[0][seq.offset:seq.offset + n]
        H = self.meta["hidden_size"]
        if tuple(layers) != self.layers:
            columns = np.concatenate([np.arange(self.layers.index(i) * H, (self.layers.index(i) + 1) * H)
                                      for i in layers])
            array = array[:, columns]
        return torch.from_numpy(np.array(array, dtype=np.float32))

    def final(self, seq: CachedSequence, length: int | None = None) -> Tensor:
        """[L, H] float32: the target's final normed hidden states (its logits are lm_head of these)."""
        n = len(seq.tokens) if length is None else length
        return torch.from_numpy(np.array(self._shard(seq.shard)[1][seq.offset:seq.offset + n], dtype=np.float32))
