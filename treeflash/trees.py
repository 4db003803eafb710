"""Draft trees: build (chain, marginal, conditional) and compile (attention mask, positions).

Glossary (fixed here, used everywhere):
  root     the last committed token: the bonus token of the previous round, which the target has not run on
           yet. It is entry 0 of every tree and is verified together with the drafted nodes.
  node     a drafted token in the tree. Every node has exactly one parent (the root or another node).
  budget   B, the number of drafted nodes, the root NOT counted (DDTree's convention). A tree of budget B
           sends B + 1 tokens to the target. ETH's `tree_size` counts the root: tree_size = B + 1.
  depth    the number of edges from the root to a node; the root has depth 0. A node at depth d predicts the
           token at absolute position `root_position + d`.
  marginal q_d(y), the drafter's distribution for the token at depth d given the context only (DFlash, DDTree).
  conditional q_d(y | parent token), the TreeFlash head's distribution at depth d given the parent's token.
  score    the drafter's log-probability of the path root -> node: a sum of marginal (DDTree) or
           conditional (TreeFlash) log-probs along the path.
  graft    nodes not from the drafter (an n-gram lookup's chain, `treeflash.ngrams`) merged in after the
           search's nodes; their score is -inf, and they do not count against the budget.

All three methods build their tree with one best-first search, `best_first_tree`, over a small table of
"rows": row r lists the top-k children (tokens and log-probs, sorted best first) that a node drawing its
children from row r gets, and `next_row` says which row the children of each of those children come from.
A chain is k = 1; DDTree has one row per depth; TreeFlash has one row per (depth, candidate parent token).
"""

from __future__ import annotations

import functools
import heapq
import math
import numbers
from dataclasses import dataclass
from typing import Callable, Generator, Sequence, TypeVar

import numpy as np
import torch
from torch import Tensor

from .errors import TreeFlashError

__all__ = [
    "DraftTree",
    "best_first_tree",
    "budget_from_tree_size",
    "candidate_rows",
    "chain_tree",
    "check_budget",
    "conditional_tree",
    "graft_chain",
    "lazy_conditional_tree",
    "lazy_conditional_tree_steps",
    "run_steps",
    "marginal_tree",
    "top_k_logprobs",
    "tree_attention_mask",
    "tree_positions",
]


# eq=False: fields are tensors, so the generated __eq__ would be ambiguous; identity is what callers need.
@dataclass(frozen=True, eq=False)
class DraftTree:
    """A draft tree in best-first order: every node's parent comes before it.

    Entry 0 is the root; entries 1..n-1 are the drafted nodes, in the order the search added them
    (non-increasing score), so any prefix of the entries is itself a valid, prefix-closed tree. Grafted nodes
    (`graft_chain`) follow them, scored -inf.
    """

    tokens: Tensor  # [n] int64, CPU. Entry 0 is the root; entries 1..n-1 are drafted nodes in best-first order
    parents: Tensor  # [n] int64. parents[0] == -1, parents[i] < i for i >= 1
    depths: Tensor  # [n] int64. depths[0] == 0, depths[i] == depths[parents[i]] + 1
    scores: Tensor  # [n] float32. Drafter log-probability of the path root -> i (0 for the root)

    def __post_init__(self):
        n = self.tokens.shape[0]
        assert self.tokens.dim() == 1 and n >= 1, "a tree holds at least the root"
        assert self.parents.shape == self.depths.shape == self.scores.shape == (n,), "tree fields differ in length"

    @property
    def size(self) -> int:
        """Number of drafted nodes (the root not counted): at most the budget."""
        return self.tokens.shape[0] - 1

    @functools.cached_property
    def children(self) -> list[dict[int, int]]:
        """Per entry, a map from a child's token to the child's index. Siblings never share a token, because
        every row of children comes from a top-k."""
        kids: list[dict[int, int]] = [{} for _ in range(self.tokens.shape[0])]
        for i, (token, parent) in enumerate(zip(self.tokens.tolist(), self.parents.tolist())):
            if i:
                kids[parent][token] = i
        return kids


def check_budget(budget) -> int:
    """Raise `TreeFlashError` unless `budget` is a whole number of draft nodes >= 1; return it as an int."""
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or budget < 1:
        raise TreeFlashError(
            f"budget must be a whole number of draft nodes >= 1 (the root is not counted); got {budget!r}"
        )
    return int(budget)


