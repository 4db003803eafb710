"""A preallocated key/value cache for one sequence, shared by the target and the drafter.

Slots `[0, length)` hold committed positions. A forward pass writes its new keys and values after them
(`write`), attends over everything up to its own last slot, and the caller then either keeps the new
slots (`length` moves on), keeps a subset of them (`compact`, for the accepted path of a tree), or drops
them (`crop`). Nothing is ever reallocated, so the cost of a round does not depend on how long the
context has grown, beyond the attention itself.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import TreeFlashError


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        self.capacity = capacity
        self.length = 0
        # [layers, kv_heads, capacity, head_dim]; batch size 1 is implied.
        self.keys = torch.zeros(num_layers, num_kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)

    def write(self, layer: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Store new keys/values [kv_heads, n, head_dim] after the committed slots.

        Returns the keys and values of all slots up to and including the new ones,
        each [kv_heads, length + n, head_dim] (views, no copy).
        """
        n = keys.shape[1]
        end = self.length + n
        if end > self.capacity:
            raise TreeFlashError(
                f"the sequence needs {end} cache slots but only {self.capacity} were reserved; "
                "lower max_new_tokens or the tree budget, or use a shorter prompt"
            )
        self.keys[layer, :, self.length:end] = keys
        self.values[layer, :, self.length:end] = values
        return self.keys[layer, :, :end], self.values[layer, :, :end]

    def advance(self, n: int) -> None:
        """Commit the `n` slots written by the last forward pass."""
        self.length += n

    def compact(self, keep: Tensor) -> None:
        """Commit only the slots `keep` [a] (offsets into the last forward's slots, increasing).

        Their keys and values move to the first `a` new slots, so committed positions stay
        contiguous; the rest of that forward's slots are dropped.
        """
        start = self.length
        slots = keep.to(self.keys.device) + start
        a = slots.shape[0]
        # Advanced indexing gathers into a fresh tensor first, so overlapping source and
        # destination ranges are safe.
        self.keys[:, :, start:start + a] = self.keys[:, :, slots]
        self.values[:, :, start:start + a] = self.values[:, :, slots]
        self.length = start + a

    def crop(self, length: int) -> None:
        """Forget every slot from `length` on."""
        assert 0 <= length <= self.length
        self.length = length
