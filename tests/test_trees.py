"""Tree building and compiling, checked against brute force on tiny vocabularies."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor

from treeflash.errors import TreeFlashError
from treeflash.trees import (
    DraftTree,
    best_first_tree,
    budget_from_tree_size,
    chain_tree,
    check_budget,
    conditional_tree,
    graft_chain,
    marginal_tree,
    top_k_logprobs,
    tree_attention_mask,
    tree_positions,
)

ROOT = 99  # outside the tiny vocabularies, so a root is never mistaken for a node


def random_rows(generator: torch.Generator, rows: int, vocab: int, k: int) -> tuple[Tensor, Tensor]:
    """Top-k tokens and log-probs of `rows` random continuous distributions (no ties, almost surely)."""
    logits = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * 2
    tokens, logprobs = top_k_logprobs(logits, k)
    return tokens, logprobs


def check_invariants(tree: DraftTree) -> None:
    n = tree.tokens.shape[0]
    assert tree.parents[0] == -1 and tree.depths[0] == 0 and tree.scores[0] == 0 and tree.tokens[0] == ROOT
    for i in range(1, n):
        p = int(tree.parents[i])
        assert 0 <= p < i, "a parent precedes its children"
        assert tree.depths[i] == tree.depths[p] + 1
        assert tree.scores[i] <= tree.scores[p]
    assert torch.all(tree.scores[2:] <= tree.scores[1:-1]), "nodes come out best first"
    siblings = [(int(p), int(t)) for p, t in zip(tree.parents[1:], tree.tokens[1:])]
    assert len(set(siblings)) == len(siblings), "siblings never share a token"


def paths_of(tree: DraftTree) -> dict[tuple[int, ...], float]:
    """Map each drafted node's token path (root excluded) to its score."""
    tokens, parents = tree.tokens.tolist(), tree.parents.tolist()
    paths: list[tuple[int, ...]] = [()]
    for i in range(1, len(tokens)):
        paths.append(paths[parents[i]] + (tokens[i],))
    return {paths[i]: float(tree.scores[i]) for i in range(1, len(tokens))}


def assert_same_nodes(tree: DraftTree, expected: dict[tuple[int, ...], float]) -> None:
    got = paths_of(tree)
    assert set(got) == set(expected)
    for path, score in expected.items():
        assert math.isclose(got[path], score, rel_tol=1e-5, abs_tol=1e-5)


def top(all_paths: dict[tuple[int, ...], float], budget: int) -> dict[tuple[int, ...], float]:
    best = sorted(all_paths.items(), key=lambda item: -item[1])[:budget]
    return dict(best)


# -- marginal (DDTree) --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("budget", [1, 2, 4, 7, 30, 154, 155, 400])
def test_marginal_tree_is_the_top_budget_prefixes(seed, budget):
    vocab, depth = 5, 3
    generator = torch.Generator().manual_seed(seed)
    k = min(budget, vocab)
    tokens, logprobs = random_rows(generator, depth, vocab, k)
    tree = marginal_tree(ROOT, tokens, logprobs, budget)
    check_invariants(tree)

    table = {(d, int(t)): float(lp) for d in range(depth) for t, lp in zip(tokens[d], logprobs[d])}
    all_paths = {}
    for length in range(1, depth + 1):
        for path in itertools.product(range(vocab), repeat=length):
            if all((d, t) in table for d, t in enumerate(path)):
                all_paths[path] = sum(table[(d, t)] for d, t in enumerate(path))
    assert len(all_paths) == k + k**2 + k**3
    assert tree.size == min(budget, len(all_paths))
    assert_same_nodes(tree, top(all_paths, budget))


def test_marginal_tree_with_k_below_vocab_loses_nothing():
    """K = min(budget, V) suffices: the same tree comes out of the full rows and of the top-budget rows."""
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 40, generator=generator)
    for budget in (3, 10, 25):
        full = marginal_tree(ROOT, *top_k_logprobs(logits, 40), budget)
        cut = marginal_tree(ROOT, *top_k_logprobs(logits, budget), budget)
        assert torch.equal(full.tokens, cut.tokens) and torch.equal(full.parents, cut.parents)


# -- conditional (TreeFlash) --------------------------------------------------------------------------------


