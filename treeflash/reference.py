"""The speculative decode loop on one screen: one sequence, unbatched, untimed.

Glossary (the same as `treeflash.verification` and `treeflash.trees`):
  round     one target verification pass after the prefill.
  root      the last committed token (the previous round's bonus): the target has not run on it yet, so it is
            entry 0 of every tree and is verified with the drafted nodes.
  accepted  drafted tokens the target agrees with, along one root-to-node path of the tree.
  bonus     the target's own token after the last accepted node; always committed, it is the next root.
  tau       mean tokens committed per round = 1 + mean acceptance length (so `ar` has tau = 1).

`treeflash.decoding.Decoder` runs this algorithm for many sequences at once, timed and with a lazy TreeFlash
head; this loop exists to be read, and tests/test_reference.py checks that both commit the same tokens in the
same rounds. Unlike `Decoder` it does not cut trees at the target's context limit.
"""

from __future__ import annotations

import torch

from .drafters import BlockDraft, Drafter
from .ngrams import NgramIndex
from .targets import Target
from .trees import (DraftTree, chain_tree, conditional_tree, graft_chain, marginal_tree, top_k_logprobs,
                    tree_attention_mask)
from .verification import SamplingConfig, choose_tokens, follow


@torch.inference_mode()
def reference_generate(target: Target, drafter: Drafter | None, prompt_ids: list[int], method: str = "treeflash",
                       budget: int = 4, max_new_tokens: int = 64, temperature: float = 0.0, seed: int | None = None,
                       draft_top_k: int = 16, candidate_tokens: int | None = None,
                       lookup: int = 0) -> tuple[list[int], list[int]]:
    """Decode `prompt_ids` with `method` (ar, dflash, ddtree or treeflash) and `budget` draft nodes per round,
    grafting up to `lookup` n-gram lookup tokens onto each tree (`treeflash.ngrams`, matching suffixes of 2 to 4
    tokens, as DecodeConfig's default); stops at an EOS token.
    Returns the new tokens and the acceptance length of every round (the bonus not counted)."""
    sampling, device, n = SamplingConfig(temperature=temperature, seed=seed), target.device, len(prompt_ids)
    eos = set(target.eos_token_ids)
    target.pack()  # the weights' layout `Decoder` decodes with
    cache = target.new_cache(n + max_new_tokens + budget + lookup + 1)  # room for a whole tree after the text
    layers = () if method == "ar" else drafter.config.target_layer_ids
    dcache = None if method == "ar" else drafter.new_cache(n + max_new_tokens + drafter.block_size)
    # Prefill: the prompt's keys/values and features, and the first token, which is the first round's root.
    out = target.forward(torch.tensor(prompt_ids, device=device), torch.arange(n, device=device), cache,
                         feature_layers=layers, logits_rows=slice(n - 1, n))
    cache.advance(n)
    features, tokens, acceptance = out.features, [int(choose_tokens(out.logits, torch.tensor([n]), sampling)[0])], []
    while len(tokens) < max_new_tokens and eos.isdisjoint(tokens):
        root, root_position = tokens[-1], cache.length
        tree = DraftTree(torch.tensor([root]), torch.tensor([-1]), torch.tensor([0]), torch.zeros(1))
        if method != "ar":  # draft: one drafter pass over [root, MASK...] gives b-1 marginals
            block = drafter.draft(target, root, features, dcache)
            tree = draft_tree(target, drafter, method, root, block, budget, draft_top_k, candidate_tokens)
        if lookup:
            tree = graft_chain(tree, NgramIndex(prompt_ids + tokens).continuation(lookup))
        # Verify: every entry at root_position + depth, attending to the context and its own ancestors.
        positions, mask = (root_position + tree.depths).to(device), None
        if tree.size:
            mask = torch.ones(tree.size + 1, root_position + tree.size + 1, dtype=torch.bool, device=device)
            mask[:, root_position:] = tree_attention_mask(tree, device)
        out = target.forward(tree.tokens.to(device), positions, cache, mask, feature_layers=layers)
        # Accept: walk from the root along the children holding the target's own choices.
        accepted = follow(tree, choose_tokens(out.logits, positions + 1, sampling).cpu())
        # Commit: keep the path's keys/values and features; its tokens and the bonus join the output.
        keep = torch.tensor(accepted.path, device=device)
        cache.compact(keep)
        features = out.features[keep] if layers else None
        acceptance.append(len(accepted.tokens))
        tokens += accepted.committed
    end = next((i + 1 for i, token in enumerate(tokens) if token in eos), len(tokens))  # the last round may
    return tokens[: min(end, max_new_tokens)], acceptance  # pass an EOS token or max_new_tokens: cut there


def draft_tree(target: Target, drafter: Drafter, method: str, root: int, block: BlockDraft, budget: int,
               draft_top_k: int = 16, candidate_tokens: int | None = None) -> DraftTree:
    """The tree of `budget` nodes `method` drafts after `root` from one drafted block (marginals [D, V])."""
    if method == "dflash":  # a chain of each marginal's argmax
        tokens, logprobs = top_k_logprobs(block.logits, 1)  # [D, 1]
        return chain_tree(root, drafter.token_ids(tokens[:, 0]).cpu(), logprobs[:, 0].cpu(), budget)
    if method == "ddtree":  # the most probable prefixes under the product of marginals
        tokens, logprobs = top_k_logprobs(block.logits, min(budget, block.logits.shape[1]))  # [D, K]
        return marginal_tree(root, drafter.token_ids(tokens).cpu(), logprobs.cpu(), budget)
    # TreeFlash: the head's conditionals for the root and for each depth's top-m marginal tokens, in one pass.
    m = min(candidate_tokens or drafter.config.candidate_tokens, block.logits.shape[1])
    parents = drafter.token_ids(block.logits[:-1].topk(m, dim=-1).indices)  # [D-1, m] candidate parents
    hidden = torch.cat((block.hidden[:1], block.hidden[1:].repeat_interleave(m, dim=0)))  # [1 + (D-1)*m, H]
    rows = torch.cat((torch.tensor([root], device=parents.device), parents.flatten()))  # each row's parent token
    k = min(draft_top_k, block.logits.shape[1])
    tokens, logprobs = top_k_logprobs(drafter.conditional_logits(target, hidden, rows), k)  # [R, k]
    return conditional_tree(root, parents.cpu(), drafter.token_ids(tokens).cpu(), logprobs.cpu(), budget)
