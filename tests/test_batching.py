"""Batched decoding: several sequences share the drafter's and the target's passes, and each one's output is
exactly what it gets alone (greedy and seeded), whatever joins or leaves the batch between rounds."""

import pytest
import torch

from treeflash.decoding import METHODS, STAGES, DecodeConfig, Decoder, build_tree, build_trees, tree_steps
from treeflash.errors import TreeFlashError
from treeflash.targets import Segment
from treeflash.trees import tree_attention_mask

from helpers import tiny_drafter, tiny_target

PROMPTS = [[5, 17, 33, 2, 71, 8, 40], [9, 1], [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 12], [3],
           [44, 45, 12, 90, 6]]


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def pair(request):
    target = tiny_target(request.param)
    return target, tiny_drafter(target)


def _alone(decoder, prompts, configs):
    return [decoder.generate(p, c) for p, c in zip(prompts, configs)]


def _same(batched, alone):
    for b, a in zip(batched, alone):
        assert b.token_ids == a.token_ids
        assert b.acceptance_lengths == a.acceptance_lengths
        assert b.stop_reason == a.stop_reason and b.seed == a.seed and b.budget == a.budget


def test_target_forward_batch_equals_one_pass_per_segment(pair):
    """Ragged segments (a prefill, a tree with its ancestor mask, one token) in one pass give each segment's
    logits, features and cache contents of its own pass."""
    target, drafter = pair
    g = torch.Generator().manual_seed(0)
    layers = (1, 2, 4)

    def setup():
        caches = [target.new_cache(64) for _ in range(3)]
        for cache, n in zip(caches[1:], (9, 4)):  # two sequences with a committed context
            target.forward(torch.randint(0, 90, (n,), generator=torch.Generator().manual_seed(n)), torch.arange(n),
                           cache)
            cache.advance(n)
        return caches

    from treeflash.trees import DraftTree
    tree = DraftTree(tokens=torch.tensor([7, 8, 9, 10, 11]), parents=torch.tensor([-1, 0, 0, 1, 1]),
                     depths=torch.tensor([0, 1, 1, 2, 2]), scores=torch.zeros(5))
    mask = torch.ones(5, 9 + 5, dtype=torch.bool)
    mask[:, 9:] = tree_attention_mask(tree)
    prompt = torch.randint(0, 90, (6,), generator=g)

    def segments(caches):
        return [Segment(prompt, torch.arange(6), caches[0], logits_rows=slice(5, 6)),
                Segment(tree.tokens, 9 + tree.depths, caches[1], mask),
                Segment(torch.tensor([3]), torch.tensor([4]), caches[2], features=False)]

    caches = setup()
    batched = target.forward_batch(segments(caches), feature_layers=layers)
    alone_caches = setup()
    for segment, out in zip(segments(alone_caches), batched):
        own = target.forward(segment.tokens, segment.positions, segment.cache, segment.mask,
                             feature_layers=layers if segment.features else (), logits_rows=segment.logits_rows)
        torch.testing.assert_close(out.logits, own.logits)
        assert (out.features is None) == (own.features is None)
        if own.features is not None:
            torch.testing.assert_close(out.features, own.features)
    for a, b in zip(caches, alone_caches):
        torch.testing.assert_close(a.keys, b.keys)
        torch.testing.assert_close(a.values, b.values)


def test_draft_batch_equals_one_draft_per_sequence(pair):
    target, drafter = pair
    g = torch.Generator().manual_seed(3)
    k = len(drafter.config.target_layer_ids) * target.hidden_size
    contexts = [torch.randn(n, k, generator=g, dtype=torch.float64) for n in (5, 1, 12)]
    earlier = [torch.randn(n, k, generator=g, dtype=torch.float64) for n in (0, 7, 3)]

    def caches():
        out = []
        for e in earlier:
            cache = drafter.new_cache(64)
            if e.shape[0]:
                drafter.draft(target, 4, e, cache)
            out.append(cache)
        return out

    batch_caches, alone_caches = caches(), caches()
    batched = drafter.draft_batch(target, [3, 50, 7], contexts, batch_caches)
    for anchor, ctx, cache, block in zip([3, 50, 7], contexts, alone_caches, batched):
        own = drafter.draft(target, anchor, ctx, cache)
        torch.testing.assert_close(block.hidden, own.hidden)
        torch.testing.assert_close(block.logits, own.logits)
    assert [c.length for c in batch_caches] == [c.length for c in alone_caches] == [5, 8, 15]


