"""N-gram lookup (treeflash.ngrams): the index against a brute-force search, and its periodic copies."""

import random

import pytest

from treeflash.ngrams import LOOKUP_MAX_NGRAM, NgramIndex


def brute_force(seq: list[int], min_ngram: int, length: int) -> list[int]:
    """The latest earlier occurrence of the longest suffix (4 .. min_ngram tokens), copied on periodically."""
    for n in range(min(LOOKUP_MAX_NGRAM, len(seq)), min_ngram - 1, -1):
        ends = [e for e in range(n - 1, len(seq) - 1) if seq[e - n + 1: e + 1] == seq[-n:]]
        if ends:
            end, out = ends[-1], []
            for i in range(length):
                out.append(seq[end + 1 + i] if end + 1 + i < len(seq) else out[i - (len(seq) - 1 - end)])
            return out
    return []


@pytest.mark.parametrize("min_ngram", [1, 2, 3, 4])
def test_continuation_equals_a_brute_force_search_as_the_sequence_grows(min_ngram):
    rng = random.Random(min_ngram)
    for trial in range(30):
        vocab = rng.choice([2, 3, 5, 12])  # small vocabularies repeat, large ones rarely do
        seq = [rng.randrange(vocab) for _ in range(rng.randrange(0, 40))]
        index = NgramIndex(seq[:3], min_ngram)
        i = 3
        while i < len(seq):  # grown in rounds of 1-5 tokens, as decoding commits them
            step = rng.randrange(1, 6)
            index.extend(seq[i: i + step])
            i += step
            assert index.tokens == seq[:i]
            for length in (1, 4, 9):
                assert index.continuation(length) == brute_force(seq[:i], min_ngram, length), (trial, i, length)


def test_loops_of_any_period_give_full_copies():
    assert NgramIndex([7, 7, 7], 2).continuation(5) == [7] * 5
    assert NgramIndex([1, 2, 1, 2], 2).continuation(5) == [1, 2, 1, 2, 1]
    assert NgramIndex([1, 2, 3, 9, 1, 2], 2).continuation(5) == [3, 9, 1, 2, 3]


def test_the_longest_suffix_wins_and_the_latest_occurrence_of_it():
    # (8, 1, 2) occurred once, early; (1, 2) occurred later followed by 5: the longer match decides.
    assert NgramIndex([8, 1, 2, 3, 1, 2, 5, 0, 8, 1, 2], 2).continuation(2) == [3, 1]
    assert NgramIndex([1, 2, 3, 0, 1, 2, 4, 0, 1, 2], 3).continuation(1) == [4]


def test_no_match_and_bad_settings():
    assert NgramIndex([1, 2, 3, 4], 1).continuation(3) == []
    assert NgramIndex([], 1).continuation(3) == []
    assert NgramIndex([5, 5], 2).continuation(3) == []  # the suffix itself is no earlier occurrence
    for bad in (0, LOOKUP_MAX_NGRAM + 1):
        with pytest.raises(ValueError, match="min_ngram"):
            NgramIndex([1], bad)
