"""Time the per-round tree builds on CPU: best_first_tree, marginal_tree (DDTree), conditional_tree (TreeFlash).

Tables mimic a real round at budget 64: D = 15 depths (block size 16), K = 64 for the marginal tree, m = 16
candidate parents and k = 16 children per row for the conditional tree. Prints the median in microseconds.

    python scripts/time_tree_build.py [--repeats 2000] [--budget 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from treeflash.trees import best_first_tree, conditional_tree, marginal_tree, top_k_logprobs

VOCAB = 4096  # only the top-k of each row reaches the builders, so the vocabulary size hardly matters
SPREAD = 6.0  # logit scale: gives best-first trees about 7 deep at budget 64, as trained drafters do


def median_us(fn, repeats: int) -> float:
    for _ in range(min(50, repeats)):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--budget", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the decode loop builds trees on one host thread
    generator = torch.Generator().manual_seed(0)
    depth, big_k, m, k, root = 15, 64, 16, 16, 7

    marginals = torch.randn(depth, VOCAB, generator=generator) * SPREAD  # [D, V] logits
    marginal_tokens, marginal_logprobs = top_k_logprobs(marginals, big_k)  # [D, K]
    next_row = torch.arange(1, depth + 1)[:, None].expand(depth, big_k).clone()  # [D, K]
    next_row[-1] = -1

    parent_tokens = marginals[: depth - 1].topk(m, dim=-1).indices  # [D-1, m]
    # A conditional resembles the marginal of its depth, perturbed by the parent token, so most children are
    # also candidate parents and the search goes deep.
    row_depth = torch.cat((torch.zeros(1, dtype=torch.int64), torch.arange(depth - 1).repeat_interleave(m) + 1))
    conditionals = marginals[row_depth] + torch.randn(len(row_depth), VOCAB, generator=generator) * 2  # [R, V]
    row_tokens, row_logprobs = top_k_logprobs(conditionals, k)  # [R, k]

    cases = {
        "best_first_tree (marginal table)": lambda: best_first_tree(
            root, marginal_tokens, marginal_logprobs, next_row, args.budget),
        "marginal_tree (D=15, K=64)": lambda: marginal_tree(root, marginal_tokens, marginal_logprobs, args.budget),
        "conditional_tree (D=15, m=16, k=16)": lambda: conditional_tree(
            root, parent_tokens, row_tokens, row_logprobs, args.budget),
    }
    print(f"budget {args.budget}, {args.repeats} repeats, torch threads 1")
    for name, fn in cases.items():
        tree = fn()
        print(f"{name:40s} median {median_us(fn, args.repeats):8.1f} us"
              f"   ({tree.size} nodes, depth {int(tree.depths.max())})")


if __name__ == "__main__":
    main()
