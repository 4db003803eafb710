"""Regenerating training data: responses to prompts from the target itself (this library's `ar`, or
transformers' `model.generate`), from a running OpenAI-compatible server, or the dataset's own replies; written
as resumable shards of records (`treeflash.train.records`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..decoding import DecodeConfig, Decoder
from ..drafters import default_target_layer_ids
from ..errors import TreeFlashError
from ..targets import Target
from .capture import generate_with_features
from .client import CompletionClient
from .config import DEFAULT_TARGET_LAYERS
from .features import build_feature_cache, check_disk, start_feature_cache, write_shard
from .prompts import Prompt
from .records import Sequence, check_data_settings, load_data_set, write_shards

REGENERATION_ENGINES = ("treeflash", "transformers")


def regenerate(
    model,
    tokenizer,
    prompts: list[Prompt],
    out: str | Path,
    max_new_tokens: int = 256,
    max_prompt_tokens: int = 512,
    batch_size: int = 16,
    temperature: float = 0.0,
    seed: int = 0,
    progress: bool = True,
    target_name: str | None = None,
    engine: str = "treeflash",
    features_out: str | Path | None = None,
    feature_layers: tuple[int, ...] | None = None,
) -> dict:
    """Write the target's responses to `prompts` as JSONL shards of `batch_size` records in `out`.

    model: a transformers causal LM, or a loaded `treeflash.targets.Target` (whose model and packed weights
    are used as they are).

    Resumable: shards already written for the same batch are skipped (each is written to a temporary file
    and renamed), and the work is deterministic for a seed, so an interrupted run continues where it stopped
    and a run can be extended with more prompts. Prompts are
    templated as one user turn; prompts longer than `max_prompt_tokens` are skipped rather than cut, since a
    cut prompt is not what a user would send. Returns counts.

    `engine`: "treeflash" generates with this library's `ar` (`Decoder.generate_batch`: a shard's prompts
    batched, packed weights), so a response is exactly what `treeflash generate --method ar` answers;
    "transformers" with `model.generate` (left-padded batches). At T = 0 both give the same responses up to
    float rounding at near-ties (32 of 32 identical on the default model); ours made 162 tokens/s against 65 on
    a 2-core AMD EPYC (float32, 32 ShareGPT prompts x 128 tokens). A directory keeps the engine it was made with.

    `features_out`: also write a feature cache of the records (`treeflash.train.features`; shard i of the cache holds
    shard i of the data) of `feature_layers` (default: those a new drafter reads), taken from the passes that
    generate the responses instead of a second target pass (`treeflash train features`). Data shards written
    without it (before, or by an interrupted run) get a feature pass at the end. Only with the "treeflash"
    engine.
    """
    if engine not in REGENERATION_ENGINES:
        raise TreeFlashError(f"unknown engine {engine!r}; choose one of {', '.join(REGENERATION_ENGINES)}")
    if features_out is not None and engine != "treeflash":
        raise TreeFlashError("capturing features while regenerating needs the treeflash engine; drop --engine "
                             "transformers, or cache them afterwards with `treeflash train features`")
    target = model if isinstance(model, Target) else None  # a loaded Target: its packed weights are reused
    model = target.model if target is not None else model
    meta = {"max_new_tokens": max_new_tokens, "max_prompt_tokens": max_prompt_tokens, "batch_size": batch_size,
            "temperature": temperature, "seed": seed, "prompts": len(prompts),
            "target": target_name or getattr(model.config, "_name_or_path", None), "dtype": str(model.dtype),
            "engine": engine}
    capture = None
    if engine == "treeflash":
        decoder = Decoder(target or Target(model, tokenizer, name=target_name))
        if features_out is not None:
            check_data_settings(Path(out), meta)  # so that a refused run leaves no new feature cache behind
            capture = _FeatureCapture(decoder.target, features_out, feature_layers, batch_size, out, progress)

    def responses(index: int, batch: list[tuple[str, list[int]]]) -> list[list[int]]:
        prompt_ids = [ids for _, ids in batch]
        if engine == "transformers":
            torch.manual_seed(seed * 100_003 + index)  # generate() samples from the global RNG
            return transformers_responses(model, tokenizer, prompt_ids, max_new_tokens, temperature)
        configs = [DecodeConfig(method="ar", max_new_tokens=max_new_tokens, temperature=temperature,
                                seed=seed * 100_003 + index * batch_size + i) for i in range(len(batch))]
        if capture is None:
            return [r.token_ids for r in decoder.generate_batch(prompt_ids, configs, max_batch=len(batch))]
        results, features = generate_with_features(decoder, prompt_ids, configs, capture.wanted, len(batch))
        capture.write(index, batch, results, features)  # before the data shard, so a shard of data has its features
        return [r.token_ids for r in results]

    counts = write_shards(tokenizer, prompts, out, meta, responses, progress)
    if capture is not None:  # last, so that new data comes first: the cache reads the shards it has
        counts["feature_shards_filled"] = capture.fill(out)
    return counts


class _FeatureCapture:
    """`regenerate`'s feature cache: shard i holds the features of data shard i, from the generating passes."""

    def __init__(self, target, out: str | Path, layers: tuple[int, ...] | None, batch_size: int, source: str | Path,
                 progress: bool):
        self.target, self.progress, self.batch_size = target, progress, batch_size
        self.layers = tuple(layers) if layers else default_target_layer_ids(target.num_layers, DEFAULT_TARGET_LAYERS)
        last = target.num_layers - 1
        self.wanted = self.layers + ((last,) if last not in self.layers else ())  # the last: the final state
        self.out = start_feature_cache(target, out, self.layers, batch_size, source=str(source))

    def write(self, index: int, batch: list[tuple[str, list[int]]], results, features: list[torch.Tensor]) -> None:
        H, k = self.target.hidden_size, len(self.layers)
        last = self.wanted.index(self.target.num_layers - 1)
        shard = [Sequence(pid, ids + r.token_ids, len(ids)) for (pid, ids), r in zip(batch, results)]
        check_disk(self.out, sum(len(s.tokens) for s in shard), k, H)
        arrays = ((f[:, : k * H], self.target.final_norm(f[:, last * H:(last + 1) * H].float())) for f in features)
        write_shard(self.out, index, shard, arrays, k, H)

    def fill(self, data: str | Path) -> int:
        """Cache, by a target pass, the features of data shards that have none yet; returns how many. The data's
        shards hold `batch_size` records each but the last, so `build_feature_cache` at that shard size plans
        exactly the data's shards."""
        return build_feature_cache(self.target, load_data_set(Path(data), None), self.out, self.layers, self.batch_size,
                                   source=str(data), progress=self.progress)["written_now"]


