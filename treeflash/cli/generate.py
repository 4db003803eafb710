"""`treeflash generate`: one prompt, streamed to the terminal (or one JSON object)."""

from __future__ import annotations

import argparse
import json
import sys

from ..api import load
from ..decoding import STAGES
from .flags import add_decode_flags, add_model_flags, decode_config_from_args


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="generate text losslessly with a draft method")
    g.add_argument("prompt", help="the prompt (one user turn of the chat template unless --no-chat)")
    g.add_argument("--no-chat", action="store_true", help="feed the prompt as raw text, without the chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    add_model_flags(g)
    add_decode_flags(g)
    g.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
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