@pytest.mark.parametrize("lazy", [True, False])
def test_batched_tree_searches_equal_their_own_builds(pair, lazy):
    """TreeFlash searches answered together (one head pass per wave) build the trees they build alone."""
    target, drafter = pair
    g = torch.Generator().manual_seed(5)
    k = len(drafter.config.target_layer_ids) * target.hidden_size
    blocks = [drafter.draft(target, r, torch.randn(6, k, generator=g, dtype=torch.float64), drafter.new_cache(32))
              for r in (3, 11, 40)]
    methods, budgets = ["treeflash", "ddtree", "treeflash"], [5, 9, 14]
    searches = [tree_steps(drafter, m, r, b, n, draft_top_k=4, candidate_tokens=3, lazy_rows=lazy)
                for m, r, b, n in zip(methods, (3, 11, 40), blocks, budgets)]
    together = build_trees(drafter, target, searches)
    for tree, m, r, b, n in zip(together, methods, (3, 11, 40), blocks, budgets):
        own = build_tree(drafter, target, m, r, b, n, draft_top_k=4, candidate_tokens=3, lazy_rows=lazy)
        assert torch.equal(tree.tokens, own.tokens) and torch.equal(tree.parents, own.parents)


@pytest.mark.parametrize("method", METHODS)
def test_batched_greedy_equals_each_alone_as_sequences_join_and_leave(pair, method):
    """Five prompts, at most three at once, of different lengths and max_new_tokens: sequences leave at
    different rounds and waiting ones join mid-generation."""
    target, drafter = pair
    decoder = Decoder(target, drafter)
    configs = [DecodeConfig(method=method, budget=6, max_new_tokens=n) for n in (30, 9, 22, 40, 3)]
    batched = decoder.generate_batch(PROMPTS, configs, max_batch=3)
    _same(batched, _alone(decoder, PROMPTS, configs))


def test_batched_seeded_sampling_equals_each_alone(pair):
    target, drafter = pair
    decoder = Decoder(target, drafter)
    configs = [DecodeConfig(method=m, budget=b, temperature=0.9, top_p=0.95, seed=s, max_new_tokens=25)
               for m, b, s in zip(METHODS + ("treeflash",), (None, None, 8, 5, 12), range(5))]
    batched = decoder.generate_batch(PROMPTS, configs, max_batch=5)
    _same(batched, _alone(decoder, PROMPTS, configs))


def test_one_batch_mixes_methods_budgets_temperatures_and_seeds(pair):
    target, drafter = pair
    decoder = Decoder(target, drafter)
    configs = [DecodeConfig(method="treeflash", budget=4, max_new_tokens=20),
               DecodeConfig(method="ar", temperature=0.7, seed=3, max_new_tokens=20),
               DecodeConfig(method="ddtree", budget=16, temperature=1.1, top_k=20, seed=9, max_new_tokens=20),
               DecodeConfig(method="dflash", max_new_tokens=20),
               DecodeConfig(method="treeflash", budget=24, temperature=0.5, seed=1, draft_top_k=3,
                            candidate_tokens=2, max_new_tokens=20)]
    batched = decoder.generate_batch(PROMPTS, configs, max_batch=8)
    _same(batched, _alone(decoder, PROMPTS, configs))


def test_a_generation_joins_a_running_batch_through_step(pair):
    """The server's view: step() over whatever is active; a new generation is prefilled in the same target
    pass that verifies the others' trees."""
    target, drafter = pair
    decoder = Decoder(target, drafter)
    configs = [DecodeConfig(method="treeflash", budget=6, max_new_tokens=24),
               DecodeConfig(method="ddtree", budget=5, max_new_tokens=24)]
    first = decoder.start(PROMPTS[0], configs[0])
    active = [first]
    for _ in range(3):
        decoder.step(active)
    late = decoder.start(PROMPTS[2], configs[1])
    active.append(late)
    while not all(g.done for g in active):
        decoder.step(active)
    _same([first.result(), late.result()], _alone(decoder, [PROMPTS[0], PROMPTS[2]], configs))


