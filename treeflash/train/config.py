"""One training run's settings: `TrainConfig`, whose fields map one-to-one onto the flags of `treeflash train
drafter|head` (their comments are the flags' help), and the default drafter shape."""

from __future__ import annotations

import dataclasses

from ..errors import TreeFlashError

# The default drafter shape for `treeflash train drafter` (chosen by measured tokens/s on a 2-core CPU; see
# training/README.md): depth, block size and how many target layers it reads.
DEFAULT_LAYERS = 1
DEFAULT_BLOCK_SIZE = 8
DEFAULT_TARGET_LAYERS = 5

STAGES = ("drafter", "head")
LOSSES = ("ce", "kl", "ce+kl")
LABELS = ("data", "target")
PRECISIONS = ("float32", "bfloat16")


@dataclasses.dataclass
class TrainConfig:
    """One training run. CLI flags of `treeflash train drafter|head` map one-to-one onto these fields."""

    stage: str = "drafter"  # "drafter" (the DFlash backbone) or "head" (the TreeFlash head)
    # a feature cache (`treeflash train features`), or several comma-separated: train on their sequences without
    # running the target (instead of --data)
    features: str | None = None
    epochs: float = 1.0  # passes over the training sequences (fractions allowed)
    # peak learning rate; None = by stage: 1e-3 for the drafter (the shipped recipe), 1e-4 for the head
    lr: float | None = None
    warmup: float = 0.04  # share of steps with linear warm-up, then cosine decay to 0
    weight_decay: float = 0.01  # AdamW's
    grad_clip: float = 1.0  # the largest gradient norm
    batch_size: int = 8  # sequences per optimizer step, in one padded drafter pass
    anchors: int = 32  # anchors (blocks) per sequence (DFlash: 512 on GPUs)
    max_length: int = 1024  # tokens per sequence, longer ones are cut
    # use only the first N sequences, so that a run resumes on the same data while more is made
    max_sequences: int | None = None
    gamma: float | None = None  # position-weight decay; None = by block size (7 for b = 16)
    # ce (true tokens), kl (to the target's distribution) or ce+kl (their mean); None = ce for the drafter, kl
    # for the head
    loss: str | None = None
    finetune_backbone: bool = False  # head stage: also train the drafter's backbone (its marginals keep their CE loss)
    # what cross-entropy aims at: data, each sequence's own next token (regenerated data: the target's); target,
    # the target's greedy token there (read from its logits), for text the target did not write (`treeflash
    # train data --responses dataset`)
    labels: str = "data"
    # train fc behind a fixed per-feature scale that evens out the target's massive activations (see
    # feature_scale), not on the raw features; saved checkpoints are the same format either way
    balance_features: bool = True
    # sequences held out from the data for validation; None = 32, but at most a tenth of the data
    val_sequences: int | None = None
    # validate on the records earlier runs held out (their held_out.json files, comma-separated) instead of
    # --val-sequences drawn from this data: they are never trained on
    held_out: str | None = None
    eval_every: int = 200  # steps between validations
    save_every: int = 200  # steps between checkpoints
    seed: int = 0  # data order, anchors, validation split
    # float32, or bfloat16: a bf16 target and autocast drafter matmuls (fp32 master weights), ~3x faster on CPUs
    # with AMX
    precision: str = "float32"
    # minutes of training: the schedule spans this time instead of --epochs (runs of equal time compare recipes
    # fairly; a resumed run continues the clock, but is not bit-exact)
    time_budget: float | None = None

    def __post_init__(self):
        if self.stage not in STAGES:
            raise TreeFlashError(f"unknown training stage {self.stage!r}; choose drafter or head")
        if self.loss is None:
            self.loss = "ce" if self.stage == "drafter" else "kl"
        if self.lr is None:
            self.lr = 1e-3 if self.stage == "drafter" else 1e-4
        if self.loss not in LOSSES:
            raise TreeFlashError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.labels not in LABELS:
            raise TreeFlashError(f"unknown labels {self.labels!r}; choose one of {', '.join(LABELS)}")
        if self.time_budget is not None and not self.time_budget > 0:
            raise TreeFlashError(f"time budget must be > 0 minutes; got {self.time_budget}")
        for name in ("epochs", "lr"):
            if not getattr(self, name) > 0:
                raise TreeFlashError(f"{name} must be > 0; got {getattr(self, name)}")
        for name in ("batch_size", "anchors", "eval_every", "save_every"):
            if getattr(self, name) < 1:
                raise TreeFlashError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise TreeFlashError(f"precision must be float32 or bfloat16; got {self.precision!r}")
        if not 0 <= self.warmup < 1:
            raise TreeFlashError(f"warmup is a share of the steps in [0, 1); got {self.warmup}")
