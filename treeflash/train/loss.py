"""The loss on the blocks' outputs (`treeflash.train.blocks`), by training stage:

  drafter  trains the DFlash backbone (layers, fc, norms) with cross-entropy on the true tokens, position k
           weighted exp(-(k-1)/gamma) (gamma = 7 for b = 16, 5 for b = 10, 4 for b = 8).
  head     trains the TreeFlash head on top: teacher-forced on the true previous token, forward KL to the
           target's distribution at that position (or cross-entropy), same position weights; the backbone is
           frozen unless `finetune_backbone`, and then keeps the drafter stage's cross-entropy on its marginals.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..drafters import Drafter
from ..targets import Target
from .blocks import Example, batch_hidden
from .config import TrainConfig

def default_gamma(block_size: int) -> float:
    """DFlash's loss decay per block size (7 for 16, 5 for 10, 4 for 8; proportional in between)."""
    return {16: 7.0, 10: 5.0, 8: 4.0}.get(block_size, 7.0 * block_size / 16)


def position_weights(block_size: int, gamma: float) -> Tensor:
    """[b] weights of block positions: 0 for the anchor, exp(-(k-1)/gamma) for k >= 1."""
    k = torch.arange(block_size, dtype=torch.float32)
    w = torch.exp(-(k - 1) / gamma)
    w[0] = 0.0
    return w


def target_logits(drafter: Drafter, target: Target, final: Tensor) -> Tensor:
    """The target's logits [R, Vd] over the drafter's (draft) vocabulary from its final normed states [R, H]."""
    rows, _ = drafter._head(target, torch.float32)
    return F.linear(final.to(rows.device, rows.dtype), rows)


def labelled_rows(example: Example, draft_index: Tensor) -> tuple[Tensor, Tensor]:
    """Block entries that carry a loss: (row indices [R], their labels as drafter-logit columns [R]).
    draft_index [V] (`Drafter.draft_index`, on the CPU): with a draft vocabulary, tokens outside it (-1) are not
    trained on."""
    columns = draft_index[example.blocks.labels.clamp(min=0)]
    rows = ((example.blocks.labels >= 0) & (columns >= 0)).nonzero().flatten()
    return rows, columns[rows]


def row_losses(logits: Tensor, labels: Tensor, reference: Tensor | None, loss: str) -> Tensor:
    """Per-row loss [R]: cross-entropy on the true token, forward KL(target || drafter) to the target's logits
    `reference` [R, Vd], or their mean ("ce+kl")."""
    parts = []
    if loss in ("ce", "ce+kl"):
        parts.append(F.cross_entropy(logits.float(), labels, reduction="none"))
    if loss in ("kl", "ce+kl"):
        p_log = torch.log_softmax(reference.float(), -1)
        parts.append((p_log.exp() * (p_log - torch.log_softmax(logits.float(), -1))).sum(-1))
    return sum(parts) / len(parts)


def batch_loss(drafter: Drafter, target: Target, examples: list[Example], config: TrainConfig,
               weights: Tensor) -> tuple[Tensor, int]:
    """Weighted loss of a batch's blocks (one drafter pass), and the number of labelled entries."""
    total, weight, rows = batch_loss_terms(drafter, target, examples, config, weights)
    return (total / weight if rows else total), rows


def batch_loss_terms(drafter: Drafter, target: Target, examples: list[Example], config: TrainConfig,
                     weights: Tensor) -> tuple[Tensor, Tensor, int]:
    """The batch loss before its normalisation: (sum of position-weighted row losses, sum of the weights,
    number of labelled rows). Split so that ranks sharing a batch can normalise by the global weight sum."""
    device = target.device
    if not examples:
        zero = sum(p.sum() for p in drafter.parameters() if p.requires_grad) * 0.0
        return zero, torch.zeros((), device=device), 0
    with torch.set_grad_enabled(config.stage == "drafter" or config.finetune_backbone):
        hidden = batch_hidden(drafter, target, examples)
    picked, labels, w, parents, finals = [], [], [], [], []
    draft_index = drafter.draft_index(target.vocab_size).cpu()
    for e, h in zip(examples, hidden):
        rows, columns = labelled_rows(e, draft_index)
        picked.append(h[rows.to(device)])
        labels.append(columns)
        w.append(weights[e.blocks.offsets[rows]])
        parents.append(e.blocks.parents[rows])
        if config.loss != "ce" or config.labels == "target":
            # the target's distribution at each row's position, from the token before it
            finals.append(e.final[e.blocks.positions[rows] - 1])
    hidden, labels, w = torch.cat(picked), torch.cat(labels).to(device), torch.cat(w).to(device)
    if hidden.shape[0] == 0:
        # Every trainable weight still gets a (zero) gradient: ranks that share a step must all reduce them.
        zero = sum(p.sum() for p in drafter.parameters() if p.requires_grad) * 0.0
        return zero, torch.zeros((), device=device), 0
    reference = target_logits(drafter, target, torch.cat(finals)) if finals else None
    if config.labels == "target":
        labels = reference.argmax(-1)  # the target's greedy token, in the draft vocabulary's columns
    if config.stage == "drafter":
        per_row = row_losses(drafter.logits(target, hidden), labels, reference, config.loss)
    else:
        logits = drafter.conditional_logits(target, hidden, torch.cat(parents).to(device))
        per_row = row_losses(logits, labels, reference, config.loss)
        if config.finetune_backbone:
            # The backbone also drafts DFlash chains and DDTree trees, and picks TreeFlash's candidate parents
            # from its marginals: without their own loss, the head's KL alone pulls them down (measured:
            # chain tau 1.60 -> 1.44 in 8 minutes). So they keep the drafter stage's cross-entropy.
            per_row = per_row + row_losses(drafter.logits(target, hidden), labels, None, "ce")
    return (per_row * w).sum(), w.sum().detach(), hidden.shape[0]


class BatchLoss(torch.nn.Module):
    """`batch_loss_terms` as a module over the drafter, so that DistributedDataParallel can wrap it: DDP
    reduces the gradients of the parameters a module's forward used."""

    def __init__(self, drafter: Drafter, target: Target, config: TrainConfig, weights: Tensor):
        super().__init__()
        self.drafter = drafter
        self._context = (target, config, weights)  # not modules: kept out of DDP's parameter walk

    def forward(self, examples: list[Example]) -> tuple[Tensor, Tensor, int]:
        target, config, weights = self._context
        return batch_loss_terms(self.drafter, target, examples, config, weights)
