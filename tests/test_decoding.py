"""Lossless decoding: every method gives exactly the target's own output, greedy and sampled."""

import pytest
import torch

from treeflash.decoding import METHODS, DecodeConfig, Decoder
from treeflash.drafters import new_drafter
from treeflash.errors import TreeFlashError
from treeflash.packing import float32_backend

from helpers import OracleDrafter, greedy_reference, tiny_drafter, tiny_target

PROMPT = [5, 17, 33, 2, 71, 8, 40]


@pytest.fixture(scope="module", params=["llama", "qwen3", "qwen2-float32-onednn", "llama-float32-mkl"])
def pair(request):
    """float64 targets, and float32 ones whose projections run packed by oneDNN or MKL (treeflash.packing)."""
    family, dtype, backend = (request.param.split("-") + [None, None])[:3]
    target = tiny_target(family, dtype=getattr(torch, dtype or "float64"))
    if backend is not None:
        with pytest.MonkeyPatch.context() as m:
            m.setenv("TREEFLASH_CPU_GEMM", backend)
            if float32_backend() != backend:
                pytest.skip(f"this torch has no {backend}")
            target.pack()  # the library is chosen when the weights are packed
        assert target.lm_head_map.backend == backend
    return target, tiny_drafter(target)


def test_ar_equals_plain_greedy_with_full_recomputation(pair):
    target, _ = pair
    result = Decoder(target).generate(PROMPT, DecodeConfig(method="ar", max_new_tokens=40))
    assert result.token_ids == greedy_reference(target, PROMPT, 40)
    assert result.rounds == 39 and result.tau == 1.0 and result.stop_reason == "max_new_tokens"


@pytest.mark.parametrize("method", METHODS[1:])
@pytest.mark.parametrize("budget", [1, 5, 24])
def test_greedy_speculative_equals_ar(pair, method, budget):
    target, drafter = pair
    decoder = Decoder(target, drafter)
    reference = decoder.generate(PROMPT, DecodeConfig(method="ar", max_new_tokens=48)).token_ids
    result = decoder.generate(PROMPT, DecodeConfig(method=method, budget=budget, max_new_tokens=48, lookup=0))
    assert result.token_ids == reference
    assert len(result.acceptance_lengths) == result.rounds
    assert all(0 <= a <= min(budget, drafter.block_size - 1) for a in result.acceptance_lengths)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("lookup, ngram", [(3, 1), (8, 2)])
def test_greedy_with_ngram_lookup_equals_ar(pair, method, lookup, ngram):
    """Grafted n-gram chains change what a round verifies, never the output; on ar alone every accepted
    token is a lookup's (these tiny random models repeat themselves, so lookups do land)."""
    target, drafter = pair
    decoder = Decoder(target, drafter)
    reference = decoder.generate(PROMPT, DecodeConfig(method="ar", max_new_tokens=48)).token_ids
    config = DecodeConfig(method=method, budget=5, max_new_tokens=48, lookup=lookup, lookup_ngram=ngram)
    result = decoder.generate(PROMPT, config)
    assert result.token_ids == reference and result.lookup == lookup
    drafted = 0 if method == "ar" else min(5, drafter.block_size - 1)
    assert all(0 <= a <= max(drafted, lookup) for a in result.acceptance_lengths)
    if method == "ar":
        assert sum(result.acceptance_lengths) > 0


def test_ngram_lookup_defaults_and_off():
    from treeflash.decoding import DEFAULT_LOOKUP, resolve_lookup

    for method in METHODS:
        assert resolve_lookup(method, None) == DEFAULT_LOOKUP.get(method, 0)
        assert resolve_lookup(method, 0) == 0 and resolve_lookup(method, 5) == 5
    assert resolve_lookup("ar", None) == 0 and resolve_lookup("dflash", None) == 0, "the baselines stay plain"
    target = tiny_target("llama")
    result = Decoder(target).generate(PROMPT, DecodeConfig(method="ar", max_new_tokens=30, lookup=0))
    assert result.tau == 1.0 and result.lookup == 0


@pytest.mark.parametrize("method", METHODS[1:])
def test_greedy_with_a_reduced_draft_vocabulary_equals_ar(method):
    """Drafting from a subset of the vocabulary changes proposals only, never the output."""
    target = tiny_target("qwen3")
    reference = Decoder(target).generate(PROMPT, DecodeConfig(method="ar", max_new_tokens=40)).token_ids
    vocab = torch.tensor(sorted(set(reference[::2])) + [1, 2, 3])  # some of the right tokens are missing
    drafter = tiny_drafter(target)
    small = new_drafter(target, num_hidden_layers=2, block_size=8, target_layer_ids=(1, 2, 4),
                        mask_token_id=target.vocab_size - 1, ar_intermediate_size=48, draft_vocab=vocab)
    small.load_state_dict(drafter.state_dict() | {"draft_vocab": small.draft_vocab})
    result = Decoder(target, small).generate(PROMPT, DecodeConfig(method=method, budget=10, max_new_tokens=40))
    assert result.token_ids == reference