def brute_force_conditional(parent_tokens: Tensor, tokens: Tensor, logprobs: Tensor) -> dict[tuple[int, ...], float]:
    """Every path the tables allow, with its summed conditional log-prob."""
    depth, m = parent_tokens.shape[0] + 1, parent_tokens.shape[1]
    found: dict[tuple[int, ...], float] = {}

    def visit(row: int, d: int, prefix: tuple[int, ...], score: float) -> None:
        for t, lp in zip(tokens[row].tolist(), logprobs[row].tolist()):
            path, s = prefix + (t,), score + lp
            found[path] = s
            candidates = parent_tokens[d - 1].tolist() if d < depth else []
            if t in candidates:  # otherwise a leaf: the head was not evaluated for this token
                visit(1 + (d - 1) * m + candidates.index(t), d + 1, path, s)

    visit(0, 1, (), 0.0)
    return found


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("budget", [1, 3, 8, 20, 60, 1000])
def test_conditional_tree_is_the_top_budget_paths(seed, budget):
    vocab, depth, m, k = 6, 4, 3, 4
    generator = torch.Generator().manual_seed(seed)
    parent_tokens = torch.stack([torch.randperm(vocab, generator=generator)[:m] for _ in range(depth - 1)])
    tokens, logprobs = random_rows(generator, 1 + (depth - 1) * m, vocab, k)
    tree = conditional_tree(ROOT, parent_tokens, tokens, logprobs, budget)
    check_invariants(tree)
    all_paths = brute_force_conditional(parent_tokens, tokens, logprobs)
    assert any(len(p) == depth for p in all_paths), "the case should reach the deepest depth"
    assert tree.size == min(budget, len(all_paths))
    assert_same_nodes(tree, top(all_paths, budget))


def test_conditional_tree_leaves_and_rows():
    """A hand-built case: children come from the row of the node's own token; non-candidates are leaves."""
    parent_tokens = torch.tensor([[3, 4]])  # candidate parents at depth 1
    tokens = torch.tensor([[4, 3, 2], [7, 8, 9], [5, 6, 1]])  # rows: root, after 3, after 4
    logprobs = torch.tensor([[-0.1, -0.5, -0.6], [-0.2, -3.0, -4.0], [-0.3, -2.0, -5.0]])
    tree = conditional_tree(ROOT, parent_tokens, tokens, logprobs, 5)
    assert paths_of(tree).keys() == {(4,), (4, 5), (3,), (2,), (3, 7)}
    # Token 2 is no candidate parent at depth 1, so nothing hangs under it even with a larger budget.
    big = conditional_tree(ROOT, parent_tokens, tokens, logprobs, 100)
    assert big.size == 9 and not any(p[0] == 2 and len(p) > 1 for p in paths_of(big))


def test_conditional_tree_depth_one():
    tokens, logprobs = torch.tensor([[2, 1]]), torch.tensor([[-0.1, -1.0]])
    tree = conditional_tree(ROOT, torch.empty(0, 4, dtype=torch.int64), tokens, logprobs, 8)
    assert tree.tokens.tolist() == [ROOT, 2, 1] and tree.depths.tolist() == [0, 1, 1]


# -- chain (DFlash), budget 1, the generic search -------------------------------------------------------------


def test_chain_tree():
    tokens, logprobs = torch.tensor([5, 6, 7, 8]), torch.tensor([-0.5, -0.25, -1.0, -0.125])
    full = chain_tree(ROOT, tokens, logprobs)
    assert full.tokens.tolist() == [ROOT, 5, 6, 7, 8]
    assert full.parents.tolist() == [-1, 0, 1, 2, 3] and full.depths.tolist() == [0, 1, 2, 3, 4]
    assert full.scores.tolist() == [0.0, -0.5, -0.75, -1.75, -1.875]
    assert chain_tree(ROOT, tokens, logprobs, 2).tokens.tolist() == [ROOT, 5, 6]
    assert chain_tree(ROOT, tokens, logprobs, 50).size == 4
    assert chain_tree(ROOT, tokens[:0], logprobs[:0]).size == 0


def test_budget_one_is_the_best_depth_one_token():
    generator = torch.Generator().manual_seed(3)
    tokens, logprobs = random_rows(generator, 3, 8, 1)
    tree = marginal_tree(ROOT, tokens, logprobs, 1)
    assert tree.size == 1 and tree.tokens.tolist() == [ROOT, int(tokens[0, 0])]
    assert tree_attention_mask(tree).tolist() == [[True, False], [True, True]]


def test_zero_probability_entries_are_never_added():
    tokens = torch.tensor([[1, 2, 3]])
    logprobs = torch.tensor([[0.0, -math.inf, -math.inf]])
    tree = best_first_tree(ROOT, tokens, logprobs, torch.full((1, 3), -1), 10)
    assert tree.tokens.tolist() == [ROOT, 1]


