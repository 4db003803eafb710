"""Teacher-forced validation of drafters on the bench's own prompts.

The bench decodes 4-8 prompts per set, too few to resolve a few percent of tau. Teacher-forced validation (what
`treeflash train` logs on its held-out records, and what decoding was shown to follow:
scripts/decode_vs_validation.py) resolves much less from the same prompts, for a fraction of the time. This
script regenerates the target's greedy continuation of every prompt of the bench's sets once (float32, our own
`ar`, cached under ~/.cache/treeflash/eval/; never training data), then validates each drafter on all of them:
top-1 agreement with the target by block position, marginal and conditional chain tau (the tau a dflash chain
drafted from those argmaxes would reach), anchor sensitivity.

    python scripts/bench_prompt_validation.py OUT.json NAME=DRAFTER_DIR [NAME=DRAFTER_DIR ...] \
        [--datasets mtbench,humaneval,sharegpt-heldout] [--prompts 80] [--anchors 128] [--threads 1]

Writes OUT.json and OUT.md (a table per dataset and pooled). Older shipped drafters come from git:
    mkdir -p /tmp/v6 && for f in config.json model.safetensors; do git show \
        cc9513d:treeflash/checkpoints/smollm2-135m-instruct-treeflash/$f > /tmp/v6/$f; done
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from treeflash.api import resolve_drafter
from treeflash.data import load_prompts, load_sequences, regenerate
from treeflash.targets import load_target
from treeflash.training import TrainConfig, evaluate, profile

EVAL_DIR = Path.home() / ".cache" / "treeflash" / "eval"


def continuations(target, dataset: str, prompts: int, max_new_tokens: int):
    """The target's greedy continuations of a bench set's first `prompts` prompts (made once, then read)."""
    out = EVAL_DIR / f"{dataset}-{max_new_tokens}"
    items = load_prompts(dataset, limit=prompts)
    regenerate(target, target.tokenizer, items, out, max_new_tokens=max_new_tokens, max_prompt_tokens=4096,
               batch_size=16, target_name=target.name)
    return load_sequences(out)[:prompts]


def table(results: dict, dataset: str) -> list[str]:
    lines = [f"### {dataset}", "",
             "| drafter | records | marginal top-1 by position | chain tau | conditional top-1 by position "
             "| chain tau | anchor sensitivity |", "|---|---|---|---|---|---|---|"]
    for name, per_set in results.items():
        r = per_set[dataset]
        cond = (f"{profile(r['conditional_top1'])} | {r['conditional_chain_tau']:.3f}" if "conditional_top1" in r
                else "– | –")
        lines.append(f"| {name} | {r['records']} | {profile(r['marginal_top1'])} | {r['marginal_chain_tau']:.3f} | "
                     f"{cond} | {r['anchor_sensitivity']:.2f} |")
    return lines + [""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="results JSON (a Markdown twin is written beside it)")
    p.add_argument("drafters", nargs="+", help="NAME=DRAFTER_DIR")
    p.add_argument("--datasets", default="mtbench,humaneval,sharegpt-heldout")
    p.add_argument("--prompts", type=int, default=80, help="prompts per dataset (its first N)")
    p.add_argument("--anchors", type=int, default=128, help="anchors per record, as the training validation")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    drafters = {}
    for spec in args.drafters:
        name, sep, path = spec.partition("=")
        if not sep or not Path(path, "config.json").exists():
            sys.exit(f"drafter {spec!r} is not NAME=DIR with a config.json in DIR; give e.g. seventh=treeflash/checkpoints/...")
        drafters[name] = path
    target = load_target(None)
    datasets = args.datasets.split(",")
    data = {d: continuations(target, d, args.prompts, args.max_new_tokens) for d in datasets}
    results = {}
    for name, path in drafters.items():
        drafter = resolve_drafter(path, target, torch.float32)
        config = TrainConfig(stage="head", anchors=args.anchors, max_length=4096)  # the bench's prompts run long
        results[name] = {}
        for d in datasets:
            started = time.time()
            r = evaluate(drafter, target, data[d], config)
            r["records"] = len(data[d])
            results[name][d] = r
            print(f"{name} {d}: marginal chain tau {r['marginal_chain_tau']:.3f}, conditional "
                  f"{r.get('conditional_chain_tau', float('nan')):.3f}, position 1 {r['marginal_top1'][0]:.3f} "
                  f"({time.time() - started:.0f} s)", flush=True)
        pooled = {}
        for key in ("marginal_chain_tau", "conditional_chain_tau", "anchor_sensitivity"):
            if key in results[name][datasets[0]]:
                pooled[key] = sum(results[name][d][key] for d in datasets) / len(datasets)
        results[name]["mean of sets"] = pooled
    meta = {"command": "python " + " ".join(sys.argv), "datasets": datasets, "prompts": args.prompts,
            "anchors": args.anchors, "max_new_tokens": args.max_new_tokens, "drafters": drafters,
            "threads": args.threads}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    lines = ["# Teacher-forced validation on the bench's prompts", "",
             f"`{meta['command']}`", "",
             f"The first {args.prompts} prompts of each set, the target's greedy continuation (float32, up to "
             f"{args.max_new_tokens} tokens), {args.anchors} anchors per record; top-1 agreement with the target's "
             "greedy token by block position 1..b-1; chain tau = 1 + the leading agreements, averaged over blocks.", ""]
    for d in datasets:
        lines += table(results, d)
    lines += ["### mean of the sets", "", "| drafter | marginal chain tau | conditional chain tau |", "|---|---|---|"]
    for name in results:
        m = results[name]["mean of sets"]
        lines.append(f"| {name} | {m['marginal_chain_tau']:.3f} | {m.get('conditional_chain_tau', float('nan')):.3f} |")
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(Path(args.out).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
