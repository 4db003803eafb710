"""`F.linear` against weights packed once (treeflash.packing) by each float32 library this torch has (MKL,
oneDNN), over all 30 layers of the default target's shapes, and its LM head.

Each measurement runs the projections of 30 layers (q,k,v fused 960x576, o 576x576, gate,up fused 3072x576,
down 576x1536: 425 MB of float32 weights, more than this machine's caches hold) on a batch of rows, and the
LM head (49152x576, 113 MB) on the same rows. The variants alternate, 9 times each, and the best time of each
is kept, so a machine whose speed drifts affects all alike. Writes Markdown.

    python scripts/packed_gemm.py results/speed/packed_gemm_cpu.md [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from treeflash.packing import FusedLinear, _cpu_vendor, cpu_model, float32_backend

from _output import write_markdown  # scripts/_output.py (scripts run as `python scripts/NAME.py`)

LAYERS = 30
SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))  # (out, in): qkv, o, gate_up, down of SmolLM2-135M
LM_HEAD = (49152, 576)
ROWS = (1, 2, 5, 9, 17, 33, 65)


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
    head = torch.randn(*LM_HEAD, generator=g)
    default = float32_backend()
    packed = {}
    for backend in ("mkl", "onednn"):
        os.environ["TREEFLASH_CPU_GEMM"] = backend
        if float32_backend() == backend:
            packed[backend] = ([[FusedLinear([w]) for w in layer] for layer in weights], FusedLinear([head]))
    os.environ.pop("TREEFLASH_CPU_GEMM")
    if not packed:
        raise SystemExit("this torch build cannot pack float32 weights (no MKL, no oneDNN); nothing to compare")
    megabytes = sum(w.numel() for layer in weights for w in layer) * 4 / 1e6
    names = list(packed)
    lines = [
        f"30 layers of projections ({megabytes:.0f} MB float32) and the LM head ({head.numel() * 4 / 1e6:.0f} MB), "
        f"best of 9 alternating runs, ms. Machine: {cpu_model()} ({_cpu_vendor()}), "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}; this processor's default library: "
        f"{default}. Command: `python scripts/packed_gemm.py {' '.join(sys.argv[1:])}`.",
        "",
        "| rows | part | `F.linear` | " + " | ".join(f"packed by {n}" for n in names) + " | best |",
        "|---|---|---|" + "---|" * len(names) + "---|",
    ]
    for rows in ROWS:
        x = {k: torch.randn(rows, k, generator=g) for k in (576, 1536)}

        def layers_plain():
            for layer in weights:
                for w in layer:
                    F.linear(x[w.shape[1]], w)

        def layers_packed(maps):
            for layer, layer_maps in zip(weights, maps):
                for w, m in zip(layer, layer_maps):
                    m(x[w.shape[1]])

        variants = {"layers": [layers_plain] + [lambda m=packed[n][0]: layers_packed(m) for n in names],
                    "LM head": [lambda: F.linear(x[576], head)] + [lambda m=packed[n][1]: m(x[576]) for n in names]}
        for part, fns in variants.items():
            for fn in fns:
                fn()
            times = [[] for _ in fns]
            for _ in range(9):
                for t, fn in zip(times, fns):
                    t.append(_seconds(fn))
            best = [1000 * min(t) for t in times]
            winner = (["F.linear"] + names)[best.index(min(best))]
            lines.append(f"| {rows} | {part} | " + " | ".join(f"{b:.1f}" for b in best) + f" | {winner} |")
    text = "\n".join(lines) + "\n"
    write_markdown(text, args.out)


if __name__ == "__main__":
    main()