def test_children_map():
    tree = conditional_tree(ROOT, torch.tensor([[3, 4]]), torch.tensor([[4, 3], [7, 8], [5, 6]]),
                            torch.tensor([[-0.1, -0.5], [-0.2, -3.0], [-0.3, -2.0]]), 10)
    for i, kids in enumerate(tree.children):
        for token, child in kids.items():
            assert tree.parents[child] == i and tree.tokens[child] == token
    assert sum(len(kids) for kids in tree.children) == tree.size


# -- compile: mask and positions ----------------------------------------------------------------------------


def test_tree_attention_mask_is_ancestor_only():
    generator = torch.Generator().manual_seed(7)
    depth, m, k, vocab = 5, 3, 4, 7
    parent_tokens = torch.stack([torch.randperm(vocab, generator=generator)[:m] for _ in range(depth - 1)])
    tokens, logprobs = random_rows(generator, 1 + (depth - 1) * m, vocab, k)
    tree = conditional_tree(ROOT, parent_tokens, tokens, logprobs, 60)
    assert int(tree.depths.max()) >= 3
    mask = tree_attention_mask(tree)
    n = tree.size + 1
    expected = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j != -1:
            expected[i, j] = True
            j = int(tree.parents[j])
    assert mask.dtype == torch.bool and torch.equal(mask, expected)


def test_tree_positions():
    tree = marginal_tree(ROOT, torch.tensor([[1, 2], [3, 4]]), torch.tensor([[-0.1, -0.2], [-0.3, -0.4]]), 6)
    assert torch.equal(tree_positions(tree, 40), 40 + tree.depths)
    assert tree_positions(tree, 40)[0] == 40 and tree_positions(tree, 40).dtype == torch.int64


# -- grafts (n-gram lookup) ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_graft_chain_adds_exactly_the_chain_prefixes_the_tree_lacks(seed):
    generator = torch.Generator().manual_seed(seed)
    tokens, logprobs = random_rows(generator, 4, 5, 3)
    tree = marginal_tree(ROOT, tokens, logprobs, 9)
    best = max(paths_of(tree), key=len)  # the chain runs along a deepest path, then leaves the tree
    for chain in [list(best), list(best[:2]) + [42, 43, 44], [42, 43], [], list(best) + [41]]:
        grafted = graft_chain(tree, chain)
        before, after = paths_of(tree), paths_of(grafted)
        prefixes = {tuple(chain[:i]) for i in range(1, len(chain) + 1)}
        assert set(after) == set(before) | prefixes
        assert all(after[p] == score for p, score in before.items()), "the tree's own nodes are untouched"
        assert all(after[p] == -math.inf for p in prefixes - set(before)), "grafted nodes score -inf"
        assert torch.equal(grafted.tokens[: tree.size + 1], tree.tokens), "grafted nodes come after the tree's"
        if prefixes <= set(before):
            assert grafted is tree
        for i in range(1, grafted.size + 1):
            p = int(grafted.parents[i])
            assert 0 <= p < i and grafted.depths[i] == grafted.depths[p] + 1
        siblings = [(int(p), int(t)) for p, t in zip(grafted.parents[1:], grafted.tokens[1:])]
        assert len(set(siblings)) == len(siblings), "siblings never share a token"


def test_a_chain_grafted_onto_the_root_alone_is_a_chain():
    root_only = DraftTree(torch.tensor([ROOT]), torch.tensor([-1]), torch.tensor([0]), torch.zeros(1))
    tree = graft_chain(root_only, [4, 4, 6])
    assert tree.tokens.tolist() == [ROOT, 4, 4, 6] and tree.parents.tolist() == [-1, 0, 1, 2]
    assert tree.depths.tolist() == [0, 1, 2, 3]
    assert torch.equal(tree_attention_mask(tree), torch.ones(4, 4, dtype=torch.bool).tril())


# -- budgets and top-k ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8", None])
def test_check_budget_rejects(bad):
    with pytest.raises(TreeFlashError, match="budget must be a whole number"):
        check_budget(bad)


