"""`treeflash train`: make training data (data), cache the target's features (features), train drafters and
TreeFlash heads (drafter, head), and average drafters (average). The work itself is `treeflash.train`."""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

import torch

from ..api import default_device, parse_dtype
from ..drafters import default_target_layer_ids, save_drafter
from ..errors import TreeFlashError
from ..targets import DEFAULT_TARGET, default_target_path, load_target
from ..train import distributed
from ..train.config import (DEFAULT_BLOCK_SIZE, DEFAULT_LAYERS, DEFAULT_TARGET_LAYERS, LABELS, LOSSES, PRECISIONS,
                            TrainConfig)
from ..train.features import DEFAULT_SHARD_SEQUENCES, FeatureCache, build_feature_cache, build_feature_cache_in_workers
from ..train.loop import train
from ..train.prompts import EVAL_SETS, exclude_eval_prompts, load_prompts
from ..train.records import load_sequences
from ..train.regenerate import REGENERATION_ENGINES, dataset_responses, regenerate, regenerate_via_server
from ..train.surgery import average_drafters, initial_drafter
from .flags import add_dataclass_flags, dataclass_from_args


def add_parser(sub) -> None:
    train = sub.add_parser("train", help="make training data, train drafters and TreeFlash heads")
    steps = train.add_subparsers(dest="step", required=True)

    d = steps.add_parser("data", help="regenerate responses to prompts with the target (resumable), or keep a "
                                      "dataset's own")
    d.add_argument("--out", required=True, help="output directory of JSONL shards")
    d.add_argument("--prompts", default="sharegpt",
                   help="sharegpt (its first turns' training split), sharegpt-turns (its later turns, each after "
                        "the conversation so far), sharegpt-replies (every turn ShareGPT answered, the answer kept, "
                        "for --responses dataset), python-functions (code-completion prompts from the Python "
                        "standard library, or python-functions:DIR) or a JSONL file of prompts (default: sharegpt)")
    d.add_argument("--responses", default="target", choices=("target", "dataset"),
                   help="target: the target's own responses, generated (default); dataset: the source's own replies "
                        "(sharegpt-replies), written at once without generating; train on those with --labels target")
    d.add_argument("--limit", type=int, default=None, help="use at most this many prompts")
    d.add_argument("--skip", type=int, default=0, help="skip this many prompts first")
    d.add_argument("--target", default=None, help="target model (default: the embedded SmolLM2-135M-Instruct)")
    r = _defaults(regenerate) | _defaults(regenerate_via_server)  # the defaults are the functions' own
    d.add_argument("--max-new-tokens", type=int, default=r["max_new_tokens"],
                   help="response length cap (default: %(default)s)")
    d.add_argument("--max-prompt-tokens", type=int, default=r["max_prompt_tokens"],
                   help="skip longer prompts (default: %(default)s)")
    d.add_argument("--batch-size", type=int, default=r["batch_size"],
                   help="prompts generated together (default: %(default)s)")
    d.add_argument("--temperature", type=float, default=r["temperature"],
                   help="0 = the target's greedy responses (default: %(default)s)")
    d.add_argument("--seed", type=int, default=r["seed"], help="sampling seed (default: %(default)s)")
    d.add_argument("--dtype", default="float32",
                   help="target dtype for generation; bfloat16 is ~3x faster on CPUs with AMX (default: float32)")
    d.add_argument("--engine", default=r["engine"], choices=REGENERATION_ENGINES,
                   help="treeflash: this library's ar, batched, on packed weights (2.5x transformers on a 2-core "
                        "CPU); transformers: model.generate, as data made before this flag was (default: %(default)s)")
    d.add_argument("--server", default=None,
                   help="generate through a running OpenAI-compatible server (vLLM, SGLang, treeflash serve) at this "
                        "URL instead of in this process; --target then only gives the tokenizer")
    d.add_argument("--server-model", default=None, help="the model id to ask the server for (default: its first)")
    d.add_argument("--concurrency", type=int, default=r["concurrency"],
                   help="requests in flight with --server (default: %(default)s)")
    d.add_argument("--retries", type=int, default=r["retries"],
                   help="tries again after a failed request, with backoff, with --server (default: %(default)s)")
    d.add_argument("--features", default=None,
                   help="also write a feature cache (as `treeflash train features` makes) to this directory, taken "
                        "from the passes that generate: training data and its features for the price of one "
                        "target pass; data shards written without it get a feature pass at the end")
    d.add_argument("--layers", default=None,
                   help="with --features: comma-separated target layers to cache (default: those a new drafter "
                        "reads)")
    d.set_defaults(func=cmd_train_data, resumes=True)

    f = steps.add_parser("features", help="run the target once over training data and cache its features (resumable)")
    f.add_argument("--data", required=True, help="regenerated data (the --out of `treeflash train data`), or several comma-separated")
    f.add_argument("--out", required=True, help="cache directory (memory-mapped float16 shards); resumes if it holds one")
    f.add_argument("--target", default=None, help="target model (default: the embedded SmolLM2-135M-Instruct)")
    f.add_argument("--layers", default=None,
                   help="comma-separated target layers to cache (default: as many as a new drafter reads, spread "
                        "from layer 1 to L-3, DFlash's choice)")
    f.add_argument("--skip", type=int, default=0,
                   help="leave out the first N sequences: cache a later chunk of the data, e.g. what a drafter "
                        "trained on the first N has not seen (default: 0)")
    f.add_argument("--limit", type=int, default=None, help="cache only the first N sequences (after --skip)")
    f.add_argument("--max-length", type=int, default=TrainConfig.max_length,
                   help="tokens per sequence, longer ones are cut, as training cuts them (default: %(default)s)")
    f.add_argument("--shard-sequences", type=int, default=DEFAULT_SHARD_SEQUENCES,
                   help="sequences per shard (default: %(default)s)")
    f.add_argument("--workers", type=int, default=1,
                   help="processes sharing the shards, the torch threads split between them (on 2 CPU cores 2 "
                        "workers made 1.6x the tokens/s of one; default: 1)")
    f.add_argument("--part", default=None, help=argparse.SUPPRESS)  # K/N: one worker's share
    f.set_defaults(func=cmd_train_features, resumes=True)
    _add_train_flags(steps.add_parser("drafter", help="train a DFlash drafter (resumable)"), "drafter")
    _add_train_flags(steps.add_parser("head", help="train a TreeFlash head on a trained drafter (resumable)"), "head")
    a = steps.add_parser("average", help="average the weights of drafters of one shape (e.g. a run and its "
                                         "continuation) into a new drafter")
    a.add_argument("out", help="a new output directory")
    a.add_argument("drafters", nargs="+", help="two or more drafter directories")
    a.add_argument("--dtype", default="bfloat16", help="dtype of the written weights (default: bfloat16)")
    a.set_defaults(func=cmd_train_average)


