"""Matmul times in float32 and bfloat16 at the shapes of one decode round on the default target.

Shows why the drafter runs in bfloat16 on CPUs with AMX (see treeflash.api.default_drafter_dtype), and why
a reduced draft vocabulary pays: the LM head at small row counts dominates drafting in float32.

    python scripts/matmul_dtypes.py results/speed/matmul_dtypes_cpu.md [--threads 1]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [  # (rows, in, out, what)
    (1, 576, 1536, "target MLP, 1 token (ar)"),
    (16, 576, 1536, "drafter/target MLP, a 16-token block"),
    (65, 576, 1536, "target MLP, a 65-node tree"),
    (15, 576, 49152, "drafter LM head, full vocabulary"),
    (15, 576, 8192, "drafter LM head, 8192-token draft vocabulary"),
    (225, 576, 49152, "TreeFlash head stage, full vocabulary (1 + 14 x 16 rows)"),
    (225, 576, 8192, "TreeFlash head stage, draft vocabulary"),
    (65, 576, 49152, "target LM head over a 65-node tree"),
]


def best_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lines = [f"Best of 20, ms. Machine: {platform.machine()}, {torch.get_num_threads()} torch thread(s), "
             f"torch {torch.__version__}. Command: `python scripts/matmul_dtypes.py {' '.join(sys.argv[1:])}`.", "",
             "| shape (rows x in -> out) | used for | float32 ms | GFLOP/s | bfloat16 ms | GFLOP/s | bf16 speedup |",
             "|---|---|---|---|---|---|---|"]
    for m, k, n, what in SHAPES:
        flops = 2 * m * k * n
        row = []
        for dtype in (torch.float32, torch.bfloat16):
            x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
            ms = best_ms(lambda: F.linear(x, w))
            row.append((ms, flops / ms / 1e6))
        lines.append(f"| {m} x {k} -> {n} | {what} | {row[0][0]:.2f} | {row[0][1]:.0f} | {row[1][0]:.2f} | "
                     f"{row[1][1]:.0f} | {row[0][0] / row[1][0]:.1f}x |")
    report = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report)
    print(report)


if __name__ == "__main__":
    main()
