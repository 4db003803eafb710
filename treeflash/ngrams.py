"""N-gram lookup: draft tokens copied from the context (prompt-lookup decoding), to graft onto a draft tree.

When the last few tokens of the context occurred earlier in it, the tokens that followed them then are a
cheap guess at what follows now: code repeats its names, answers quote their question, and a small model's
greedy text loops. `NgramIndex` finds that guess for a growing sequence in O(n-gram sizes) per round, and
`treeflash.trees.graft_chain` merges it into the drafter's tree, so verification checks both at once. The walk
through the tree only ever commits the target's own tokens (see `treeflash.verification`), so a graft never
changes the output, only how many tokens a round commits and how many entries the target verifies.
"""

from __future__ import annotations

from typing import Sequence

LOOKUP_MAX_NGRAM = 4  # the longest suffix matched first: a longer match is a more specific guess


class NgramIndex:
    """Where each n-gram (n = min_ngram .. max_ngram, LOOKUP_MAX_NGRAM by default) of a growing token sequence
    last ended.

    An n-gram ending at the sequence's last token is not indexed until a token follows it, so a lookup never
    finds the suffix it is looking for as its own match."""

    def __init__(self, tokens: Sequence[int] = (), min_ngram: int = 2, max_ngram: int = LOOKUP_MAX_NGRAM):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"min_ngram must be in 1..{max_ngram}; got {min_ngram}")
        self.min_ngram, self.max_ngram = min_ngram, max_ngram
        self.tokens: list[int] = []
        self._last: dict[tuple[int, ...], int] = {}  # n-gram -> index of its last token, latest occurrence
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        """Append tokens (a round's committed ones)."""
        start = len(self.tokens)
        self.tokens.extend(int(t) for t in tokens)
        seq = self.tokens
        for end in range(max(0, start - 1), len(seq) - 1):  # every n-gram that now has a successor
            for n in range(self.min_ngram, min(self.max_ngram, end + 1) + 1):
                self._last[tuple(seq[end - n + 1: end + 1])] = end

    def continuation(self, length: int) -> list[int]:
        """`length` tokens that followed the latest earlier occurrence of the sequence's longest matching
        suffix (max_ngram tokens down to min_ngram, see `copy_after`); [] when no suffix occurred before."""
        seq = self.tokens
        for n in range(min(self.max_ngram, len(seq)), self.min_ngram - 1, -1):
            end = self._last.get(tuple(seq[-n:]))
            if end is not None:
                return copy_after(seq, end, length)
        return []


def copy_after(tokens: list[int], end: int, length: int) -> list[int]:
    """The `length` tokens that followed index `end` of `tokens`, an earlier occurrence of the sequence's
    suffix. Where the copy would run past the sequence's end, the match overlaps the suffix: the sequence
    repeats with period p = (last index - end) there, and the copy goes on repeating it, so a loop of any
    period (a run of one token included) yields a full `length` tokens."""
    period = len(tokens) - 1 - end
    out = tokens[end + 1: end + 1 + length]
    while len(out) < length:
        out.append(out[len(out) - period])
    return out