def _defaults(function) -> dict:
    return {name: p.default for name, p in inspect.signature(function).parameters.items()}


def _add_train_flags(p: argparse.ArgumentParser, stage: str) -> None:
    """`train drafter|head`: where the data, the run and the drafter come from, then one flag per TrainConfig
    field."""
    p.add_argument("--data", default=None, help="regenerated data (the --out of `treeflash train data`), or "
                                                 "several such directories comma-separated")
    p.add_argument("--out", required=True, help="run directory: checkpoints, log.jsonl; resumes if it holds one")
    p.add_argument("--target", default=None, help="target model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None,
                   help="cpu or cuda (default: cuda if available); under torchrun each rank takes cuda:LOCAL_RANK")
    p.add_argument("--init", default=None, help="start from this drafter checkpoint" +
                   (" (required: a trained drafter)" if stage == "head" else " (default: a new one)"))
    p.add_argument("--add-layers", type=int, default=0,
                   help="grow the --init drafter by this many decoder layers, which start as the identity (it drafts "
                        "exactly as before until trained; default: 0)")
    if stage == "drafter":
        p.add_argument("--layers", type=int, default=DEFAULT_LAYERS, help="layers of a new drafter (default: %(default)s)")
        p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                       help="block size of a new drafter (default: %(default)s)")
        p.add_argument("--target-layers", type=int, default=DEFAULT_TARGET_LAYERS,
                       help="target layers a new drafter reads, spread from layer 1 to L-3 (default: %(default)s)")
        p.add_argument("--init-from-target", action="store_true",
                       help="start the drafter's layers from the target's last layers (where shapes agree; "
                            "measured worse than random init, see docs/training.md)")
        p.add_argument("--draft-vocab", type=int, default=None,
                       help="predict only the N most frequent response tokens (a reduced draft vocabulary; "
                            "default: the whole vocabulary)")
    add_dataclass_flags(p, TrainConfig, exclude=("stage",) + (("finetune_backbone",) if stage == "drafter" else ()),
                        choices={"loss": LOSSES, "labels": LABELS, "precision": PRECISIONS})
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps in this sitting (0: only validate the --init drafter as it is, "
                        "on this data's held-out sequences)")
    p.add_argument("--export", default=None, help="when the run is complete, also save the drafter here")
    p.add_argument("--export-dtype", default="bfloat16", help="dtype of the exported weights (default: bfloat16)")
    p.set_defaults(func=cmd_train, resumes=True)


