"""`F.linear` against weights packed once (treeflash.packing), over all 30 layers of the default target's shapes.

Each measurement runs the projections of 30 layers (q,k,v fused 768x576, o 576x576, gate,up fused 3072x576,
down 576x1536: 411 MB of float32 weights, more than this machine's caches hold) on a batch of rows. The two
variants alternate, 9 times each, and the best time of each is kept, so a machine whose speed drifts affects
both alike. Writes Markdown.

    python scripts/packed_gemm.py results/speed/packed_gemm_cpu.md [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from treeflash.packing import FusedLinear

from _output import write_markdown  # scripts/_output.py (scripts run as `python scripts/NAME.py`)

LAYERS = 30
SHAPES = ((768, 576), (576, 576), (3072, 576), (576, 1536))  # (out, in): qkv, o, gate_up, down of SmolLM2-135M
ROWS = (1, 2, 4, 8, 16, 17, 33, 65)


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    weights = [[torch.randn(n, k, generator=g) for n, k in SHAPES] for _ in range(LAYERS)]
    packed = [[FusedLinear([w]) for w in layer] for layer in weights]
    if packed[0][0].backend is None:
        raise SystemExit("this torch build cannot pack float32 weights (no MKL); nothing to compare")
    megabytes = sum(w.numel() for layer in weights for w in layer) * 4 / 1e6
    lines = [
        f"30 layers of projections ({megabytes:.0f} MB float32), best of 9 alternating runs, ms. Machine: "
        f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}. Command: "
        f"`python scripts/packed_gemm.py {' '.join(sys.argv[1:])}`.",
        "",
        "| rows | `F.linear` | packed (`treeflash.packing`) | speedup |",
        "|---|---|---|---|",
    ]
    for rows in ROWS:
        x = {k: torch.randn(rows, k, generator=g) for k in (576, 1536)}

        def plain():
            for layer in weights:
                for w in layer:
                    F.linear(x[w.shape[1]], w)

        def fast():
            for layer, maps in zip(weights, packed):
                for w, m in zip(layer, maps):
                    m(x[w.shape[1]])

        plain(), fast()
        a, b = [], []
        for _ in range(9):
            a.append(_seconds(plain))
            b.append(_seconds(fast))
        lines.append(f"| {rows} | {1000 * min(a):.1f} | {1000 * min(b):.1f} | {min(a) / min(b):.2f}x |")
    text = "\n".join(lines) + "\n"
    write_markdown(text, args.out)


if __name__ == "__main__":
    main()