def transformers_responses(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int,
                           temperature: float = 0.0) -> list[list[int]]:
    """`model.generate` over the prompts as one left-padded batch (sampling from the global RNG at T > 0); each
    response ends at its first EOS, which it keeps."""
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos))
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
    attention = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):  # left padding, as decoder-only batched generation needs
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention[row, width - len(ids):] = 1
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                do_sample=temperature > 0, temperature=temperature or None, top_p=None,
                                top_k=None, pad_token_id=pad)
    out_ids = []
    for row in range(len(prompt_ids)):
        response = []
        for token in output[row, width:].tolist():
            response.append(token)
            if token in eos:
                break
        out_ids.append(response)
    return out_ids


def regenerate_via_server(
    server: str,
    tokenizer,
    prompts: list[Prompt],
    out: str | Path,
    eos_token_id: int | None,
    model: str | None = None,
    max_new_tokens: int = 256,
    max_prompt_tokens: int = 512,
    batch_size: int = 16,
    temperature: float = 0.0,
    seed: int = 0,
    concurrency: int = 8,
    retries: int = 5,
    progress: bool = True,
    target_name: str | None = None,
) -> dict:
    """`regenerate`, with the responses from a running OpenAI-compatible server (vLLM, SGLang, `treeflash
    serve`): `concurrency` requests in flight, retried on failure, the same resumable shards. The target's
    tokenizer templates the prompts, which go out as token ids; see `treeflash.train.client` for how responses come
    back as ids. Returns counts, with how many responses were re-tokenised and how many of those did not
    decode back to the server's text."""
    client = CompletionClient(server, model, concurrency=concurrency, retries=retries)
    counts = {"retokenized": 0, "round_trip_failures": 0}

    def responses(index: int, batch: list[tuple[str, list[int]]]) -> list[list[int]]:
        seeds = None if temperature == 0 else [seed * 100_003 + index * batch_size + i for i in range(len(batch))]
        done = client.complete_all([ids for _, ids in batch], max_tokens=max_new_tokens, temperature=temperature,
                                   seeds=seeds, tokenizer=tokenizer, eos_token_id=eos_token_id)
        counts["retokenized"] += sum(not c.from_server for c in done)
        counts["round_trip_failures"] += sum(not c.round_trip for c in done)
        return [c.token_ids for c in done]

    meta = {"max_new_tokens": max_new_tokens, "max_prompt_tokens": max_prompt_tokens, "batch_size": batch_size,
            "temperature": temperature, "seed": seed, "prompts": len(prompts), "target": target_name,
            "server_model": client.model, "source": "server"}
    return {**write_shards(tokenizer, prompts, out, meta, responses, progress), **counts}


def dataset_responses(tokenizer, prompts: list[Prompt], out: str | Path, eos_token_id: int | None,
                      max_new_tokens: int = 256, max_prompt_tokens: int = 512, batch_size: int = 16,
                      progress: bool = True, target_name: str | None = None) -> dict:
    """Training records whose responses are the dataset's own replies (`Prompt.reply`), not the target's:
    no generation, so as many records as the dataset has, in seconds. A reply is tokenised as the target's
    chat template would hold it, cut at `max_new_tokens`, and ends in `eos_token_id` (the end of the turn)
    when it fits. The target did not write this text, so train on it with the target's labels
    (`TrainConfig.labels = "target"`): cross-entropy on its own tokens would teach the drafter another model.
    Same resumable shards as `regenerate`."""
    missing = [p.id for p in prompts if p.reply is None]
    if missing:
        raise TreeFlashError(f"{len(missing)} prompts (e.g. {missing[0]}) have no reply of their own; the dataset's "
                             "responses need a source that keeps them, such as --prompts sharegpt-replies")
    replies = {p.id: p.reply for p in prompts}

    def responses(index: int, batch: list[tuple[str, list[int]]]) -> list[list[int]]:
        out_ids = []
        for pid, _ in batch:
            ids = [int(i) for i in tokenizer.encode(replies[pid].strip(), add_special_tokens=False)]
            if eos_token_id is not None:
                ids.append(int(eos_token_id))
            out_ids.append(ids[:max_new_tokens])
        return out_ids

    meta = {"max_new_tokens": max_new_tokens, "max_prompt_tokens": max_prompt_tokens, "batch_size": batch_size,
            "prompts": len(prompts), "target": target_name, "source": "dataset",
            "labels": "the dataset's own replies: train with --labels target"}
    return write_shards(tokenizer, prompts, out, meta, responses, progress, desc="writing replies")