def budget_from_tree_size(tree_size) -> int:
    """Convert ETH TreeFlash's `tree_size` (which counts the root) to a budget (which does not)."""
    if isinstance(tree_size, bool) or not isinstance(tree_size, numbers.Integral) or tree_size < 2:
        raise TreeFlashError(
            f"tree_size counts the root, so it must be a whole number >= 2 (budget = tree_size - 1); got {tree_size!r}"
        )
    return int(tree_size) - 1


def top_k_logprobs(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The top-k tokens of each row and their log-probabilities, best first.

    logits: [R, V] any float dtype, any device.
    Returns (tokens [R, k] int64, logprobs [R, k] float32) on the logits' device.
    """
    vocab = logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= vocab:
        raise TreeFlashError(f"top-k must be a whole number between 1 and the vocabulary size {vocab}; got {k!r}")
    # Only k log-probs are needed, so normalise those k values instead of the whole [R, V] log_softmax; the
    # normaliser is taken in float32 because bf16 log-probs would tie and reorder the best-first search.
    values, tokens = logits.topk(int(k), dim=-1)
    logprobs = values.float() - torch.logsumexp(logits.float(), dim=-1, keepdim=True)
    return tokens, logprobs


def _numpy(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def best_first_tree(root: int, row_tokens: Tensor, row_logprobs: Tensor, next_row: Tensor, budget: int) -> DraftTree:
    """The `budget` highest-scoring nodes reachable through the row table, found best-first.

    root:          the root token.
    row_tokens:    [R, k] int64, CPU. Row r holds the top-k children of any node that draws its children from
                   row r, best first. Row 0 holds the root's children.
    row_logprobs:  [R, k] float, CPU. Log-prob of each entry given its parent; sorted descending in each row.
    next_row:      [R, k] int64, CPU. The row holding the children of a node made from entry (r, j), or -1 if
                   such a node must stay a leaf.
    budget:        the most drafted nodes to add. The tree is smaller when fewer entries are reachable.

    Because each row is sorted and log-probs are <= 0, a node never outscores its parent or its elder sibling,
    so the heap only needs each node's next sibling and first child as candidates: the result is exactly the
    `budget` best paths (ties broken by push order), and nodes come out in non-increasing score. Entries with
    log-prob -inf (zero drafter probability) are never added.
    """
    budget = check_budget(budget)
    assert row_tokens.shape == row_logprobs.shape == next_row.shape and row_tokens.dim() == 2
    # This runs every decode round: per-element tensor indexing costs microseconds, so rows are turned into
    # Python lists lazily, once each, and only for rows the search reaches (a TreeFlash table has ~225 rows,
    # a budget-64 search touches far fewer).
    tokens_np, logprobs_np, next_np = _numpy(row_tokens), _numpy(row_logprobs), _numpy(next_row)
    rows: dict[int, tuple[list[int], list[float], list[int]]] = {}

    def row(r: int) -> tuple[list[int], list[float], list[int]]:
        if r not in rows:
            rows[r] = (tokens_np[r].tolist(), logprobs_np[r].tolist(), next_np[r].tolist())
        return rows[r]

    if row_tokens.shape[0] == 0 or row_tokens.shape[1] == 0:
        return _search(root, lambda r: None, lambda wanted: None, 0, budget)
    return _search(root, row, lambda wanted: None, row_tokens.shape[1], budget)


Row = tuple[list[int], list[float], list[int]]  # (tokens, log-probs, next rows) of one row, best first
Request, Answer, Result = TypeVar("Request"), TypeVar("Answer"), TypeVar("Result")


def run_steps(steps: Generator[Request, Answer, Result], answer: Callable[[Request], Answer]) -> Result:
    """Run a search written as a generator: each value it yields is a request, `answer(request)` is sent back,
    and what it returns is the result. (A batched decode step answers the requests of many searches at once.)"""
    try:
        request = next(steps)
        while True:
            request = steps.send(answer(request))
    except StopIteration as stop:
        return stop.value


def _search(root: int, row, fetch, k: int, budget: int) -> DraftTree:
    """The best-first search behind every tree; see `_search_steps`. fetch(rows) evaluates those rows."""
    return run_steps(_search_steps(root, row, k, budget), fetch)


def _search_steps(root: int, row, k: int, budget: int) -> Generator[list[int], None, DraftTree]:
    """The best-first search behind every tree.

    row(r) gives row r as a `Row`, or None while it has not been evaluated; the search yields the rows it
    needs evaluated next (sorted row ids), and row() must give them when it resumes. k: entries per row (0: no
    rows at all, the tree is the root alone).

    A node's first child needs the node's row. If that row is not evaluated yet, the child goes on the heap as
    a placeholder whose score is the node's own, an upper bound, since log-probs are <= 0. Real entries that
    outscore it are popped first, as they would be anyway; when a placeholder reaches the top, every
    placeholder on the heap is evaluated in one request and put back with its real score and its original push
    number. The tree is therefore exactly the one a fully evaluated table gives, ties included.
    """
    tokens, parents, depths, scores = [int(root)], [-1], [0], [0.0]
    # Heap items: (-score, push order, row, rank, parent index, score); rank -1 marks a placeholder. Push
    # order breaks ties deterministically and keeps tuple comparison away from the later fields.
    heap: list[tuple[float, int, int, int, int, float]] = []
    pushes = 0

    def push(r: int, j: int, parent: int, number: int | None = None) -> None:
        nonlocal pushes
        entries = row(r)
        if entries is None:
            score, j = scores[parent], -1
        else:
            score = scores[parent] + entries[1][j]
        if score > -math.inf:
            heapq.heappush(heap, (-score, pushes if number is None else number, r, j, parent, score))
            pushes += number is None

    if k > 0:
        push(0, 0, 0)
    while heap and len(tokens) <= budget:
        if heap[0][3] < 0:  # a placeholder on top: evaluate every pending row at once, then go on
            waiting = [item for item in heap if item[3] < 0]
            heap[:] = [item for item in heap if item[3] >= 0]
            heapq.heapify(heap)
            yield sorted({item[2] for item in waiting})
            for _, number, r, _, parent, _ in waiting:
                push(r, 0, parent, number)
            continue
        _, _, r, j, parent, score = heapq.heappop(heap)
        row_tok, _, row_next = row(r)
        node = len(tokens)
        tokens.append(row_tok[j])
        parents.append(parent)
        depths.append(depths[parent] + 1)
        scores.append(score)
        if j + 1 < k:
            push(r, j + 1, parent)
        if row_next[j] >= 0:
            push(row_next[j], 0, node)

    return DraftTree(
        tokens=torch.tensor(tokens, dtype=torch.int64),
        parents=torch.tensor(parents, dtype=torch.int64),
        depths=torch.tensor(depths, dtype=torch.int64),
        scores=torch.tensor(scores, dtype=torch.float32),
    )


def graft_chain(tree: DraftTree, chain: Sequence[int]) -> DraftTree:
    """`tree` with the path root -> chain[0] -> chain[1] -> ... merged in: the chain runs along existing nodes
    while they hold its tokens, and the rest becomes new nodes appended after the tree's own (parents still
    come before children, siblings still never share a token), scored -inf. Returns `tree` itself when the
    chain adds nothing."""
    children = tree.children
    node, extra = 0, []
    for i, token in enumerate(int(t) for t in chain):
        child = children[node].get(token)
        if child is None:
            extra = [int(t) for t in chain[i:]]
            break
        node = child
    if not extra:
        return tree
    n = tree.tokens.shape[0]
    depth = int(tree.depths[node])
    return DraftTree(
        tokens=torch.cat([tree.tokens, torch.tensor(extra, dtype=tree.tokens.dtype)]),
        parents=torch.cat([tree.parents, torch.tensor([node] + list(range(n, n + len(extra) - 1)),
                                                      dtype=tree.parents.dtype)]),
        depths=torch.cat([tree.depths, torch.arange(depth + 1, depth + 1 + len(extra), dtype=tree.depths.dtype)]),
        scores=torch.cat([tree.scores, torch.full((len(extra),), -math.inf, dtype=tree.scores.dtype)]),
    )


def marginal_tree(root: int, row_tokens: Tensor, row_logprobs: Tensor, budget: int) -> DraftTree:
    """DDTree: the `budget` most probable prefixes under Q(y_1..y_D) = prod_d q_d(y_d).

    row_tokens:   [D, K] int64, CPU. Row d-1 is the top-K of the marginal at depth d, best first.
    row_logprobs: [D, K] float, CPU. Their marginal log-probs.
    Every node at depth d draws its children from row d; depth-D nodes are leaves. K = min(budget, V) loses
    nothing, since a tree of B nodes never uses more than B entries of one row.
    """
    depth = row_tokens.shape[0]
    next_row = torch.arange(1, depth + 1, dtype=torch.int64)
    next_row[-1:] = -1  # no-op when depth == 0
    next_row = next_row[:, None].expand_as(row_tokens)
    return best_first_tree(root, row_tokens, row_logprobs, next_row, budget)


def chain_tree(root: int, marginal_tokens: Tensor, marginal_logprobs: Tensor, budget: int | None = None) -> DraftTree:
    """DFlash: a chain of the argmax of each marginal, min(D, budget) nodes long.

    marginal_tokens:   [D] int64, CPU. The argmax of the marginal at each depth 1..D.
    marginal_logprobs: [D] float, CPU. Their log-probs (only fill in `scores`; a chain is never reordered).
    """
    if budget is not None:
        check_budget(budget)
    n = marginal_tokens.shape[0] if budget is None else min(marginal_tokens.shape[0], budget)
    # Cutting the table to n rows makes the node at depth n a leaf; max(n, 1) only satisfies check_budget when
    # the drafter gave no depths at all (then the tree is the root alone).
    return marginal_tree(root, marginal_tokens[:n, None], marginal_logprobs[:n, None], max(n, 1))


def conditional_tree(
    root: int, parent_tokens: Tensor, row_tokens: Tensor, row_logprobs: Tensor, budget: int
) -> DraftTree:
    """TreeFlash: the `budget` best paths when each node's children come from its own token's conditional.

    D is the deepest depth and m the number of candidate parents per depth.
    parent_tokens: [D-1, m] int64, CPU. parent_tokens[d-1] are the candidate parents at depth d (d = 1..D-1):
                   the top-m tokens of the depth-d marginal, so no token repeats within a row.
    row_tokens:    [R, k] int64, CPU, R = 1 + (D-1)*m. Row 0: the root's children (depth 1). Row
                   1 + (d-1)*m + j: the top-k children at depth d+1 of a depth-d node whose token is
                   parent_tokens[d-1, j], best first.
    row_logprobs:  [R, k] float, CPU. Their conditional log-probs.
    A depth-d node whose token is not a candidate parent at depth d (and every depth-D node) is a leaf: the
    head was never evaluated for it, so it has no children to offer.
    """
    num_rows, k = row_tokens.shape
    m = parent_tokens.shape[1] if parent_tokens.dim() == 2 and parent_tokens.shape[0] > 0 else 0
    depth = parent_tokens.shape[0] + 1
    assert num_rows == 1 + (depth - 1) * m, "conditional rows must be 1 + (D-1)*m"
    next_row = _conditional_next_rows(torch.arange(num_rows), row_tokens, parent_tokens)
    return best_first_tree(root, row_tokens, row_logprobs, next_row, budget)


def candidate_rows(depths: Tensor, tokens: Tensor, parent_tokens: Tensor) -> Tensor:
    """The conditional row holding the children of nodes at `depths` with `tokens` (any equal shapes, int64,
    CPU): 1 + (d-1)*m + the token's rank among the depth-d candidate parents `parent_tokens` [D-1, m], or -1
    where the token is not a candidate at its depth, the depth is 0 or the deepest D (those nodes are leaves)."""
    depth = parent_tokens.shape[0] + 1
    m = parent_tokens.shape[1] if parent_tokens.dim() == 2 and depth > 1 else 0
    rows = torch.full(tokens.shape, -1, dtype=torch.int64)
    inner = (depths >= 1) & (depths < depth)
    if m and bool(inner.any()):
        d = depths[inner]  # [N]
        match = tokens[inner][:, None] == parent_tokens[d - 1]  # [N, m]
        # One reduction gives both answers; candidates are distinct, so a found token has exactly one rank.
        found, rank = match.max(dim=-1)
        rows[inner] = torch.where(found, 1 + (d - 1) * m + rank, -1)
    return rows


def _conditional_next_rows(row_ids: Tensor, row_tokens: Tensor, parent_tokens: Tensor) -> Tensor:
    """next_row [R', k] for the conditional rows `row_ids` [R'] whose entries are `row_tokens` [R', k]."""
    m = max(parent_tokens.shape[1] if parent_tokens.dim() == 2 else 0, 1)
    # Depth of the children listed in each row: 1 for row 0, d+1 for the rows of depth-d parents.
    row_depth = torch.where(row_ids == 0, 1, (row_ids - 1) // m + 2)
    return candidate_rows(row_depth[:, None].expand_as(row_tokens), row_tokens, parent_tokens)


def lazy_conditional_tree(
    root: int,
    parent_tokens: Tensor,
    evaluate: Callable[[Tensor], tuple[Tensor, Tensor]],
    budget: int,
    prefetch: Tensor | None = None,
) -> tuple[DraftTree, int]:
    """`conditional_tree`, evaluating only the conditional rows that the search reaches.

    parent_tokens: [D-1, m] int64, CPU, as for `conditional_tree`.
    evaluate:      row ids [R'] int64 (numbered as in `conditional_tree`) -> (row_tokens [R', k] int64,
                   row_logprobs [R', k] float), CPU: the head's top-k for those (depth, parent) pairs.
    prefetch:      row ids to evaluate in the first call, with row 0 (guesses at rows the search will need:
                   each call costs a pass of the head, so fewer, larger calls are cheaper).
    A B-node tree needs at most B + 1 rows where the full table has 1 + (D-1)*m. Returns the tree, exactly
    the one `conditional_tree` builds from the full table, and the number of rows evaluated.
    """
    return run_steps(lazy_conditional_tree_steps(root, parent_tokens, budget, prefetch), evaluate)


def lazy_conditional_tree_steps(
    root: int, parent_tokens: Tensor, budget: int, prefetch: Tensor | None = None
) -> Generator[Tensor, tuple[Tensor, Tensor], tuple[DraftTree, int]]:
    """`lazy_conditional_tree` as a generator: it yields the row ids [R'] it needs and takes back their
    (row_tokens [R', k], row_logprobs [R', k]), so that a caller can evaluate the rows of several searches in
    one pass of the head (see `run_steps`)."""
    rows: dict[int, Row] = {}

    def missing(wanted) -> Tensor:
        return torch.tensor([r for r in wanted if r not in rows], dtype=torch.int64)

    def store(ids: Tensor, tokens: Tensor, logprobs: Tensor) -> None:
        next_row = _conditional_next_rows(ids, tokens, parent_tokens)
        for r, t, lp, nr in zip(ids.tolist(), tokens.tolist(), logprobs.tolist(), next_row.tolist()):
            rows[r] = (t, lp, nr)

    first = missing(sorted(set([0] + ([] if prefetch is None else prefetch.tolist()))))
    store(first, *(yield first))
    search = _search_steps(root, rows.get, len(rows[0][0]), budget)
    try:
        wanted = next(search)
        while True:
            ids = missing(wanted)
            if ids.numel():
                store(ids, *(yield ids))
            wanted = search.send(None)
    except StopIteration as stop:
        return stop.value, len(rows)


def tree_attention_mask(tree: DraftTree, device: torch.device | str | None = None) -> Tensor:
    """Ancestor-only attention among the tree's entries.

    Returns [n, n] bool on `device` (default: the CPU): mask[i, j] is True iff j is i or an ancestor of i.
    Built where it is used, from the parents alone: each step marks every entry's next ancestor, one depth
    level up, so a tree of depth D costs D + 1 steps of two tensor ops each, with no host synchronisation on a
    GPU (the depth is read from the tree, which lives on the host). On a 2-core AMD EPYC this is also 1.4-2.2x
    faster than filling rows level by level (29 -> 129 us for 2-256 entries).
    """
    n = tree.tokens.shape[0]
    parents = tree.parents.to(device).clamp(min=0)  # [n]; the root's -1 becomes itself, already marked
    rows = torch.arange(n, device=device)
    mask = torch.zeros(n, n, dtype=torch.bool, device=device)
    ancestor = rows
    for _ in range(int(tree.depths.max()) + 1):
        mask[rows, ancestor] = True
        ancestor = parents[ancestor]
    return mask


def tree_positions(tree: DraftTree, root_position: int) -> Tensor:
    """Absolute position of every entry: [n] int64, root_position + depth."""
    return tree.depths + root_position