def _target_tokenizer(target: str | None):
    """(name, tokenizer) of a target without loading its weights (None = the embedded default)."""
    from transformers import AutoTokenizer  # heavy: only `train data --server` and `--responses dataset` need it

    name = target or DEFAULT_TARGET
    path = default_target_path() if name == DEFAULT_TARGET else name
    return name, AutoTokenizer.from_pretrained(str(path))


def _layers(text: str | None) -> tuple[int, ...] | None:
    """--layers "1,8,14" -> (1, 8, 14); None stays None (the default layers)."""
    if text is None:
        return None
    try:
        return tuple(int(i) for i in text.split(","))
    except ValueError:
        raise TreeFlashError(f"--layers takes comma-separated layer numbers, e.g. 1,8,14; got {text!r}") from None


def cmd_train_data(args: argparse.Namespace) -> int:
    if args.prompts in EVAL_SETS:
        raise TreeFlashError(f"{args.prompts} is an evaluation set; train on sharegpt or your own JSONL prompts")
    if args.features and (args.server or args.responses == "dataset"):
        raise TreeFlashError("--features captures the target's passes while it generates here; with --server or "
                             "--responses dataset there are none: cache them afterwards with `treeflash train features`")
    if args.layers and not args.features:
        raise TreeFlashError("--layers chooses the layers --features caches; pass --features DIR too")
    prompts = load_prompts(args.prompts, limit=args.limit, skip=args.skip)
    kept, dropped = exclude_eval_prompts(prompts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "excluded.json").write_text(json.dumps([p.id for p in dropped], indent=1) + "\n")
    what = "writing the dataset's own" if args.responses == "dataset" else "regenerating"
    print(f"{len(prompts)} prompts from {args.prompts}; {len(dropped)} dropped for overlapping MT-Bench or "
          f"HumanEval; {what} {len(kept)} responses", file=sys.stderr)
    if args.responses == "dataset":  # no generation: only the target's tokenizer is needed
        if args.server:
            raise TreeFlashError("--responses dataset writes the dataset's own replies and generates nothing; "
                                 "drop --server")
        name, tokenizer = _target_tokenizer(args.target)
        counts = dataset_responses(tokenizer, kept, out, tokenizer.eos_token_id, max_new_tokens=args.max_new_tokens,
                                   max_prompt_tokens=args.max_prompt_tokens, batch_size=args.batch_size,
                                   target_name=name)
        print(json.dumps(counts))
        return 0

    if args.server:  # the target's tokenizer templates the prompts; a running server generates
        name, tokenizer = _target_tokenizer(args.target)
        eos = tokenizer.eos_token_id
        counts = regenerate_via_server(args.server, tokenizer, kept, out, eos, model=args.server_model,
                                       max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens,
                                       batch_size=args.batch_size, temperature=args.temperature, seed=args.seed,
                                       concurrency=args.concurrency, retries=args.retries, target_name=name)
        print(json.dumps(counts))
        return 0
    target = load_target(args.target, dtype=parse_dtype(args.dtype))
    counts = regenerate(target, target.tokenizer, kept, out, max_new_tokens=args.max_new_tokens,
                        max_prompt_tokens=args.max_prompt_tokens, batch_size=args.batch_size,
                        temperature=args.temperature, seed=args.seed, target_name=target.name, engine=args.engine,
                        features_out=args.features, feature_layers=_layers(args.layers))
    print(json.dumps(counts))
    return 0


