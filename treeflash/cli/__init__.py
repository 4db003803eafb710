"""`treeflash` command line: a thin layer over the Python API. Flags map one-to-one onto DecodeConfig."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from ..decoding import METHODS, STAGES, DecodeConfig
from ..errors import TreeFlashError


def _add_model_flags(p: argparse.ArgumentParser, drafter: bool = True) -> None:
    p.add_argument("--target", default=None,
                   help="Hugging Face model directory or hub id (default: the embedded SmolLM2-135M-Instruct)")
    if drafter:
        p.add_argument("--drafter", default=None,
                       help="drafter checkpoint directory (DFlash, TreeFlash or ours); 'untrained' for a fresh one "
                            "(default: the drafter shipped for the target)")
        p.add_argument("--drafter-dtype", default=None,
                       help="the drafter's dtype; its precision never changes an output (default: bfloat16 for a "
                            "float32 target on a CPU with AMX, else the target's)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or float64 (default: float32)")


def _add_decode_flags(p: argparse.ArgumentParser) -> None:
    d = DecodeConfig()
    p.add_argument("--method", choices=METHODS, default=d.method, help=f"decoding method (default: {d.method})")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget", type=int, default=None,
                        help="draft nodes per round, the root not counted, as in DDTree (default: the budget "
                             "`treeflash tune` chose on this machine, else 2 on a CPU and 64 on a GPU for trees; "
                             "block size - 1 for dflash)")
    budget.add_argument("--tree-size", type=int, default=None,
                        help="the same, counting the root as ETH's TreeFlash does (tree size = budget + 1)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help=f"(default: {d.max_new_tokens})")
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy (default: 0)")
    p.add_argument("--top-p", type=float, default=d.top_p, help="nucleus filtering at temperature > 0 (default: 1)")
    p.add_argument("--top-k", type=int, default=d.top_k, help="top-k filtering at temperature > 0 (default: off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random, reported)")
    p.add_argument("--draft-top-k", type=int, default=d.draft_top_k,
                   help=f"TreeFlash: children kept per conditional row (default: {d.draft_top_k})")
    p.add_argument("--candidate-tokens", type=int, default=None,
                   help="TreeFlash: candidate parents per position, m (default: the tuned one, else the drafter's, 16)")
    p.add_argument("--lookup", type=int, default=None,
                   help="n-gram lookup: graft up to this many tokens copied from the context onto each round's "
                        "tree, beyond the budget; 0 = off (default: 8 for ddtree and treeflash, 0 for ar and dflash)")
    p.add_argument("--lookup-ngram", type=int, default=d.lookup_ngram,
                   help=f"the shortest context suffix a lookup matches, 1-4 (default: {d.lookup_ngram})")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")


def decode_config_from_args(args: argparse.Namespace) -> DecodeConfig:
    from ..trees import budget_from_tree_size

    budget = args.budget if args.tree_size is None else budget_from_tree_size(args.tree_size)
    return DecodeConfig(
        method=args.method, budget=budget, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, seed=args.seed, draft_top_k=args.draft_top_k,
        candidate_tokens=args.candidate_tokens, stop_at_eos=not args.ignore_eos, lookup=args.lookup,
        lookup_ngram=args.lookup_ngram,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from ..api import load

    config = decode_config_from_args(args)  # validate flags before loading anything
    drafter = "none" if config.method == "ar" and args.drafter is None else args.drafter
    decoder = load(args.target, drafter, device=args.device, dtype=args.dtype, drafter_dtype=args.drafter_dtype)
    if args.json:
        result = decoder.generate_text(args.prompt, config, chat=not args.no_chat)
        print(json.dumps(result.to_dict()))
        return 0

    tokenizer = decoder.target.tokenizer
    committed: list[int] = []
    shown = 0

    def stream(tokens: list[int]) -> None:
        nonlocal shown
        committed.extend(tokens)
        text = tokenizer.decode(committed, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return
        sys.stdout.write(text[shown:])
        sys.stdout.flush()
        shown = len(text)

    result = decoder.generate_text(args.prompt, config, chat=not args.no_chat, on_tokens=stream)
    sys.stdout.write("\n")
    stages = ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in result.stage_seconds.items() if k in STAGES)
    print(
        f"[{result.method}" + (f" + lookup {result.lookup}" if result.lookup else "") + f"] {result.new_tokens} "
        f"tokens in {result.rounds} rounds, tau {result.tau:.2f}, "
        f"{result.seconds:.2f} s, {result.tokens_per_second:.1f} tokens/s, stop: {result.stop_reason}"
        + (f", seed {result.seed}" if result.seed is not None else "")
        + f"\n  stages: {stages}",
        file=sys.stderr,
    )
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    import torch

    from ..api import load
    from ..tuning import CALIBRATION_PROMPTS, report, save_tuning, tune

    from ..trees import check_budget

    # Flags are checked before the model loads.
    budgets = [check_budget(b) for b in _int_list(args.budgets, "--budgets")]
    candidates = _int_list(args.candidate_tokens, "--candidate-tokens")
    lookups = _int_list(args.lookups, "--lookups")
    if any(x < 0 for x in lookups):
        raise TreeFlashError(f"--lookups must be whole numbers >= 0 (0 = off), e.g. 0,8,16; got {args.lookups}")
    if not 1 <= args.prompts <= len(CALIBRATION_PROMPTS):
        raise TreeFlashError(f"--prompts must be between 1 and {len(CALIBRATION_PROMPTS)}; got {args.prompts}")
    if args.max_new_tokens < 1:
        raise TreeFlashError(f"--max-new-tokens must be >= 1; got {args.max_new_tokens}")
    if args.threads:
        torch.set_num_threads(args.threads)
    decoder = load(args.target, args.drafter, device=args.device, dtype=args.dtype, drafter_dtype=args.drafter_dtype)
    decoder.tuning = None  # every setting below is explicit
    prompts = [decoder.target.encode_prompt(p) for p in CALIBRATION_PROMPTS[: args.prompts]]
    print(f"tuning on {len(prompts)} prompts x {args.max_new_tokens} tokens, best of {args.repeats}, greedy, "
          f"{torch.get_num_threads()} torch threads (each setting is timed on the same tokens; a few minutes on a "
          f"CPU)", file=sys.stderr)
    tuning = tune(decoder, prompts, budgets=budgets, candidates=candidates, lookups=lookups,
                  max_new_tokens=args.max_new_tokens,
                  progress=lambda line: print("  " + line, file=sys.stderr, flush=True), repeats=args.repeats)
    tuning.command = "treeflash " + shlex.join(args.argv)
    print(report(tuning))
    best = tuning.best
    chosen = ", ".join(f"{m} budget {v['budget']}" + (f" m {v['candidate_tokens']}" if "candidate_tokens" in v else "")
                       + f" lookup {v['lookup']}" for m, v in best.items() if m in ("ddtree", "treeflash"))
    print(f"\nchosen: {chosen}; fastest method here: {tuning.fastest_method} "
          f"({best[tuning.fastest_method]['tokens_per_second']:.1f} tokens/s)")
    if not args.dry_run:
        path = save_tuning(tuning)
        print(f"saved to {path}: generate, serve and the Python API now use these when no budget, m or lookup "
              "is given")
    return 0


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise TreeFlashError(f"{flag} takes comma-separated whole numbers, like 4,8,16; got {text!r}") from None
    if not values:
        raise TreeFlashError(f"{flag} needs at least one value")
    return values


def cmd_new_drafter(args: argparse.Namespace) -> int:
    from ..api import parse_dtype
    from ..drafters import new_drafter, save_drafter
    from ..targets import load_target

    target = load_target(args.target)
    drafter = new_drafter(target, num_hidden_layers=args.layers, block_size=args.block_size, seed=args.seed,
                          ar_head=not args.no_head)
    save_drafter(drafter, args.out, dtype=parse_dtype(args.dtype))
    c = drafter.config
    print(f"wrote an untrained {c.num_hidden_layers}-layer drafter (block {c.block_size}, target layers "
          f"{list(c.target_layer_ids)}, mask token {c.mask_token_id}, head: {c.ar_head}) for {target.name} to {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..api import SHIPPED_DRAFTERS, parse_dtype
    from ..drafters import check_compatible, load_drafter
    from ..export import export_drafter
    from ..targets import DEFAULT_TARGET, load_target

    path = SHIPPED_DRAFTERS[DEFAULT_TARGET] if args.drafter == "shipped" else args.drafter
    target_name = args.target or (DEFAULT_TARGET if args.drafter == "shipped" else None)
    target = load_target(target_name) if target_name else None
    drafter = load_drafter(path)  # in the checkpoint's own dtype (with a target it would take the target's)
    if target is not None:
        check_compatible(drafter, target)
    report = export_drafter(drafter, args.out, args.format, target=target, full_vocabulary=args.full_vocabulary,
                            dtype=parse_dtype(args.dtype) if args.dtype else None)
    for line in report.lines():
        print(line, file=sys.stderr)
    return 0


def cmd_train_average(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..api import parse_dtype
    from ..drafters import average_drafters, save_drafter

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TreeFlashError(f"{out} is not an empty directory; write the average into a new one")
    dtype = parse_dtype(args.dtype)
    drafter = average_drafters(args.drafters)
    save_drafter(drafter, out, dtype=dtype, extra={"averaged_from": [str(d) for d in args.drafters]})
    print(f"wrote the average of {len(args.drafters)} drafters ({str(dtype).removeprefix('torch.')}) to {out}")
    return 0


def _target_tokenizer(target: str | None):
    """(name, tokenizer) of a target without loading its weights (None = the embedded default)."""
    from transformers import AutoTokenizer

    from ..targets import DEFAULT_TARGET, default_target_path

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
    import json
    from pathlib import Path

    from ..train.records import EVAL_SETS, exclude_eval_prompts, load_prompts, regenerate
    from ..targets import load_target

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
    from ..api import parse_dtype

    if args.responses == "dataset":  # no generation: only the target's tokenizer is needed
        if args.server:
            raise TreeFlashError("--responses dataset writes the dataset's own replies and generates nothing; "
                                 "drop --server")
        from ..train.records import dataset_responses

        name, tokenizer = _target_tokenizer(args.target)
        counts = dataset_responses(tokenizer, kept, out, tokenizer.eos_token_id, max_new_tokens=args.max_new_tokens,
                                   max_prompt_tokens=args.max_prompt_tokens, batch_size=args.batch_size,
                                   target_name=name)
        print(json.dumps(counts))
        return 0

    if args.server:  # the target's tokenizer templates the prompts; a running server generates
        from ..train.records import regenerate_via_server

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
    import json

    from ..train.records import load_sequences
    from ..drafters import default_target_layer_ids
    from ..train.features import build_feature_cache
    from ..targets import load_target
    from ..train.loop import DEFAULT_TARGET_LAYERS

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
            return _features_in_workers(args, target, sequences, layers)
    counts = build_feature_cache(target, sequences, args.out, layers, shard_sequences=args.shard_sequences,
                                 source=f"{args.data}" + (f" from sequence {args.skip}" if args.skip else ""),
                                 progress=part == (0, 1), part=part)
    print(json.dumps(counts))
    return 0


def _features_in_workers(args: argparse.Namespace, target, sequences, layers) -> int:
    """`train features --workers N`: N processes of one torch thread each (on a small CPU two 1-thread passes
    make more tokens per second than one 2-thread pass), each writing every N-th shard; one progress bar here."""
    import os
    import subprocess
    import time
    from pathlib import Path

    import torch
    from tqdm.auto import tqdm

    from ..train.features import check_disk, plan_feature_cache, shards_done_tokens

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shards, todo = plan_feature_cache(sequences, out, args.shard_sequences)
    check_disk(out, sum(len(s.tokens) for i in todo for s in shards[i]), len(layers), target.hidden_size)
    n = args.workers
    threads = max(1, torch.get_num_threads() // n)
    print(f"{n} processes x {threads} torch threads; their logs in {out}/worker-K.log", file=sys.stderr)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    workers = []
    for k in range(n):
        log = open(out / f"worker-{k}.log", "w")
        workers.append((subprocess.Popen([sys.executable, "-m", "treeflash.cli", *args.argv, "--part", f"{k}/{n}"],
                                         stdout=subprocess.DEVNULL, stderr=log, env=env), log, k))
    bar = tqdm(total=sum(len(s.tokens) for s in sequences), desc="caching features", unit="tok", unit_scale=True)
    try:
        # Until all are done or one failed (`--part` takes precedence over `--workers` in each worker).
        while any(p.poll() is None for p, _, _ in workers) and all(p.poll() in (None, 0) for p, _, _ in workers):
            time.sleep(2)
            bar.update(shards_done_tokens(out, shards) - bar.n)
    finally:
        failed = [(p, k) for p, _, k in workers if p.poll() not in (None, 0)]
        for p, log, _ in workers:
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
    print(json.dumps({"sequences": len(sequences), "tokens": sum(len(s.tokens) for s in sequences),
                      "shards": len(shards), "written_now": len(todo)}))
    return 0


def _train_config_from_args(args: argparse.Namespace, stage: str):
    from ..train.loop import TrainConfig

    return TrainConfig(
        stage=stage, epochs=args.epochs, lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, batch_size=args.batch_size, anchors=args.anchors, max_length=args.max_length,
        max_sequences=args.max_sequences,
        gamma=args.gamma, loss=args.loss, labels=args.labels, finetune_backbone=getattr(args, "finetune_backbone", False),
        val_sequences=args.val_sequences, held_out=args.held_out, eval_every=args.eval_every,
        save_every=args.save_every, seed=args.seed,
        precision=args.precision, balance_features=not getattr(args, "no_balance_features", False),
        features=args.features, time_budget=args.time_budget,
    )


def cmd_train(args: argparse.Namespace) -> int:
    import json

    import torch

    from ..train import distributed
    from ..api import default_device, parse_dtype
    from ..train.records import load_sequences
    from ..drafters import load_drafter, new_drafter, save_drafter
    from ..targets import load_target
    from ..train.loop import train

    stage = args.step
    config = _train_config_from_args(args, stage)
    ranks = distributed.from_environment()  # several under torchrun
    distributed.check_batch(config.batch_size, ranks)
    device = distributed.device_for(ranks, args.device or default_device())
    # In bfloat16 the frozen target runs in bf16 too: features and the LM head at AMX speed.
    target = load_target(args.target, dtype=torch.bfloat16 if config.precision == "bfloat16" else torch.float32,
                         device=device)
    if args.add_layers and not args.init:
        raise TreeFlashError("--add-layers grows the --init drafter; pass --init PATH (a new drafter takes --layers)")
    if args.init:
        drafter = load_drafter(args.init, target, dtype=torch.float32)
        if stage == "head" and drafter.ar_approximation is None:
            drafter = _with_head(drafter, target)
        if args.add_layers:
            from ..drafters import grow_drafter

            drafter = grow_drafter(drafter, args.add_layers, seed=args.seed)
            print(f"grew the drafter to {drafter.config.num_hidden_layers} layers (the new ones start as the identity)",
                  file=sys.stderr)
    elif stage == "head":
        raise TreeFlashError("training a head starts from a trained drafter; pass --init PATH")
    if not args.data and not config.features:
        raise TreeFlashError("training needs data: pass --data (regenerated sequences) or --features (a feature cache)")
    if config.features:
        from ..train.features import FeatureCache

        sequences = FeatureCache(config.features).sequences[: config.max_sequences]
    else:
        sequences = load_sequences(args.data, max_length=config.max_length)[: config.max_sequences]
    if not args.init:
        vocab = None
        if args.draft_vocab:
            from ..train.loop import draft_vocabulary

            vocab, coverage = draft_vocabulary(sequences, args.draft_vocab, always=target.eos_token_ids)
            print(f"draft vocabulary: {vocab.numel()} tokens covering {100 * coverage:.1f}% of response tokens",
                  file=sys.stderr)
        from ..drafters import default_target_layer_ids

        drafter = new_drafter(target, num_hidden_layers=args.layers, block_size=args.block_size, seed=args.seed,
                              draft_vocab=vocab,
                              target_layer_ids=default_target_layer_ids(target.num_layers, args.target_layers))
        drafter.float()  # master weights
        if args.init_from_target:
            from ..train.loop import initialize_from_target

            copied = initialize_from_target(drafter, target)
            print(f"initialised {len(copied)} drafter tensors from the target's last layers", file=sys.stderr)
    drafter.to(target.device)
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


def _with_head(drafter, target):
    """A copy of a head-less drafter with a fresh (zero) TreeFlash head."""
    import dataclasses

    from ..drafters import Drafter

    config = dataclasses.replace(drafter.config, ar_head=True)
    fresh = Drafter(config).to(device=target.device, dtype=next(drafter.parameters()).dtype)
    missing = fresh.load_state_dict(drafter.state_dict(), strict=False).missing_keys
    assert all(k.startswith("ar_approximation.") for k in missing)
    return fresh


def _add_train_flags(p: argparse.ArgumentParser, stage: str) -> None:
    from ..train.loop import TrainConfig

    d = TrainConfig(stage=stage)
    lr = 1e-3 if stage == "drafter" else 1e-4  # the drafter's: the shipped recipe (training/README.md)
    p.add_argument("--data", default=None, help="regenerated data (the --out of `treeflash train data`), or "
                                                 "several such directories comma-separated")
    p.add_argument("--features", default=None,
                   help="a feature cache (`treeflash train features`), or several comma-separated: train on "
                        "their sequences without running the target (instead of --data)")
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
        from ..train.loop import DEFAULT_BLOCK_SIZE, DEFAULT_LAYERS, DEFAULT_TARGET_LAYERS

        p.add_argument("--layers", type=int, default=DEFAULT_LAYERS, help="layers of a new drafter (default: %(default)s)")
        p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                       help="block size of a new drafter (default: %(default)s)")
        p.add_argument("--target-layers", type=int, default=DEFAULT_TARGET_LAYERS,
                       help="target layers a new drafter reads, spread from layer 1 to L-3 (default: %(default)s)")
        p.add_argument("--init-from-target", action="store_true",
                       help="start the drafter's layers from the target's last layers (where shapes agree; "
                            "measured worse than random init, see training/README.md)")
        p.add_argument("--draft-vocab", type=int, default=None,
                       help="predict only the N most frequent response tokens (a reduced draft vocabulary; "
                            "default: the whole vocabulary)")
    else:
        p.add_argument("--finetune-backbone", action="store_true", help="also train the drafter's backbone")
    p.add_argument("--no-balance-features", action="store_true",
                   help="train fc on the raw target features (default: behind a fixed per-feature scale that "
                        "evens out the target's massive activations; saved checkpoints are the same format either way)")
    p.add_argument("--epochs", type=float, default=d.epochs, help=f"(default: {d.epochs})")
    p.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default: {lr})")
    p.add_argument("--warmup", type=float, default=d.warmup, help=f"share of warm-up steps (default: {d.warmup})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"(default: {d.weight_decay})")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help=f"(default: {d.grad_clip})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"sequences per step (default: {d.batch_size})")
    p.add_argument("--anchors", type=int, default=d.anchors, help=f"blocks per sequence (default: {d.anchors})")
    p.add_argument("--max-length", type=int, default=d.max_length, help=f"(default: {d.max_length})")
    p.add_argument("--max-sequences", type=int, default=None,
                   help="use only the first N sequences, so a run resumes on the same data while more is made")
    p.add_argument("--gamma", type=float, default=None, help="position-weight decay (default: 7 for block 16)")
    p.add_argument("--loss", choices=("ce", "kl", "ce+kl"), default=None,
                   help="ce (true tokens), kl (to the target's distribution) or their mean "
                        "(default: ce for drafters, kl for heads)")
    p.add_argument("--labels", choices=("data", "target"), default="data",
                   help="what cross-entropy aims at: data, each sequence's own next token (regenerated data: the "
                        "target's); target, the target's greedy token there, for text the target did not write "
                        "(`train data --responses dataset`) (default: data)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="minutes of training: the schedule spans this time instead of --epochs")
    p.add_argument("--val-sequences", type=int, default=d.val_sequences, help=f"(default: {d.val_sequences})")
    p.add_argument("--held-out", default=None, metavar="FILE[,FILE]",
                   help="validate on the records an earlier run held out (its held_out.json; several joined by "
                        "commas) instead of --val-sequences drawn from this data: they are never trained on")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help=f"(default: {d.eval_every})")
    p.add_argument("--save-every", type=int, default=d.save_every, help=f"(default: {d.save_every})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"(default: {d.seed})")
    p.add_argument("--precision", choices=("float32", "bfloat16"), default=d.precision,
                   help="bfloat16: bf16 target and autocast drafter, ~3x faster on CPUs with AMX (default: float32)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps in this sitting (0: only validate the --init drafter as it is, "
                        "on this data's held-out sequences)")
    p.add_argument("--export", default=None, help="when the run is complete, also save the drafter here")
    p.add_argument("--export-dtype", default="bfloat16", help="dtype of the exported weights (default: bfloat16)")
    p.set_defaults(func=cmd_train, resumes=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="treeflash", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text losslessly with a draft method")
    g.add_argument("prompt", help="the prompt (one user turn of the chat template unless --no-chat)")
    g.add_argument("--no-chat", action="store_true", help="feed the prompt as raw text, without the chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    _add_model_flags(g)
    _add_decode_flags(g)
    g.set_defaults(func=cmd_generate)

    n = sub.add_parser("new-drafter", help="create an untrained drafter for a target")
    n.add_argument("out", help="output directory")
    n.add_argument("--target", default=None, help="target model (default: the embedded SmolLM2-135M-Instruct)")
    n.add_argument("--layers", type=int, default=5, help="drafter layers (default: 5)")
    n.add_argument("--block-size", type=int, default=16, help="block size b (default: 16)")
    n.add_argument("--no-head", action="store_true", help="no TreeFlash head (a plain DFlash drafter)")
    n.add_argument("--seed", type=int, default=0, help="initialisation seed (default: 0)")
    n.add_argument("--dtype", default="float32", help="dtype of the saved weights (default: float32)")
    n.set_defaults(func=cmd_new_drafter)

    from ..export import FORMATS

    e = sub.add_parser("export", help="write a drafter's DFlash backbone for vLLM, SGLang or the z-lab code")
    e.add_argument("drafter", help="the drafter's directory, or 'shipped' for the default target's")
    e.add_argument("out", help="a new output directory")
    e.add_argument("--format", required=True, choices=FORMATS, help="the engine that will load it")
    e.add_argument("--target", default=None,
                   help="the drafter's target (needed for a reduced draft vocabulary; default: the embedded "
                        "SmolLM2-135M-Instruct for 'shipped')")
    e.add_argument("--full-vocabulary", action="store_true",
                   help="drop a reduced draft vocabulary, for engines that draft over the target's whole one")
    e.add_argument("--dtype", default=None, help="dtype of the written weights (default: the checkpoint's)")
    e.set_defaults(func=cmd_export)

    from ..serve.app import add_serve_flags

    s = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API (needs the `serve` extra)")
    _add_model_flags(s)
    add_serve_flags(s)

    from ..tuning import DEFAULT_BUDGETS, DEFAULT_CANDIDATES, DEFAULT_LOOKUPS, DEFAULT_REPEATS, DEFAULT_TUNE_TOKENS

    t = sub.add_parser("tune", help="time budgets, candidate counts and lookup lengths on this machine; keep the "
                                    "fastest as defaults")
    _add_model_flags(t)
    t.add_argument("--budgets", default=",".join(map(str, DEFAULT_BUDGETS)),
                   help="comma-separated budgets to time for ddtree and treeflash (default: %(default)s)")
    t.add_argument("--candidate-tokens", default=",".join(map(str, DEFAULT_CANDIDATES)),
                   help="comma-separated TreeFlash candidate counts m to time at the best budget (default: %(default)s)")
    t.add_argument("--lookups", default=",".join(map(str, DEFAULT_LOOKUPS)),
                   help="comma-separated n-gram lookup lengths (0 = off) to time for ddtree and treeflash at their "
                        "best settings (default: %(default)s)")
    t.add_argument("--prompts", type=int, default=3, help="built-in calibration prompts to use, 1-3 (default: 3)")
    t.add_argument("--max-new-tokens", type=int, default=DEFAULT_TUNE_TOKENS, help="per prompt (default: %(default)s)")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice); "
                   "a tuning holds for this thread count only")
    t.add_argument("--repeats", type=int, default=DEFAULT_REPEATS,
                   help="time each prompt this many times and keep the fastest (default: %(default)s)")
    t.add_argument("--dry-run", action="store_true", help="measure and print, but save nothing")
    t.set_defaults(func=cmd_tune)

    from ..bench import add_bench_flags

    b = sub.add_parser("bench", help="benchmark every method against ar and transformers generate; report, plots")
    _add_model_flags(b)
    add_bench_flags(b)

    train = sub.add_parser("train", help="make training data, train drafters and TreeFlash heads")
    steps = train.add_subparsers(dest="step", required=True)
    from ..train.records import REGENERATION_ENGINES

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
    d.add_argument("--max-new-tokens", type=int, default=256, help="response length cap (default: 256)")
    d.add_argument("--max-prompt-tokens", type=int, default=512, help="skip longer prompts (default: 512)")
    d.add_argument("--batch-size", type=int, default=16, help="prompts generated together (default: 16)")
    d.add_argument("--temperature", type=float, default=0.0, help="0 = the target's greedy responses (default)")
    d.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    d.add_argument("--dtype", default="float32",
                   help="target dtype for generation; bfloat16 is ~3x faster on CPUs with AMX (default: float32)")
    d.add_argument("--engine", default="treeflash", choices=REGENERATION_ENGINES,
                   help="treeflash: this library's ar, batched, on packed weights (2.5x transformers on a 2-core "
                        "CPU); transformers: model.generate, as data made before this flag was (default: treeflash)")
    d.add_argument("--server", default=None,
                   help="generate through a running OpenAI-compatible server (vLLM, SGLang, treeflash serve) at this "
                        "URL instead of in this process; --target then only gives the tokenizer")
    d.add_argument("--server-model", default=None, help="the model id to ask the server for (default: its first)")
    d.add_argument("--concurrency", type=int, default=8, help="requests in flight with --server (default: 8)")
    d.add_argument("--retries", type=int, default=5,
                   help="tries again after a failed request, with backoff, with --server (default: 5)")
    d.add_argument("--features", default=None,
                   help="also write a feature cache (as `treeflash train features` makes) to this directory, taken "
                        "from the passes that generate: training data and its features for the price of one "
                        "target pass; data shards written without it get a feature pass at the end")
    d.add_argument("--layers", default=None,
                   help="with --features: comma-separated target layers to cache (default: those a new drafter "
                        "reads)")
    d.set_defaults(func=cmd_train_data, resumes=True)
    from ..train.features import DEFAULT_SHARD_SEQUENCES

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
    f.add_argument("--max-length", type=int, default=1024, help="tokens per sequence, longer ones are cut (default: 1024)")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded by commands that write results
    try:
        return args.func(args)
    except TreeFlashError as e:
        print(f"treeflash: error: {e}", file=sys.stderr)
        from ..train.distributed import LostPeer

        if isinstance(e, LostPeer):  # leave before the traceback's DDP and process group are freed (see LostPeer)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback; what was written stays whole
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):  # end the progress bars it cut short, above the line
            bar.close()
        again = "; the same command resumes from what was written" if getattr(args, "resumes", False) else ""
        print(f"treeflash: interrupted{again}", file=sys.stderr)
        return 130

