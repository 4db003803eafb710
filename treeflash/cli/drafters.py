"""`treeflash new-drafter` and `treeflash export`: write a drafter checkpoint, new or for another engine."""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

from ..api import SHIPPED_DRAFTERS, parse_dtype
from ..drafters import check_compatible, load_drafter, new_drafter, save_drafter
from ..export import FORMATS, export_drafter
from ..targets import DEFAULT_TARGET, load_target


def add_parsers(sub) -> None:
    n = sub.add_parser("new-drafter", help="create an untrained drafter for a target")
    n.add_argument("out", help="output directory")
    n.add_argument("--target", default=None, help="target model (default: the embedded SmolLM2-135M-Instruct)")
    d = {name: p.default for name, p in inspect.signature(new_drafter).parameters.items()}  # its defaults, once
    n.add_argument("--layers", type=int, default=d["num_hidden_layers"], help="drafter layers (default: %(default)s)")
    n.add_argument("--block-size", type=int, default=d["block_size"], help="block size b (default: %(default)s)")
    n.add_argument("--no-head", action="store_true", help="no TreeFlash head (a plain DFlash drafter)")
    n.add_argument("--seed", type=int, default=d["seed"], help="initialisation seed (default: %(default)s)")
    n.add_argument("--dtype", default="float32", help="dtype of the saved weights (default: float32)")
    n.set_defaults(func=cmd_new_drafter)

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


def cmd_new_drafter(args: argparse.Namespace) -> int:
    target = load_target(args.target)
    drafter = new_drafter(target, num_hidden_layers=args.layers, block_size=args.block_size, seed=args.seed,
                          ar_head=not args.no_head)
    save_drafter(drafter, args.out, dtype=parse_dtype(args.dtype))
    c = drafter.config
    print(f"wrote an untrained {c.num_hidden_layers}-layer drafter (block {c.block_size}, target layers "
          f"{list(c.target_layer_ids)}, mask token {c.mask_token_id}, head: {c.ar_head}) for {target.name} to {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    path = SHIPPED_DRAFTERS[DEFAULT_TARGET] if args.drafter == "shipped" else args.drafter
    drafter = load_drafter(path)  # in the checkpoint's own dtype (with a target it would take the target's)
    target_name = args.target or (DEFAULT_TARGET if args.drafter == "shipped" else recorded_target(drafter))
    target = load_target(target_name) if target_name else None
    if target is not None:
        check_compatible(drafter, target)
    report = export_drafter(drafter, args.out, args.format, target=target, full_vocabulary=args.full_vocabulary,
                            dtype=parse_dtype(args.dtype) if args.dtype else None)
    for line in report.lines():
        print(line, file=sys.stderr)
    return 0


def recorded_target(drafter) -> str | None:
    """The target a checkpoint names (`target_model` in its config) when it can be loaded here without a
    download: the embedded default target, or a local model directory; else None (the user passes --target)."""
    name = drafter.config.target
    if name == DEFAULT_TARGET or (name and Path(name).is_dir()):
        return name
    return None
