"""The walk (follow) on hand-built trees, and the target's token choice: greedy, coupled and lossless sampling."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chisquare

from treeflash.errors import TreeFlashError
from treeflash.trees import DraftTree
from treeflash.verification import Acceptance, SamplingConfig, choose_tokens, follow


def hand_tree() -> DraftTree:
    """root 10 -> {11 (1), 12 (2)}; 11 -> 13 (3); 13 -> 14 (4); 12 -> 15 (5)."""
    return DraftTree(
        tokens=torch.tensor([10, 11, 12, 13, 14, 15]),
        parents=torch.tensor([-1, 0, 0, 1, 3, 2]),
        depths=torch.tensor([0, 1, 1, 2, 3, 2]),
        scores=torch.tensor([0.0, -0.1, -0.2, -0.3, -0.4, -0.5]),
    )


# -- follow ------------------------------------------------------------------------------------------------


def test_follow_perfect_match_takes_the_whole_path_and_the_bonus():
    # target_tokens[i] is the target's token after entry i.
    accepted = follow(hand_tree(), torch.tensor([11, 13, 0, 14, 99, 0]))
    assert accepted == Acceptance(path=[0, 1, 3, 4], tokens=[11, 13, 14], bonus=99)
    assert accepted.committed == [11, 13, 14, 99]


def test_follow_first_token_rejected_commits_only_the_bonus():
    accepted = follow(hand_tree(), torch.tensor([50, 13, 15, 14, 99, 0]))
    assert accepted == Acceptance(path=[0], tokens=[], bonus=50)
    assert accepted.committed == [50]


def test_follow_root_only_tree():
    root_only = DraftTree(tokens=torch.tensor([10]), parents=torch.tensor([-1]), depths=torch.tensor([0]),
                          scores=torch.zeros(1))
    assert follow(root_only, torch.tensor([7])) == Acceptance(path=[0], tokens=[], bonus=7)


def test_follow_picks_the_branch_the_target_chose():
    accepted = follow(hand_tree(), torch.tensor([12, 13, 15, 14, 99, 42]))
    assert accepted == Acceptance(path=[0, 2, 5], tokens=[12, 15], bonus=42)


def test_follow_stops_mid_path():
    accepted = follow(hand_tree(), torch.tensor([11, 77, 15, 14, 99, 42]))
    assert accepted == Acceptance(path=[0, 1], tokens=[11], bonus=77)


# -- choose_tokens: greedy and coupling ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_greedy_is_argmax(dtype):
    logits = torch.randn(9, 31, generator=torch.Generator().manual_seed(0)).to(dtype)
    chosen = choose_tokens(logits, torch.arange(9), SamplingConfig())
    assert torch.equal(chosen, logits.argmax(dim=-1))
    # Filters change nothing under greedy: the argmax always survives them.
    assert torch.equal(choose_tokens(logits, torch.arange(9), SamplingConfig(top_k=2, top_p=0.1)), chosen)


def test_sampling_is_a_function_of_seed_position_and_distribution():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 50, generator=generator)
    positions = torch.tensor([5, 6, 6, 7, 8, 9])
    logits[2] = logits[1]  # a second row at position 6 with the same distribution
    sampling = SamplingConfig(temperature=1.0, seed=123)
    first = choose_tokens(logits, positions, sampling)
    assert torch.equal(first, choose_tokens(logits, positions, sampling))
    assert first[1] == first[2], "rows with equal position and logits share their noise"
    # The same position alone (as in plain decoding) gives the same token as inside a tree batch.
    for i in range(6):
        assert choose_tokens(logits[i : i + 1], positions[i : i + 1], sampling) == first[i]
    # Other seeds give other samples somewhere (a flat distribution over 50 tokens, 6 rows).
    flat = torch.zeros(6, 50)
    a = choose_tokens(flat, positions, SamplingConfig(temperature=1.0, seed=1))
    b = choose_tokens(flat, positions, SamplingConfig(temperature=1.0, seed=2))
    assert not torch.equal(a, b)


def test_sampling_needs_a_seed():
    with pytest.raises(TreeFlashError, match="seed"):
        choose_tokens(torch.zeros(1, 4), torch.tensor([0]), SamplingConfig(temperature=1.0))


# -- choose_tokens: losslessness (statistics) -----------------------------------------------------------------

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -2.0])
SEEDS, POSITIONS = 1500, 8  # 12,000 samples


def sample_counts(temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Counts per token of one sample at each of POSITIONS positions for each of SEEDS seeds."""
    logits = LOGITS.expand(POSITIONS, -1)
    positions = torch.arange(100, 100 + POSITIONS)
    counts = torch.zeros(LOGITS.shape[0], dtype=torch.int64)
    for seed in range(SEEDS):
        chosen = choose_tokens(logits, positions, SamplingConfig(temperature, top_p, top_k, seed))
        counts += torch.bincount(chosen, minlength=LOGITS.shape[0])
    return counts


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    probs = probs.double()
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a token with probability 0 was sampled"
    expected = probs[keep] / probs[keep].sum() * counts.sum()
    return chisquare(counts[keep].double().numpy(), expected.numpy()).pvalue