@pytest.mark.parametrize("method", METHODS[1:])
def test_a_bfloat16_drafter_on_a_float32_target_equals_ar(method):
    """The drafter's precision changes proposals only (the default on AMX CPUs: see default_drafter_dtype)."""
    target = tiny_target("llama", dtype=torch.float32)
    drafter = tiny_drafter(target).to(torch.bfloat16)
    decoder = Decoder(target, drafter)
    reference = decoder.generate(PROMPT, DecodeConfig(method="ar", max_new_tokens=40)).token_ids
    result = decoder.generate(PROMPT, DecodeConfig(method=method, budget=12, max_new_tokens=40))
    assert result.token_ids == reference


def test_drafter_rotary_stays_float32_in_bfloat16():
    """Rotary tables are computed from float32 frequencies whatever the drafter's dtype."""
    target = tiny_target("llama", dtype=torch.float32)
    fp32 = tiny_drafter(target)
    bf16 = tiny_drafter(target).to(torch.bfloat16)
    positions = torch.tensor([0, 7, 900, 5000])
    for a, b in zip(fp32.rotary(positions), bf16.rotary(positions)):
        assert b.dtype == torch.bfloat16
        torch.testing.assert_close(b.float(), a, atol=8e-3, rtol=0)  # bf16 rounding of the value only


def test_default_drafter_dtype(monkeypatch):
    from treeflash import api

    target = tiny_target("llama", dtype=torch.float32)
    monkeypatch.setattr(api, "cpu_has_amx", lambda: True)
    assert api.default_drafter_dtype(target) == torch.bfloat16
    monkeypatch.setattr(api, "cpu_has_amx", lambda: False)
    assert api.default_drafter_dtype(target) == torch.float32
    assert api.default_drafter_dtype(tiny_target("llama", dtype=torch.float64)) == torch.float64


@pytest.mark.parametrize("method", METHODS[1:])
def test_oracle_drafter_reaches_the_block_size(method):
    target = tiny_target("qwen3")
    expected = greedy_reference(target, PROMPT, 60 + 8)
    oracle = OracleDrafter(target, PROMPT + expected, block_size=8)
    result = Decoder(target, oracle).generate(PROMPT, DecodeConfig(method=method, budget=16, max_new_tokens=60,
                                                                   lookup=0))
    assert result.token_ids == expected[:60]
    # Every round accepts all 7 drafted tokens, plus the bonus: tau equals the block size.
    assert result.acceptance_lengths == [7] * result.rounds
    assert result.tau == 8.0


@pytest.mark.parametrize("method", METHODS[1:])
def test_sampled_speculative_equals_sampled_ar_for_the_same_seed(pair, method):
    """Sampling is keyed by (seed, position), so a lossless method reproduces plain sampling exactly."""
    target, drafter = pair
    decoder = Decoder(target, drafter)
    for seed in range(3):
        config = dict(max_new_tokens=40, temperature=0.9, top_p=0.95, seed=seed)
        reference = decoder.generate(PROMPT, DecodeConfig(method="ar", **config)).token_ids
        result = decoder.generate(PROMPT, DecodeConfig(method=method, budget=12, **config))
        assert result.token_ids == reference and result.seed == seed
        grafted = decoder.generate(PROMPT, DecodeConfig(method=method, budget=3, lookup=6, lookup_ngram=1, **config))
        assert grafted.token_ids == reference


def _joint_probabilities(target, prompt, temperature):
    """Exact target distribution of the first two new tokens, [V, V]."""
    V = target.vocab_size
    with torch.no_grad():
        first = torch.softmax(target.model(torch.tensor([prompt])).logits[0, -1] / temperature, -1)
        ids = torch.tensor([prompt + [t] for t in range(V)])
        second = torch.softmax(target.model(ids).logits[:, -1] / temperature, -1)
    return first[:, None] * second


def _chi_square_p(counts, probs, samples):
    from scipy.stats import chisquare

    expected = probs.flatten().numpy() * samples
    observed = counts.flatten().numpy()
    keep = expected >= 5  # pool rare cells so the chi-square approximation holds
    obs = list(observed[keep]) + [observed[~keep].sum()]
    exp = list(expected[keep]) + [expected[~keep].sum()]
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return chisquare(obs, exp).pvalue


