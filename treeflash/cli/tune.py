"""`treeflash tune`: time budgets, candidate counts and lookup lengths on this machine; keep the fastest as the
defaults of generate, serve and the Python API."""

from __future__ import annotations

import argparse
import shlex
import sys

import torch

from ..api import load
from ..errors import TreeFlashError
from ..trees import check_budget
from ..tuning import (CALIBRATION_PROMPTS, DEFAULT_BUDGETS, DEFAULT_CANDIDATES, DEFAULT_LOOKUPS, DEFAULT_REPEATS,
                      DEFAULT_TUNE_TOKENS, report, save_tuning, tune)
from .flags import add_model_flags, int_list


def add_parser(sub) -> None:
    t = sub.add_parser("tune", help="time budgets, candidate counts and lookup lengths on this machine; keep the "
                                    "fastest as defaults")
    add_model_flags(t)
    t.add_argument("--budgets", default=",".join(map(str, DEFAULT_BUDGETS)),
                   help="comma-separated budgets to time for ddtree and treeflash (default: %(default)s)")
    t.add_argument("--candidate-tokens", default=",".join(map(str, DEFAULT_CANDIDATES)),
                   help="comma-separated TreeFlash candidate counts m to time at the best budget (default: %(default)s)")
    t.add_argument("--lookups", default=",".join(map(str, DEFAULT_LOOKUPS)),
                   help="comma-separated n-gram lookup lengths (0 = off) to time for ddtree and treeflash at their "
                        "best settings (default: %(default)s)")
    t.add_argument("--prompts", type=int, default=len(CALIBRATION_PROMPTS),
                   help=f"built-in calibration prompts to use, 1-{len(CALIBRATION_PROMPTS)} (default: %(default)s)")
    t.add_argument("--max-new-tokens", type=int, default=DEFAULT_TUNE_TOKENS, help="per prompt (default: %(default)s)")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice); "
                   "a tuning holds for this thread count only")
    t.add_argument("--repeats", type=int, default=DEFAULT_REPEATS,
                   help="time each prompt this many times and keep the fastest (default: %(default)s)")
    t.add_argument("--dry-run", action="store_true", help="measure and print, but save nothing")
    t.set_defaults(func=cmd_tune)


def cmd_tune(args: argparse.Namespace) -> int:
    # Flags are checked before the model loads.
    budgets = [check_budget(b) for b in int_list(args.budgets, "--budgets")]
    candidates = int_list(args.candidate_tokens, "--candidate-tokens")
    lookups = int_list(args.lookups, "--lookups")
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