def cmd_train_features(args: argparse.Namespace) -> int:
    target = load_target(args.target)
    layers = _layers(args.layers) or default_target_layer_ids(target.num_layers, DEFAULT_TARGET_LAYERS)
    if args.skip < 0 or (args.limit is not None and args.limit < 1):
        raise TreeFlashError(f"--skip must be 0 or more and --limit 1 or more; got --skip {args.skip} "
                             f"--limit {args.limit}")
    everything = load_sequences(args.data, max_length=args.max_length)
    sequences = everything[args.skip:][: args.limit]
    if not sequences:
        raise TreeFlashError(f"--skip {args.skip} leaves none of the {len(everything)} sequences in {args.data}; "
                             "skip fewer")
    if args.workers < 1:
        raise TreeFlashError(f"--workers must be 1 or more; got {args.workers}")
    part = tuple(int(x) for x in args.part.split("/")) if args.part else (0, 1)  # a worker's share
    if not args.part:
        print(f"caching target layers {list(layers)} (and the final state) of {len(sequences)} sequences from "
              f"{args.data} (from sequence {args.skip}) into {args.out}", file=sys.stderr)
        if args.workers > 1:
            counts = build_feature_cache_in_workers(target, sequences, args.out, layers, args.shard_sequences,
                                                    args.workers, args.argv)
            print(json.dumps(counts))
            return 0
    counts = build_feature_cache(target, sequences, args.out, layers, shard_sequences=args.shard_sequences,
                                 source=f"{args.data}" + (f" from sequence {args.skip}" if args.skip else ""),
                                 progress=part == (0, 1), part=part)
    print(json.dumps(counts))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    stage = args.step
    config = dataclass_from_args(TrainConfig, args, stage=stage)
    ranks = distributed.from_environment()  # several under torchrun
    distributed.check_batch(config.batch_size, ranks)
    device = distributed.device_for(ranks, args.device or default_device())
    if not args.data and not config.features:
        raise TreeFlashError("training needs data: pass --data (regenerated sequences) or --features (a feature cache)")
    # In bfloat16 the frozen target runs in bf16 too: features and the LM head at AMX speed.
    target = load_target(args.target, dtype=torch.bfloat16 if config.precision == "bfloat16" else torch.float32,
                         device=device)
    if config.features:
        sequences = FeatureCache(config.features).sequences[: config.max_sequences]
    else:
        sequences = load_sequences(args.data, max_length=config.max_length)[: config.max_sequences]
    new = {name: getattr(args, name) for name in ("layers", "block_size", "target_layers", "draft_vocab",
                                                  "init_from_target") if hasattr(args, name)}  # drafter stage only
    drafter = initial_drafter(target, stage, sequences, init=args.init, add_layers=args.add_layers, seed=config.seed,
                              log=lambda m: print(m, file=sys.stderr), **new)
    if ranks.main:
        print(f"{len(sequences)} sequences from {config.features or args.data}; training the {stage} into {args.out}"
              + (f" on {ranks.world} ranks" if ranks.distributed else ""), file=sys.stderr)
    # A new drafter's fc is random, so it keeps its weights behind the feature scale; the identity fc that
    # --init-from-target builds (and a loaded drafter's) is exact only with the scale folded out of it.
    fresh_fc = not args.init and not getattr(args, "init_from_target", False)
    distributed.start(ranks, target.device)
    try:
        metrics = train(drafter, target, None if config.features else sequences, config, args.out,
                        max_steps=args.max_steps, log=lambda m: print(m, file=sys.stderr), fresh_fc=fresh_fc,
                        ranks=ranks)
    finally:
        distributed.stop(ranks)
    if not ranks.main:
        return 0
    if args.export and metrics["complete"]:
        save_drafter(drafter, args.export, dtype=parse_dtype(args.export_dtype),
                     extra={"training": {"command": " ".join(sys.argv), "metrics": metrics}})
        print(f"exported the trained drafter to {args.export}", file=sys.stderr)
    print(json.dumps(metrics))
    return 0


def cmd_train_average(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TreeFlashError(f"{out} is not an empty directory; write the average into a new one")
    dtype = parse_dtype(args.dtype)
    drafter = average_drafters(args.drafters)
    save_drafter(drafter, out, dtype=dtype, extra={"averaged_from": [str(d) for d in args.drafters]})
    print(f"wrote the average of {len(args.drafters)} drafters ({str(dtype).removeprefix('torch.')}) to {out}")
    return 0
