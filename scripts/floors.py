"""Where a decode round's time goes on this machine, stage by stage, against each stage's floor.

The floor of a stage is the larger of (bytes of weights it must read) / (measured memory bandwidth) and
(its FLOPs) / (measured matmul throughput in its dtype): what the stage would cost if it did nothing but
stream its weights once and run its matmuls at the machine's best measured speed. The tree search and the
commit have no weights; their floor is taken as 0 and their measured time is all overhead.

    python scripts/floors.py results/speed/floors_cpu.md [--drafter PATH] [--threads 1] [--budget 64]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from treeflash.api import default_drafter_dtype, parse_dtype, resolve_drafter
from treeflash.decoding import DecodeConfig, Decoder
from treeflash.targets import load_target

PROMPT = "Write a Python function that returns the n-th Fibonacci number, with a docstring and tests."


def _best_seconds(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def machine_speeds() -> dict:
    """Read bandwidth (GB/s) and matmul throughput (GFLOP/s) in float32 and bfloat16, best of 5."""
    big = torch.ones(128 * 2**20)  # 512 MB
    bandwidth = big.numel() * 4 / _best_seconds(lambda: big.sum()) / 1e9
    speeds = {"bandwidth_gbs": bandwidth}
    for dtype in (torch.float32, torch.bfloat16):
        a, w = torch.randn(256, 1536, dtype=dtype), torch.randn(1536, 1536, dtype=dtype)
        flops = 2 * 256 * 1536 * 1536
        speeds[f"gflops_{str(dtype).removeprefix('torch.')}"] = flops / _best_seconds(lambda: a @ w) / 1e9
    return speeds


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def floors(target, drafter, tree_nodes: int, context: int, rows_head: int, speeds: dict) -> dict:
    """Floors in ms per round. tree_nodes includes the root; rows_head = the head's conditional rows."""
    bw = speeds["bandwidth_gbs"] * 1e9
    f32 = speeds["gflops_float32"] * 1e9
    dd = str(next(drafter.parameters()).dtype).removeprefix("torch.")
    fd = speeds.get(f"gflops_{dd}", f32) * 1e9
    bytes_d = next(drafter.parameters()).element_size()
    H, V = target.hidden_size, target.vocab_size
    body = sum(_params(layer) for layer in target.layers)
    head = V * H
    kv = 2 * target.num_layers * target.num_kv_heads * target.head_dim  # cached floats per context token
    vd = drafter.draft_vocab.numel() if drafter.draft_vocab is not None else V
    dbody = sum(_params(layer) for layer in drafter.layers) + drafter.fc.weight.numel()
    ar = _params(drafter.ar_approximation) if drafter.ar_approximation is not None else 0
    b = drafter.block_size

    def stage(bytes_, flops, speed):
        return 1000 * max(bytes_ / bw, flops / speed)

    n = tree_nodes
    return {
        "verify": stage((body + head) * 4 + kv * context * 4, 2 * n * (body + head) + 4 * n * context * H, f32),
        "draft": stage((dbody + vd * H) * bytes_d, 2 * b * dbody + 2 * (b - 1) * vd * H, fd),
        "head": stage((ar + vd * H) * bytes_d, 2 * rows_head * (ar + vd * H), fd) if rows_head else 0.0,
        "tree": 0.0,
        "commit": 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=None)
    parser.add_argument("--drafter", default=None, help="default: the shipped drafter")
    parser.add_argument("--drafter-dtype", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    speeds = machine_speeds()
    target = load_target()
    dtype = parse_dtype(args.drafter_dtype) if args.drafter_dtype else default_drafter_dtype(target)
    drafter = resolve_drafter(args.drafter, target, dtype)
    decoder = Decoder(target, drafter)
    prompt = target.encode_prompt(PROMPT)
    methods = ["ar", "dflash", "ddtree"] + (["treeflash"] if drafter.ar_approximation is not None else [])
    m = drafter.config.candidate_tokens
    lines = [
        f"Per-round stage times vs floors (ms). Machine: {platform.machine()}, {torch.get_num_threads()} torch "
        f"thread(s), torch {torch.__version__}; measured read bandwidth {speeds['bandwidth_gbs']:.1f} GB/s, "
        f"matmul {speeds['gflops_float32']:.0f} GFLOP/s float32 and {speeds['gflops_bfloat16']:.0f} GFLOP/s "
        f"bfloat16. Target float32, drafter {str(dtype).removeprefix('torch.')}"
        f"{' with a ' + str(drafter.draft_vocab.numel()) + '-token draft vocabulary' if drafter.draft_vocab is not None else ''}. "
        f"Greedy, {args.max_new_tokens} new tokens, one coding prompt. Command: `python scripts/floors.py "
        f"{' '.join(sys.argv[1:])}`.",
        "",
        "| method | budget | tau | stage | measured | floor | measured / floor |",
        "|---|---|---|---|---|---|---|",
    ]
    decoder.generate(prompt, DecodeConfig(method=methods[-1], max_new_tokens=8))  # warm-up
    for method in methods:
        budget = None if method in ("ar", "dflash") else args.budget
        r = decoder.generate(prompt, DecodeConfig(method=method, budget=budget, max_new_tokens=args.max_new_tokens,
                                                  stop_at_eos=False))
        nodes = 1 if method == "ar" else (drafter.block_size if method == "dflash" else args.budget + 1)
        depth = min(drafter.block_size - 1, args.budget)  # build_tree skips depths the budget cannot reach
        rows = 1 + (depth - 1) * m if method == "treeflash" else 0
        if rows and target.device.type == "cpu":  # rows on demand: a B-node tree needs at most B + 1 of them
            rows = min(rows, args.budget + 1)
        context = len(prompt) + args.max_new_tokens // 2
        floor = floors(target, drafter, nodes, context, rows, speeds)
        total_m = total_f = 0.0
        for stage in ("draft", "head", "tree", "verify", "commit"):
            if method == "ar" and stage != "verify" and stage != "commit":
                continue
            if stage == "head" and method != "treeflash":
                continue
            measured = 1000 * r.stage_seconds.get(stage, 0.0) / r.rounds
            total_m, total_f = total_m + measured, total_f + floor[stage]
            ratio = f"{measured / floor[stage]:.1f}x" if floor[stage] > 0 else "(overhead)"
            lines.append(f"| {method} | {r.budget} | {r.tau:.2f} | {stage} | {measured:.1f} | {floor[stage]:.1f} | {ratio} |")
        lines.append(f"| {method} | {r.budget} | {r.tau:.2f} | **round** | **{total_m:.1f}** | **{total_f:.1f}** | "
                     f"**{total_m / total_f:.1f}x** |")
    report = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report)
    print(report)


if __name__ == "__main__":
    main()
