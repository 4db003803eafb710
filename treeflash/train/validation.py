"""Validation: the sequences a run holds out (`validation_count`, `split_validation`, `split_held_out`) and the
teacher-forced evaluation on them (`evaluate`). Every validation logs the per-position top-1 profile and the
anchor sensitivity: a drafter that does not read its anchor shows a flat profile and a sensitivity near 0.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ..drafters import Drafter
from ..errors import TreeFlashError
from ..targets import Target
from .blocks import OnlineFeatures, batch_hidden, make_example
from .config import TrainConfig
from .records import Sequence

DEFAULT_VAL_SEQUENCES = 32


def validation_count(sequences: int, asked: int | None) -> int:
    """Sequences to hold out for validation: as asked, else DEFAULT_VAL_SEQUENCES but at most a tenth of the
    data (at least one), so a small data set is not mostly spent on validation."""
    return asked if asked is not None else min(DEFAULT_VAL_SEQUENCES, max(1, sequences // 10))


def split_validation(sequences: list, count: int, seed: int = 0) -> tuple[list, list]:
    """Hold out `count` sequences (at most all but one) for validation: those whose ids hash lowest under
    `seed`. The choice depends on each sequence alone, so when the data grows a sequence that was trained on
    never moves into the validation set (new sequences may displace old validation ones into training)."""
    count = min(count, max(0, len(sequences) - 1))
    rank = sorted(range(len(sequences)),
                  key=lambda i: (hashlib.sha256(f"{seed}:{sequences[i].id}".encode()).digest(), i))
    held = set(rank[:count])
    return ([sequences[i] for i in sorted(held)],
            [s for i, s in enumerate(sequences) if i not in held])


def split_held_out(sequences: list, files: str, training: bool = True) -> tuple[list, list]:
    """Hold out exactly the records named by earlier runs' held_out.json files (comma-separated paths). Only a
    run that trains (`training`) needs records left over."""
    ids: set[str] = set()
    for name in files.split(","):
        path = Path(name)
        try:
            listed = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise TreeFlashError(f"cannot read the held-out ids in {path} ({e}); pass a run's held_out.json") from None
        if not isinstance(listed, list) or not all(isinstance(i, str) for i in listed):
            raise TreeFlashError(f"{path} is not a list of record ids; pass a run's held_out.json")
        ids.update(listed)
    found = {s.id for s in sequences} & ids
    if len(found) < len(ids):
        missing = sorted(ids - found)
        raise TreeFlashError(f"{len(missing)} of the {len(ids)} held-out records (e.g. {missing[0]}) are not in this "
                             "data; pass the data those runs were validated on")
    if training and len(found) == len(sequences):
        raise TreeFlashError("--held-out names every record of the data, which leaves nothing to train on; "
                             "pass more data, or --max-steps 0 to validate only")
    return [s for s in sequences if s.id in ids], [s for s in sequences if s.id not in ids]


@torch.no_grad()
def evaluate(drafter: Drafter, target: Target, sequences: list[Sequence], config: TrainConfig,
             source=None, reference: str = "target") -> dict:
    """Teacher-forced validation on held-out sequences.

    Per block position k (1..b-1): top-1 agreement with the target's greedy token given the true prefix, for
    the marginals and, with a head, the conditionals; the expected tau of a chain drafted from those argmaxes
    (1 + the number of leading agreements, averaged over blocks); and the **anchor sensitivity**: the mean
    KL between the position-1 marginal and the same marginal with the anchor token replaced by another token
    of the sequence. A drafter that ignores its anchor has a sensitivity near 0 and a flat profile.

    reference: "target" compares with the target's greedy token (what verification accepts); "labels" with
    the data's own next token (for data the target did not generate)."""
    if reference not in ("target", "labels"):
        raise ValueError(f"reference must be target or labels; got {reference!r}")
    source = source or OnlineFeatures(target, drafter.config.target_layer_ids)
    b = drafter.block_size
    generator = torch.Generator().manual_seed(12345)  # the same blocks at every validation
    swaps = torch.Generator().manual_seed(54321)  # and the same anchor replacements
    hits = {"marginal": torch.zeros(b - 1), "conditional": torch.zeros(b - 1)}
    counts = torch.zeros(b - 1)
    taus: dict[str, list] = {"marginal": [], "conditional": []}
    sensitivity = []
    names = ["marginal"] + (["conditional"] if drafter.ar_approximation is not None else [])
    for seq in sequences:
        e = make_example(seq, source, config, drafter, generator)
        if e is None:
            continue
        L = e.tokens.numel()
        swapped = dataclasses.replace(e, blocks=dataclasses.replace(e.blocks, tokens=e.blocks.tokens.clone()))
        first = torch.arange(0, e.blocks.tokens.numel(), b)
        shift = torch.randint(1, L, (first.numel(),), generator=swaps)
        replacement = e.tokens[(e.anchors + shift) % L]
        same = replacement == e.blocks.tokens[first]
        replacement[same] = e.tokens[(e.anchors[same] + 1) % L]
        swapped.blocks.tokens[first] = replacement
        hidden, hidden_swapped = batch_hidden(drafter, target, [e, swapped])
        if reference == "target":  # the target's greedy token at each position, given the true prefix
            greedy = F.linear(e.final[(e.blocks.positions - 1).clamp(max=L - 1)].to(target.lm_head.weight),
                              target.lm_head.weight).argmax(-1).cpu()
        else:
            greedy = e.blocks.labels
        valid = (e.blocks.labels >= 0).view(-1, b)[:, 1:]
        marginal = drafter.logits(target, hidden)
        drafts = {"marginal": drafter.token_ids(marginal.argmax(-1)).cpu()}
        if drafter.ar_approximation is not None:
            conditional = drafter.conditional_logits(target, hidden, e.blocks.parents.to(target.device))
            drafts["conditional"] = drafter.token_ids(conditional.argmax(-1)).cpu()
        p_log = torch.log_softmax(marginal[first + 1].float(), -1)
        q_log = torch.log_softmax(drafter.logits(target, hidden_swapped[first + 1]).float(), -1)
        sensitivity += (p_log.exp() * (p_log - q_log)).sum(-1)[valid[:, 0].to(p_log.device)].tolist()
        for name, tokens_drafted in drafts.items():
            agree = (tokens_drafted == greedy).view(-1, b)[:, 1:] & valid
            hits[name] += agree.float().sum(0)
            taus[name] += (1 + agree.int().cumprod(dim=1).sum(dim=1)).tolist()
        counts += valid.float().sum(0)
    result = {"anchor_sensitivity": sum(sensitivity) / max(1, len(sensitivity))}
    for name in names:
        result[f"{name}_top1"] = (hits[name] / counts.clamp(min=1)).tolist()
        result[f"{name}_chain_tau"] = sum(taus[name]) / max(1, len(taus[name]))
    return result


def profile(top1: list[float]) -> str:
    """A per-position top-1 profile for a log line: '.47 .32 .22 ...'."""
    return " ".join(f"{x:.2f}".lstrip("0") for x in top1)
