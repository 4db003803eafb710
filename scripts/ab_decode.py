"""Interleaved A/B timing of two decode settings on the bench's prompts, for differences of a few percent.

`treeflash bench` runs each variant over all prompts in turn, so a machine whose speed drifts during a run
(another tenant, frequency changes) can move two variants' ratio by several percent. Here each prompt runs A
and B alternately, `--repeats` times each (order flipped every repeat), and keeps each setting's fastest time
per prompt; greedy, so both produce the same tokens every time (checked).

    python scripts/ab_decode.py OUT.md --a method=treeflash,lookup=8,lookup_ngram=2 \
        --b method=treeflash,lookup=8,lookup_ngram=1 [--datasets mtbench,humaneval] [--prompts 4] \
        [--max-new-tokens 256] [--repeats 3] [--threads 2]

Settings are DecodeConfig fields (ints where they parse as ints), plus `drafter=PATH` to compare drafters
(default: the shipped one) and `drafter_dtype=bfloat16|float32` to compare the precision a drafter runs in. Writes a Markdown table: per dataset and pooled, tau and tokens/s of each, and B / A.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

from treeflash.api import load
from treeflash.data import load_prompts
from treeflash.decoding import DecodeConfig, tau
from treeflash.packing import cpu_model


def parse_setting(text: str) -> dict:
    out = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        out[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value.strip()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--a", required=True)
    p.add_argument("--b", required=True)
    p.add_argument("--datasets", default="mtbench,humaneval")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    settings = {"A": parse_setting(args.a), "B": parse_setting(args.b)}
    loading = ("drafter", "drafter_dtype")  # arguments of `load`, not DecodeConfig fields
    drafters = {k: tuple(v.get(f) for f in loading) for k, v in settings.items()}
    configs = {k: DecodeConfig(max_new_tokens=args.max_new_tokens, **{f: x for f, x in v.items() if f not in loading})
               for k, v in settings.items()}
    loaded = {key: load(**dict(zip(loading, key))) for key in dict.fromkeys(drafters.values())}  # one per drafter
    decoders = {k: loaded[drafters[k]] for k in settings}
    for decoder in loaded.values():
        decoder.generate(decoder.target.encode_prompt("Hello"), DecodeConfig(max_new_tokens=16))  # warm-up
    decoder = decoders["A"]
    rows = {}  # dataset -> {"A": [tokens, seconds, acceptance lengths], "B": ...}
    for dataset in args.datasets.split(","):
        total = {k: [0, 0.0, []] for k in configs}
        for prompt in load_prompts(dataset, limit=args.prompts):
            ids = decoder.target.encode_prompt(prompt.text)
            best, tokens = {}, {}
            for r in range(args.repeats):
                for k in (("A", "B") if r % 2 == 0 else ("B", "A")):
                    result = decoders[k].generate(list(ids), configs[k])
                    best[k] = min(best.get(k, float("inf")), result.seconds)
                    tokens.setdefault(k, (result.token_ids, list(result.acceptance_lengths)))
                    if result.token_ids != tokens[k][0]:
                        raise SystemExit(f"{k} gave different tokens on a repeat of {prompt.id}")
            if tokens["A"][0] != tokens["B"][0]:
                raise SystemExit(f"A and B gave different tokens on {prompt.id}: not lossless?")
            for k in configs:
                total[k][0] += len(tokens[k][0])
                total[k][1] += best[k]
                total[k][2] += tokens[k][1]
            print(f"{dataset} {prompt.id}: A {len(tokens['A'][0]) / best['A']:.1f} tok/s, "
                  f"B {len(tokens['B'][0]) / best['B']:.1f} tok/s", file=sys.stderr, flush=True)
        rows[dataset] = total
    sets = args.datasets.split(",")
    rows["all"] = {k: [sum(rows[d][k][0] for d in sets), sum(rows[d][k][1] for d in sets),
                       [x for d in sets for x in rows[d][k][2]]] for k in configs}
    lines = [f"A = {settings['A']}, B = {settings['B']}; {args.prompts} prompts per set, {args.max_new_tokens} new "
             f"tokens, greedy, each prompt's fastest of {args.repeats} interleaved runs. Machine: {cpu_model()} "
             f"({platform.machine()}), {args.threads} torch threads, torch {torch.__version__}. Command: "
             f"`python scripts/ab_decode.py {args.out} --a {args.a} --b {args.b} --datasets {args.datasets} "
             f"--prompts {args.prompts} --max-new-tokens {args.max_new_tokens} --repeats {args.repeats} "
             f"--threads {args.threads}`. Both produced the same tokens on every prompt.", "",
             "| dataset | A tau | A tokens/s | B tau | B tokens/s | B / A tokens/s |", "|---|---|---|---|---|---|"]
    for dataset, total in rows.items():
        (ta, sa, ra), (tb, sb, rb) = total["A"], total["B"]
        lines.append(f"| {dataset} | {tau(ra):.2f} | {ta / sa:.1f} | {tau(rb):.2f} | {tb / sb:.1f} | "
                     f"{(tb / sb) / (ta / sa):.3f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