def test_budget_conventions():
    assert check_budget(64) == 64
    assert budget_from_tree_size(65) == 64  # ETH's tree_size counts the root
    for bad in (1, 0, 3.0):
        with pytest.raises(TreeFlashError, match="tree_size"):
            budget_from_tree_size(bad)
    with pytest.raises(TreeFlashError):
        marginal_tree(ROOT, torch.tensor([[1]]), torch.tensor([[-0.1]]), 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_top_k_logprobs_matches_log_softmax(dtype):
    logits = (torch.randn(5, 50, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    tokens, logprobs = top_k_logprobs(logits, 7)
    reference = torch.log_softmax(logits.double(), dim=-1).topk(7, dim=-1)
    assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32 and tokens.shape == (5, 7)
    assert torch.equal(tokens, reference.indices)
    assert torch.allclose(logprobs.double(), reference.values, atol=1e-5)
    assert torch.all(logprobs[:, 1:] <= logprobs[:, :-1])


def test_top_k_logprobs_rejects_bad_k():
    for bad in (0, 51, 2.0):
        with pytest.raises(TreeFlashError, match="top-k"):
            top_k_logprobs(torch.zeros(2, 50), bad)


@pytest.mark.parametrize("budget", [1, 3, 6, 30])
@pytest.mark.parametrize("method, lazy", [("ddtree", None), ("treeflash", True), ("treeflash", False)])
def test_build_tree_skips_unreachable_depths_without_changing_the_tree(method, lazy, budget):
    """build_tree cuts the block to `budget` positions (a B-node tree is at most B deep) and, with lazy rows,
    evaluates only the head rows it reaches; the tree must be the one built from the whole block."""
    from helpers import tiny_drafter, tiny_target

    from treeflash.decoding import build_tree
    from treeflash.trees import conditional_tree, marginal_tree, top_k_logprobs

    target = tiny_target("llama")
    drafter = tiny_drafter(target)
    features = torch.randn(6, 3 * target.hidden_size, generator=torch.Generator().manual_seed(budget),
                           dtype=torch.float64)
    block = drafter.draft(target, 7, features, drafter.new_cache(32))
    got = build_tree(drafter, target, method, 7, block, budget, draft_top_k=4, candidate_tokens=3, lazy_rows=lazy)
    depth = block.logits.shape[0]
    if method == "ddtree":
        tokens, logprobs = top_k_logprobs(block.logits, min(budget, target.vocab_size))
        want = marginal_tree(7, tokens, logprobs, budget)
    else:
        parents = block.logits[: depth - 1].topk(3, dim=-1).indices
        hidden = torch.cat((block.hidden[:1], block.hidden[1:].repeat_interleave(3, dim=0)))
        rows = drafter.conditional_logits(target, hidden, torch.cat((torch.tensor([7]), parents.flatten())))
        tokens, logprobs = top_k_logprobs(rows, 4)
        want = conditional_tree(7, parents, tokens, logprobs, budget)
    for field in ("tokens", "parents", "depths"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    torch.testing.assert_close(got.scores, want.scores)


@pytest.mark.parametrize("seed", range(40))
def test_lazy_conditional_tree_equals_the_fully_evaluated_one(seed):
    """Placeholders with their parent's score as an upper bound, evaluated in batches, give exactly the tree of
    the full table: same nodes, same order, ties (coarse log-probs) and -inf entries included."""
    from treeflash.trees import lazy_conditional_tree

    g = torch.Generator().manual_seed(seed)
    depth, m, k, vocab = int(torch.randint(1, 7, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g)), \
        int(torch.randint(1, 5, (1,), generator=g)), 9
    budget = int(torch.randint(1, 25, (1,), generator=g))
    parents = torch.stack([torch.randperm(vocab, generator=g)[:m] for _ in range(depth - 1)]) if depth > 1 \
        else torch.zeros(0, m, dtype=torch.int64)
    num_rows = 1 + (depth - 1) * m
    logits = (torch.randn(num_rows, vocab, generator=g) * 2).round()  # rounding makes ties common
    logits[torch.rand(num_rows, vocab, generator=g) < 0.15] = -math.inf
    logits[:, 0] = 0.0  # every row keeps one finite entry
    tokens, logprobs = top_k_logprobs(logits, k)
    full = conditional_tree(3, parents, tokens, logprobs, budget)
    asked = []

    def evaluate(rows):
        asked.append(rows.tolist())
        return tokens[rows], logprobs[rows]

    for prefetch in (None, 1 + m * torch.arange(depth - 1)):  # without guesses, most rows come lazily
        asked.clear()
        lazy, evaluated = lazy_conditional_tree(3, parents, evaluate, budget, prefetch=prefetch)
        for field in ("tokens", "parents", "depths", "scores"):
            assert torch.equal(getattr(lazy, field), getattr(full, field)), field
        flat = [r for call in asked for r in call]
        assert len(flat) == len(set(flat)) == evaluated  # no row is evaluated twice
        assert evaluated <= depth + budget  # the first guesses (1 + D-1 rows) plus at most one per node
