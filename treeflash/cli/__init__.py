"""`treeflash` command line: a thin layer over the Python API. Flags map one-to-one onto the config dataclasses
(DecodeConfig, BenchConfig, ServeConfig, TrainConfig; see `treeflash.cli.flags`).

One module per command group: generate, tune, bench, serve, drafters (new-drafter, export), train."""

from __future__ import annotations

import argparse
import os
import sys

from tqdm import tqdm

from ..errors import TreeFlashError
from ..train.distributed import LostPeer
from . import bench, drafters, generate, serve, train, tune


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="treeflash", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    generate.add_parser(sub)
    drafters.add_parsers(sub)
    serve.add_parser(sub)
    tune.add_parser(sub)
    bench.add_parser(sub)
    train.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded by commands that write results
    try:
        return args.func(args)
    except TreeFlashError as e:
        print(f"treeflash: error: {e}", file=sys.stderr)
        if isinstance(e, LostPeer):  # leave before the traceback's DDP and process group are freed (see LostPeer)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback; what was written stays whole
        for bar in list(getattr(tqdm, "_instances", ())):  # end the progress bars it cut short, above the line
            bar.close()
        again = "; the same command resumes from what was written" if getattr(args, "resumes", False) else ""
        print(f"treeflash: interrupted{again}", file=sys.stderr)
        return 130