def test_samples_follow_the_target_distribution():
    counts = sample_counts(0.7)
    assert chi_square_p(counts, torch.softmax(LOGITS / 0.7, dim=-1)) > 1e-3


def test_the_chi_square_check_can_fail():
    """Negative control: samples taken at the wrong temperature are rejected by the same check."""
    counts = sample_counts(1.0)
    assert chi_square_p(counts, torch.softmax(LOGITS / 0.7, dim=-1)) < 1e-3


def test_top_k_samples_follow_the_renormalised_distribution():
    counts = sample_counts(1.0, top_k=3)
    probs = torch.softmax(LOGITS, dim=-1)
    probs[3:] = 0
    assert chi_square_p(counts, probs) > 1e-3


# -- choose_tokens: filters -----------------------------------------------------------------------------------


def test_top_k_never_picks_a_filtered_token():
    logits = torch.randn(4, 20, generator=torch.Generator().manual_seed(2))
    allowed = logits.topk(3, dim=-1).indices
    for seed in range(200):
        chosen = choose_tokens(logits, torch.arange(4), SamplingConfig(temperature=2.0, top_k=3, seed=seed))
        assert all(chosen[i] in allowed[i] for i in range(4))


def test_top_p_keeps_the_smallest_set_reaching_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = set()
    for seed in range(300):
        seen.add(int(choose_tokens(logits, torch.tensor([0]), SamplingConfig(1.0, top_p=0.7, seed=seed))[0]))
    assert seen == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    for seed in range(50):
        assert choose_tokens(logits, torch.tensor([0]), SamplingConfig(1.0, top_p=0.45, seed=seed))[0] == 0
        assert choose_tokens(logits, torch.tensor([0]), SamplingConfig(1.0, top_p=1e-9, seed=seed))[0] == 0


def test_top_p_is_applied_after_temperature_and_top_k():
    # At temperature 0.05 token 0 holds 93% of the mass, so top_p = 0.9 leaves it alone.
    logits = torch.log(torch.tensor([[0.4, 0.35, 0.25]]))
    for seed in range(50):
        assert choose_tokens(logits, torch.tensor([0]), SamplingConfig(0.05, top_p=0.9, seed=seed))[0] == 0
    # After top-k = 2 the kept mass renormalises to (0.53, 0.47): top_p = 0.5 then keeps token 0 alone.
    for seed in range(50):
        assert choose_tokens(logits, torch.tensor([0]), SamplingConfig(1.0, top_k=2, top_p=0.5, seed=seed))[0] == 0


# -- SamplingConfig ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": "1"}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"seed": "x"}, "seed"),
    ],
)
def test_sampling_config_rejects(kwargs, field):
    with pytest.raises(TreeFlashError, match=field):
        SamplingConfig(**kwargs)


def test_sampling_config_greedy():
    assert SamplingConfig().greedy and SamplingConfig(temperature=0).greedy
    assert not SamplingConfig(temperature=0.5, seed=1).greedy


def reference_nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Kept tokens [n, V] bool by a plain full sort: keep while the mass before a token is below top_p."""
    values, order = logits.sort(dim=-1, descending=True)
    probs = values.softmax(dim=-1)
    keep_sorted = probs.cumsum(dim=-1) - probs < top_p
    keep_sorted[:, 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def test_top_p_on_a_large_vocabulary_matches_a_full_sort():
    """Peaked rows take the probe path (nucleus among the first tokens), flat rows the full-sort fallback."""
    from treeflash.verification import _filter

    generator = torch.Generator().manual_seed(4)
    peaked = torch.randn(3, 5000, generator=generator, dtype=torch.float64).float() * 4
    flat = torch.randn(2, 5000, generator=generator, dtype=torch.float64).float() * 0.1
    for logits in (peaked, flat, torch.cat((peaked, flat))):
        for top_p in (0.3, 0.9):
            kept = _filter(logits, 0, top_p) > -math.inf
            assert torch.equal(kept, reference_nucleus(logits, top_p))
    assert reference_nucleus(flat, 0.9).sum(dim=-1).min() > 1024, "the flat rows must need the fallback"
    assert reference_nucleus(peaked, 0.9).sum(dim=-1).max() < 1024, "the peaked rows must fit the probe"
