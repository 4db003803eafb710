"""Training on several processes with torch.distributed.

    torchrun --nproc_per_node 8 -m treeflash.cli train drafter --features CACHE --out RUN ...

`treeflash train drafter|head` notices torchrun's environment (WORLD_SIZE > 1) and runs data-parallel with
DistributedDataParallel: gloo on a CPU, NCCL on CUDA (each rank on `cuda:LOCAL_RANK`). `--batch-size` stays
the *global* batch: rank r takes sequences r, r + N, ... of every step's batch, so N ranks take the steps
that one process would with the same flags (the same weights up to float rounding; a test checks it), and
each rank reads only its own share of the data or the feature cache. Rank 0 logs, validates, checkpoints and
exports; every rank resumes from the same `--out`, which must be on a filesystem they share.

When a rank fails, the others do not hang: a collective with a dead peer raises at once (gloo) or after
`timeout()` (a rank that is stuck), and they stop with an error that says so. Without torchrun nothing here is
used and training is one process, as before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os

import torch

from ..errors import TreeFlashError

# The longest a collective waits for a peer (rank 0 validates while the others wait); $TREEFLASH_DIST_TIMEOUT
# (seconds) overrides it.
TIMEOUT = datetime.timedelta(minutes=10)


def timeout() -> datetime.timedelta:
    value = os.environ.get("TREEFLASH_DIST_TIMEOUT")
    if value is None:
        return TIMEOUT
    try:
        return datetime.timedelta(seconds=float(value))
    except ValueError:
        raise TreeFlashError(f"TREEFLASH_DIST_TIMEOUT must be a number of seconds; got {value!r}") from None


@dataclasses.dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that logs, validates and writes."""
        return self.rank == 0


def from_environment() -> Ranks:
    """The ranks torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK), or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    return Ranks(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def device_for(ranks: Ranks, device: str | None) -> str | None:
    """The device a rank trains on: its own GPU (`cuda:LOCAL_RANK`) when the run is on CUDA."""
    if ranks.distributed and device is not None and device.startswith("cuda"):
        return f"cuda:{ranks.local_rank}"
    return device


def start(ranks: Ranks, device: torch.device) -> None:
    """Join the process group (once per process; nothing to do for a single process)."""
    if not ranks.distributed or torch.distributed.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend, timeout=timeout())


def stop(ranks: Ranks) -> None:
    if ranks.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def share(items: list, ranks: Ranks) -> list:
    """This rank's share of one step's global batch: items rank, rank + N, ..."""
    return items[ranks.rank::ranks.world]


def all_sum(value: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """The sum over ranks of a (small) tensor; the tensor itself for a single process."""
    if not ranks.distributed:
        return value
    value = value.clone()
    torch.distributed.all_reduce(value)
    return value


def from_main(value: float, ranks: Ranks, device: torch.device) -> float:
    """Rank 0's value of a float, on every rank (so that all ranks take the same decisions, e.g. on a clock)."""
    if not ranks.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.broadcast(t, 0)
    return float(t)


class LostPeer(TreeFlashError):
    """A collective failed: another rank died or stopped answering. The process cannot be torn down cleanly
    after it: freeing DDP and the process group waits on the dead peer's collectives, up to `timeout()`, so
    the CLI leaves at once after printing it (seen in CI: a rank that had printed this error was still alive
    300 s later)."""


def lost_peer(ranks: Ranks, step: int, error: BaseException) -> LostPeer:
    """The error a rank raises when a collective failed: another rank died, or stopped answering."""
    return LostPeer(
        f"rank {ranks.rank} of {ranks.world} lost contact with the other ranks at step {step} ({type(error).__name__}: "
        f"{str(error).splitlines()[0] if str(error) else 'no details'}); another rank failed or stopped: see the first "
        "rank's error above, fix it and rerun the same command, which resumes from the last checkpoint"
    )


@contextlib.contextmanager
def peers(ranks: Ranks, step: int):
    """Around anything that waits on the other ranks (collectives, DDP's backward): a failure there means a
    peer died or stopped answering, and becomes `lost_peer`'s error instead of a backend traceback."""
    try:
        yield
    except RuntimeError as e:
        if not ranks.distributed:
            raise
        raise lost_peer(ranks, step, e) from e


def check_batch(batch_size: int, ranks: Ranks) -> None:
    if batch_size < ranks.world:
        raise TreeFlashError(f"a global batch of {batch_size} sequences cannot be shared by {ranks.world} ranks; "
                             f"raise --batch-size to at least {ranks.world} or use fewer processes")