def test_one_generations_failing_callback_ends_only_that_generation(pair):
    target, drafter = pair
    decoder = Decoder(target, drafter)
    config = DecodeConfig(method="treeflash", budget=6, max_new_tokens=30)
    seen = []

    def fails_on_third_round(tokens):
        seen.append(tokens)
        if len(seen) == 3:
            raise RuntimeError("client went away")

    stopped = []
    broken = decoder.start(PROMPTS[0], config, on_tokens=fails_on_third_round)
    quitter = decoder.start(PROMPTS[1], config, on_tokens=lambda tokens: stopped.append(tokens) or len(stopped) == 2)
    healthy = decoder.start(PROMPTS[2], config)
    while not all(g.done for g in (broken, quitter, healthy)):
        decoder.step([broken, quitter, healthy])
    assert broken.stop == "error" and isinstance(broken.error, RuntimeError) and len(seen) == 3
    assert quitter.stop == "stopped" and len(stopped) == 2
    assert healthy.result().token_ids == decoder.generate(PROMPTS[2], config).token_ids
    with pytest.raises(ZeroDivisionError):  # generate() hands the callback's error on
        decoder.generate(PROMPTS[0], config, on_tokens=lambda tokens: 1 / 0)


def test_stage_seconds_time_the_stages_each_method_runs(pair):
    """ar drafts nothing and searches no tree; treeflash's tree search is its "head"; the stages of a sequence's
    steps fit in its wall time."""
    target, drafter = pair
    decoder = Decoder(target, drafter)
    for method in METHODS:
        result = decoder.generate(PROMPTS[0], DecodeConfig(method=method, budget=4, max_new_tokens=12, lookup=0))
        stages = result.stage_seconds
        assert set(stages) == set(STAGES) - ({"head"} if method != "treeflash" else set())
        assert (stages["draft"] == 0) == (method == "ar")
        assert all(seconds > 0 for stage, seconds in stages.items() if stage != "draft" or method != "ar")
        assert sum(stages.values()) <= result.seconds


@pytest.mark.parametrize("method", METHODS)
def test_on_features_sees_the_features_of_every_token_the_target_commits(pair, method):
    """`on_features` gets, each round, the target features of the positions it committed: the prompt, then each
    accepted path (root included), so every token but the last (the root of the round not run yet); the
    drafter's layers for drafting methods, the layers asked for with ar."""
    target, drafter = pair
    decoder = Decoder(target, drafter)
    layers = drafter.config.target_layer_ids if method != "ar" else (0, 5)
    seen = []
    g = decoder.start(PROMPTS[0], DecodeConfig(method=method, budget=4, max_new_tokens=15), on_features=seen.append,
                      feature_layers=(0, 5) if method == "ar" else None)
    decoder.run([g])
    assert [f.shape[0] for f in seen] == [len(PROMPTS[0])] + [a + 1 for a in g.acceptance]
    fed = PROMPTS[0] + g.committed[:-1]  # the last round may have accepted more than max_new_tokens keeps
    whole = target.forward(torch.tensor(fed), torch.arange(len(fed)), target.new_cache(64), feature_layers=layers,
                           logits_rows=None).features
    torch.testing.assert_close(torch.cat(seen)[: len(fed)], whole)


def test_generate_batch_checks_its_arguments(pair):
    target, drafter = pair
    decoder = Decoder(target, drafter)
    with pytest.raises(TreeFlashError, match="2 configs for 3 prompts"):
        decoder.generate_batch(PROMPTS[:3], [DecodeConfig(), DecodeConfig()])
    with pytest.raises(TreeFlashError, match="max_batch must be"):
        decoder.generate_batch(PROMPTS[:3], max_batch=0)
    with pytest.raises(TreeFlashError, match="the prompt is empty"):  # before any generation starts
        decoder.generate_batch([PROMPTS[0], []])
    assert decoder.generate_batch([]) == []


def test_batched_sampling_matches_the_target_distribution():
    """Chi-square over the first two tokens sampled by treeflash in batches of 32 different seeds (as in
    test_decoding's test for one sequence at a time, with the same control)."""
    from test_decoding import _chi_square_p, _joint_probabilities

    target = tiny_target("llama", vocab=6, seed=4)
    decoder = Decoder(target, tiny_drafter(target, block_size=4))
    prompt, samples = [1, 3, 2], 900
    configs = [DecodeConfig(method="treeflash", budget=6, max_new_tokens=2, temperature=1.0, seed=50_000 + s,
                            stop_at_eos=False) for s in range(samples)]
    counts = torch.zeros(6, 6)
    for result in decoder.generate_batch([prompt] * samples, configs, max_batch=32):
        counts[result.token_ids[0], result.token_ids[1]] += 1
    assert _chi_square_p(counts, _joint_probabilities(target, prompt, 1.0), samples) > 1e-3
    assert _chi_square_p(counts, _joint_probabilities(target, prompt, 0.8), samples) < 1e-3
