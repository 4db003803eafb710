"""Replay n-gram lookup policies on the target's own greedy continuations, without running any model.

`ar` plus lookup commits, each round, the longest prefix of the lookup chain that the target's greedy text
continues with, plus one token of its own. Given that text (the continuations `scripts/bench_prompt_validation.py`
caches for the bench's prompts under ~/.cache/treeflash/eval/), a policy's rounds can be counted exactly,
in seconds: tau = tokens / rounds of `ar` + lookup, and the entries each round grafts (the verification cost
a CPU pays). It measures the lookup alone; with a drafter's tree beside it the gain is smaller, since the
tree already covers the first tokens (results/speed/bench_lookup_cpu_amd).

    python scripts/lookup_replay.py OUT.md [--datasets mtbench,humaneval,sharegpt-heldout] [--max-new-tokens 256]

Policies: the library's `NgramIndex` (latest earlier occurrence of the longest suffix of 4 down to the
shortest n-gram, min_ngram 1-3) at lookup lengths 4-32, and, for comparison, longest suffixes of up to 8 and
the continuations of several earlier occurrences grafted together (`SeveralContinuations`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from treeflash.data import load_sequences
from treeflash.ngrams import NgramIndex, copy_after

EVAL_DIR = Path.home() / ".cache" / "treeflash" / "eval"


class SeveralContinuations:
    """A policy the library does not have, for comparison: the continuations of up to `k` earlier occurrences
    of the longest matching suffix (latest first, distinct first tokens), grafted together as a trie."""

    def __init__(self, tokens, min_ngram: int, max_ngram: int, k: int):
        self.min_ngram, self.max_ngram, self.k, self.tokens, self.ends = min_ngram, max_ngram, k, [], {}
        self.extend(tokens)

    def extend(self, tokens) -> None:
        start = len(self.tokens)
        self.tokens.extend(int(t) for t in tokens)
        for end in range(max(0, start - 1), len(self.tokens) - 1):
            for n in range(self.min_ngram, min(self.max_ngram, end + 1) + 1):
                self.ends.setdefault(tuple(self.tokens[end - n + 1: end + 1]), []).append(end)

    def continuations(self, length: int) -> list[list[int]]:
        seq = self.tokens
        for n in range(min(self.max_ngram, len(seq)), self.min_ngram - 1, -1):
            ends = self.ends.get(tuple(seq[-n:]))
            if ends:
                chains, firsts = [], set()
                for end in reversed(ends):
                    out = copy_after(seq, end, length)
                    if out[0] not in firsts:
                        firsts.add(out[0])
                        chains.append(out)
                    if len(chains) == self.k:
                        break
                return chains
        return []


def replay(prompt: list[int], text: list[int], length: int, min_ngram: int, max_ngram: int,
           k: int = 1) -> tuple[int, int, int]:
    """(rounds, committed tokens, grafted entries) of `ar` + lookup over `text`, the target's greedy reply;
    k > 1: the continuations of k earlier occurrences (`SeveralContinuations`)."""
    index = (NgramIndex(prompt, min_ngram, max_ngram) if k == 1
             else SeveralContinuations(prompt, min_ngram, max_ngram, k))
    done = rounds = grafted = 0
    while done < len(text):
        chains = ([index.continuation(length)] if k == 1 else index.continuations(length)) if length else []
        best = 0
        for chain in chains:
            accepted = 0
            while accepted < len(chain) and done + accepted < len(text) and chain[accepted] == text[done + accepted]:
                accepted += 1
            best = max(best, accepted)
        commit = min(best + 1, len(text) - done)
        index.extend(text[done: done + commit])
        # Entries of the chains' trie: distinct prefixes.
        trie = {tuple(chain[:i + 1]) for chain in chains for i in range(len(chain))}
        done, rounds, grafted = done + commit, rounds + 1, grafted + len(trie)
    return rounds, done, grafted


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--datasets", default="mtbench,humaneval,sharegpt-heldout")
    p.add_argument("--max-new-tokens", type=int, default=256)
    args = p.parse_args()
    sets = {}
    for name in args.datasets.split(","):
        path = EVAL_DIR / f"{name}-{args.max_new_tokens}"
        if not path.exists():
            print(f"{path} is missing: run scripts/bench_prompt_validation.py first, which caches it", file=sys.stderr)
            return 2
        sets[name] = [(s.tokens[: s.prompt_length], s.tokens[s.prompt_length:]) for s in load_sequences(path)]
    # (lookup length, shortest n-gram, longest n-gram, continuations)
    policies = [(4, 2, 4, 1), (8, 1, 4, 1), (8, 2, 4, 1), (8, 3, 4, 1), (16, 1, 4, 1), (16, 2, 4, 1), (32, 2, 4, 1),
                (8, 2, 8, 1), (16, 2, 8, 1), (8, 1, 4, 2), (8, 2, 4, 2), (8, 1, 4, 3), (4, 1, 4, 3)]
    lines = [f"`ar` + n-gram lookup replayed on the target's float32 greedy continuations ({args.max_new_tokens} "
             f"new tokens) of the bench's prompts; no model runs. Command: `python scripts/lookup_replay.py "
             f"{args.out} --datasets {args.datasets} --max-new-tokens {args.max_new_tokens}`.", "",
             "tau = committed tokens / rounds; grafted = lookup entries verified per round (each costs a CPU "
             "~0.6 ms, results/speed/bench_lookup_cpu_amd).", "",
             "| lookup | shortest n-gram | longest n-gram | continuations | " + " | ".join(f"{n} tau" for n in sets)
             + " | all tau | grafted / round |",
             "|---|---|---|---|" + "---|" * len(sets) + "---|---|"]
    for length, min_ngram, max_ngram, k in [(0, 2, 4, 1)] + policies:
        cells, total = [], [0, 0, 0]
        for name, pairs in sets.items():
            r = [replay(prompt, text, length, min_ngram, max_ngram, k) for prompt, text in pairs]
            rounds, tokens, grafted = (sum(x[i] for x in r) for i in range(3))
            cells.append(f"{tokens / rounds:.3f}")
            total = [total[0] + rounds, total[1] + tokens, total[2] + grafted]
        lines.append(f"| {length} | {min_ngram} | {max_ngram} | {k} | " + " | ".join(cells)
                     + f" | {total[1] / total[0]:.3f} | {total[2] / total[0]:.1f} |")
        print(lines[-1], flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
