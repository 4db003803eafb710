"""Interleaved A/B timing of two decode settings on the bench's prompts, for differences of a few percent.

`treeflash bench` runs each variant over all prompts in turn, so a machine whose speed drifts during a run
(another tenant, frequency changes) can move two variants' ratio by several percent. Here each prompt runs A
and B alternately, `--repeats` times each (order flipped every repeat), and keeps each setting's fastest time
per prompt; greedy, so both produce the same tokens every time (checked).

    python scripts/ab_decode.py OUT.md --a method=treeflash,lookup=8,lookup_ngram=2 \
        --b method=treeflash,lookup=8,lookup_ngram=1 [--datasets mtbench,humaneval] [--prompts 4] \
        [--max-new-tokens 256] [--repeats 3] [--threads 2] [--target DIR]

Settings are DecodeConfig fields (ints where they parse as ints), plus `drafter=PATH` to compare drafters
(default: the shipped one; `untrained` for a fresh one), `drafter_dtype=bfloat16|float32` to compare the
precision a drafter runs in, and `code=DIR` to compare versions of the code: DIR is a checkout of this
repository whose `treeflash` that setting runs (e.g. `git worktree add /tmp/before HEAD~1`, then
`--a code=/tmp/before --b code=.`). Each setting decodes in its own process (scripts/ab_worker.py), the two
taking turns. Datasets are what `treeflash bench --datasets` takes (names or JSONL files). Writes a Markdown
table: per dataset and pooled, tau and tokens/s of each, and B / A.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from treeflash.decoding import tau
from treeflash.machine import cpu_model
from treeflash.train.prompts import load_prompts


def parse_setting(text: str) -> dict:
    out = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        out[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value.strip()
    return out


LOADING = ("drafter", "drafter_dtype", "code")  # where a setting's decoder comes from, not DecodeConfig fields
WORKER = Path(__file__).with_name("ab_worker.py")
RESULT = "RESULT "  # ab_worker.py's answer lines


class Worker:
    """One setting's decoder in its own process, running the treeflash of `code` (default: this one)."""

    def __init__(self, name: str, setting: dict, args: argparse.Namespace):
        self.name = name
        config = {"max_new_tokens": args.max_new_tokens, **{k: v for k, v in setting.items() if k not in LOADING}}
        spec = {"target": args.target, "drafter": setting.get("drafter"), "drafter_dtype": setting.get("drafter_dtype"),
                "threads": args.threads, "config": config}
        env = dict(os.environ)
        if "code" in setting:
            code = Path(setting["code"]).resolve()
            if not (code / "treeflash" / "__init__.py").exists():
                raise SystemExit(f"code={setting['code']} has no treeflash/__init__.py; pass a checkout of this repository")
            env["PYTHONPATH"] = os.pathsep.join([str(code), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self.process = subprocess.Popen([sys.executable, str(WORKER), json.dumps(spec)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env)
        self.package = None  # the treeflash it runs, once `wait_ready` has heard from it

    def wait_ready(self) -> None:
        """Wait until the worker has loaded and warmed up (both start together, so their start-ups overlap)."""
        self.package = self.answer()["treeflash"]

    def answer(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(RESULT):
                return json.loads(line[len(RESULT):])
        raise SystemExit(f"setting {self.name}'s decoder exited ({self.process.wait()}); its error is above")

    def generate(self, prompt: str) -> dict:
        self.process.stdin.write(json.dumps({"prompt": prompt}) + "\n")
        self.process.stdin.flush()
        return self.answer()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()  # the worker's loop ends at end of input
        self.process.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the Markdown table to write")
    p.add_argument("--a", required=True, help="setting A: KEY=VALUE,... (DecodeConfig fields, drafter, drafter_dtype, code)")
    p.add_argument("--b", required=True, help="setting B, as --a")
    p.add_argument("--target", default=None, help="target directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--datasets", default="mtbench,humaneval", help="prompt sets or JSONL files, comma-separated")
    p.add_argument("--prompts", type=int, default=4, help="prompts per dataset")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="runs of each setting per prompt; the fastest counts")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each setting's process")
    args = p.parse_args()
    settings = {"A": parse_setting(args.a), "B": parse_setting(args.b)}
    prompts = {dataset: load_prompts(dataset, limit=args.prompts) for dataset in args.datasets.split(",")}
    workers = {}
    try:
        for k, setting in settings.items():
            workers[k] = Worker(k, setting, args)
        for worker in workers.values():
            worker.wait_ready()
        rows = {}  # dataset -> {"A": [tokens, seconds, acceptance lengths], "B": ...}
        for dataset, dataset_prompts in prompts.items():
            total = {k: [0, 0.0, []] for k in settings}
            for prompt in dataset_prompts:
                best, tokens = {}, {}
                for r in range(args.repeats):
                    for k in (("A", "B") if r % 2 == 0 else ("B", "A")):
                        result = workers[k].generate(prompt.text)
                        best[k] = min(best.get(k, float("inf")), result["seconds"])
                        tokens.setdefault(k, (result["token_ids"], result["acceptance_lengths"]))
                        if result["token_ids"] != tokens[k][0]:
                            raise SystemExit(f"{k} gave different tokens on a repeat of {prompt.id}")
                if tokens["A"][0] != tokens["B"][0]:
                    raise SystemExit(f"A and B gave different tokens on {prompt.id}: not lossless?")
                for k in settings:
                    total[k][0] += len(tokens[k][0])
                    total[k][1] += best[k]
                    total[k][2] += tokens[k][1]
                print(f"{dataset} {prompt.id}: A {len(tokens['A'][0]) / best['A']:.1f} tok/s, "
                      f"B {len(tokens['B'][0]) / best['B']:.1f} tok/s", file=sys.stderr, flush=True)
            rows[dataset] = total
    finally:
        for worker in workers.values():
            worker.close()
    packages = {k: worker.package for k, worker in workers.items()}
    sets = list(prompts)
    rows["all"] = {k: [sum(rows[d][k][0] for d in sets), sum(rows[d][k][1] for d in sets),
                       [x for d in sets for x in rows[d][k][2]]] for k in settings}
    lines = [f"A = {settings['A']}, B = {settings['B']}; {args.prompts} prompts per set, {args.max_new_tokens} new "
             f"tokens, greedy, each prompt's fastest of {args.repeats} interleaved runs. Machine: {cpu_model()} "
             f"({platform.machine()}), {args.threads} torch threads, torch {torch.__version__}. Command: "
             f"`python scripts/ab_decode.py {' '.join(sys.argv[1:])}`. Code: A {packages['A']}, B {packages['B']}. "
             "Both produced the same tokens on every prompt.", "",
             "| dataset | A tau | A tokens/s | B tau | B tokens/s | B / A tokens/s |", "|---|---|---|---|---|---|"]
    for dataset, total in rows.items():
        (ta, sa, ra), (tb, sb, rb) = total["A"], total["B"]
        lines.append(f"| {dataset} | {tau(ra):.2f} | {ta / sa:.1f} | {tau(rb):.2f} | {tb / sb:.1f} | "
                     f"{(tb / sb) / (ta / sa):.3f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
