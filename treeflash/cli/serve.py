"""`treeflash serve`: an OpenAI-compatible HTTP server (`treeflash.serve`); needs the `serve` extra."""

from __future__ import annotations

import argparse
import logging
import sys

from ..api import load
from ..decoding import METHODS
from ..errors import TreeFlashError
from ..serve.app import ServeConfig, Server, uvicorn_server
from .flags import BUDGET_DEFAULT, add_dataclass_flags, add_model_flags, dataclass_from_args


def add_parser(sub) -> None:
    s = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API (needs the `serve` extra)")
    add_model_flags(s)
    add_dataclass_flags(s, ServeConfig, choices={"method": METHODS}, default_text={"budget": BUDGET_DEFAULT},
                        own_help={"method": "decoding method of requests that name none",
                                  "budget": "draft nodes per round for requests that name none"})
    s.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import starlette  # noqa: F401  (optional: checked before the model loads)
        import uvicorn  # noqa: F401
    except ImportError:
        raise TreeFlashError("serving needs starlette and uvicorn; install them with "
                             "`pip install 'treeflash[serve]'`") from None
    config = dataclass_from_args(ServeConfig, args)  # validate flags before loading anything
    decoder = load(args.target, args.drafter, device=args.device, dtype=args.dtype, drafter_dtype=args.drafter_dtype)
    server = Server(decoder, config)
    logging.basicConfig(level=logging.INFO, format="[treeflash] %(message)s")
    print(f"[treeflash] serving {server.model_name} (method {server.config.method}, max_batch {config.max_batch}) at "
          f"http://{config.host}:{config.port}/v1", file=sys.stderr, flush=True)
    uvicorn_server(server, config.host, config.port).run()
    return 0
