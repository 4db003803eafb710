"""The one-screen reference loop (`treeflash.reference`) commits what `Decoder` commits, round for round."""

import pytest
import torch

from treeflash.decoding import METHODS, DecodeConfig, Decoder
from treeflash.reference import reference_generate

from helpers import OracleDrafter, greedy_reference, tiny_drafter, tiny_target

PROMPT = [5, 17, 33, 2, 71, 8, 40]
NEW = 40


class StumblingOracle(OracleDrafter):
    """Drafts the target's greedy continuation, but at two positions in seven puts a decoy first and the true token
    second: chains stop there, trees can go around, so rounds accept anywhere from 0 to b-1 tokens."""

    def _rows(self, positions: list[int]) -> torch.Tensor:
        logits = super()._rows(positions)  # [n, V]: 30 on the true token, 0 elsewhere
        for row, p in enumerate(positions):
            if p < len(self.sequence) and p % 7 in (0, 3):
                logits[row, (self.sequence[p] + 1) % self.vocab] = 32.0
        return logits


@pytest.fixture(scope="module")
def target():
    return tiny_target("qwen3")


@pytest.fixture(scope="module")
def drafters(target):
    """A random drafter (little is accepted but n-gram lookups) and a stumbling oracle (much is, greedy only)."""
    expected = greedy_reference(target, PROMPT, NEW + 16)
    return {"random": tiny_drafter(target), "oracle": StumblingOracle(target, PROMPT + expected, block_size=8)}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("budget", [2, 9])
@pytest.mark.parametrize("drafter_kind, temperature, seed, lookup", [  # greedy without lookup: the oracle's case
    ("oracle", 0.0, None, 0), ("random", 0.0, None, 8), ("random", 0.7, 11, 0), ("random", 0.7, 11, 8),
])
def test_reference_loop_commits_what_the_decoder_commits(target, drafters, method, budget, drafter_kind,
                                                          temperature, seed, lookup):
    drafter = drafters[drafter_kind]
    config = DecodeConfig(method=method, budget=budget, max_new_tokens=NEW, temperature=temperature, seed=seed,
                          lookup=lookup)
    result = Decoder(target, drafter).generate(PROMPT, config)
    tokens, acceptance = reference_generate(target, drafter, PROMPT, method, budget, NEW, temperature, seed,
                                            lookup=lookup)
    assert tokens == result.token_ids
    assert acceptance == result.acceptance_lengths
    if method != "ar" and drafter_kind == "oracle":
        assert 0 < sum(acceptance) < 7 * len(acceptance), "the oracle's rounds should accept some, not all"
    if lookup and temperature == 0:
        assert sum(acceptance) > 0, "these tiny models repeat themselves, so lookups should land"


def test_reference_loop_stops_at_eos_like_the_decoder(target, drafters, monkeypatch):
    """An EOS token inside a round's accepted path ends the output there, as it does for `Decoder`."""
    drafter = drafters["oracle"]
    expected = greedy_reference(target, PROMPT, NEW)
    stop = expected[12]
    monkeypatch.setattr(target, "eos_token_ids", (stop,))
    for method in METHODS:
        config = DecodeConfig(method=method, budget=9, max_new_tokens=NEW, lookup=0)
        result = Decoder(target, drafter).generate(PROMPT, config)
        tokens, acceptance = reference_generate(target, drafter, PROMPT, method, 9, NEW)
        assert result.stop_reason == "eos" and tokens == result.token_ids == expected[: expected.index(stop) + 1]
        assert acceptance == result.acceptance_lengths