@pytest.mark.parametrize("method", ["dflash", "ddtree", "treeflash"])
def test_sampled_distribution_matches_the_target(method):
    """Chi-square over the first two sampled tokens on a tiny vocabulary; the control below shows the same
    test rejects a distribution that is off by a small temperature change."""
    target = tiny_target("llama", vocab=6, seed=4)
    drafter = tiny_drafter(target, block_size=4)
    decoder = Decoder(target, drafter)
    prompt, samples = [1, 3, 2], 900
    counts = torch.zeros(6, 6)
    for seed in range(samples):
        out = decoder.generate(prompt, DecodeConfig(method=method, budget=6, max_new_tokens=2, temperature=1.0,
                                                     seed=10_000 + seed, stop_at_eos=False)).token_ids
        counts[out[0], out[1]] += 1
    assert _chi_square_p(counts, _joint_probabilities(target, prompt, 1.0), samples) > 1e-3
    # Control: the same counts are rejected against a slightly different distribution.
    assert _chi_square_p(counts, _joint_probabilities(target, prompt, 0.8), samples) < 1e-3


def test_stops_at_eos_and_reports_it():
    target = tiny_target("llama")
    drafter = tiny_drafter(target)
    free = greedy_reference(target, PROMPT, 30)
    target.eos_token_ids = (free[12],)
    cut = free.index(free[12]) + 1
    for method in METHODS:
        result = Decoder(target, drafter).generate(PROMPT, DecodeConfig(method=method, max_new_tokens=30))
        assert result.token_ids == free[:cut] and result.stop_reason == "eos"
        ignored = Decoder(target, drafter).generate(
            PROMPT, DecodeConfig(method=method, max_new_tokens=30, stop_at_eos=False))
        assert ignored.token_ids == free


def test_callback_can_stop_generation_and_tiny_temperatures_are_greedy():
    target = tiny_target("llama")
    decoder = Decoder(target, tiny_drafter(target))
    seen = []

    def stop_after_ten(tokens):
        seen.extend(tokens)
        return len(seen) >= 10

    result = decoder.generate(PROMPT, DecodeConfig(method="ddtree", max_new_tokens=50), on_tokens=stop_after_ten)
    assert result.stop_reason == "stopped" and 10 <= result.new_tokens < 50 and result.token_ids == seen
    greedy = decoder.generate(PROMPT, DecodeConfig(method="ar", max_new_tokens=20)).token_ids
    assert decoder.generate(PROMPT, DecodeConfig(method="ar", max_new_tokens=20, temperature=1e-40,
                                                 seed=1)).token_ids == greedy


def test_stops_at_the_context_limit():
    target = tiny_target("qwen3", max_length=40)
    drafter = tiny_drafter(target)
    for method, lookup in [(m, 0) for m in METHODS] + [(m, 12) for m in METHODS]:
        result = Decoder(target, drafter).generate(PROMPT, DecodeConfig(method=method, max_new_tokens=100,
                                                                        lookup=lookup, lookup_ngram=1))
        assert result.stop_reason == "context"
        assert len(PROMPT) + result.new_tokens == 40
        assert result.token_ids == greedy_reference(target, PROMPT, 33)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(budget=0), "budget"),
        (dict(budget=-3), "budget"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(method="beam"), "unknown method"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(lookup=-1), "lookup must be"),
        (dict(lookup=2.5), "lookup must be"),
        (dict(lookup_ngram=0), "lookup_ngram"),
        (dict(lookup_ngram=5), "lookup_ngram"),
    ],
)
def test_bad_settings_are_clear_errors(kwargs, message):
    with pytest.raises(TreeFlashError, match=message):
        DecodeConfig(**kwargs)


def test_bad_prompts_are_clear_errors():
    target = tiny_target("llama", max_length=32)
    decoder = Decoder(target, tiny_drafter(target))
    with pytest.raises(TreeFlashError, match="empty"):
        decoder.generate([], DecodeConfig(method="ddtree"))
    with pytest.raises(TreeFlashError, match="context holds 32"):
        decoder.generate(list(range(32)), DecodeConfig(method="ddtree"))
    with pytest.raises(TreeFlashError, match="outside the target's vocabulary"):
        decoder.generate([1, 2, 500], DecodeConfig(method="ddtree"))
    with pytest.raises(TreeFlashError, match="needs a drafter"):
        Decoder(target).generate([1, 2], DecodeConfig(method="dflash"))
    with pytest.raises(TreeFlashError, match="TreeFlash head"):
        Decoder(target, tiny_drafter(target, head=False)).generate([1, 2], DecodeConfig(method="treeflash"))
