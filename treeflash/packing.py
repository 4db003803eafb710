"""Linear maps with their weights laid out once for the CPU's matrix-multiply library.

`F.linear` hands its weight to MKL (float32) or oneDNN (bfloat16) as a plain row-major matrix, and the
library re-blocks it into its kernel's layout on every call. For the few-row products of decoding (1 row for
`ar`, 16-65 for a verified tree, 16 for a drafter block) that re-blocking is a large share of the cost. Packing
each weight once (MKL's packed sgemm; oneDNN's blocked layout) removes it (docs/experiments.md has the
before/after on the default model). Projections that read the same input are also concatenated (q, k, v;
gate, up), so that the input is read by one GEMM instead of two or three.

Which library packs float32 depends on the processor (`float32_backend`). MKL on Intel, where its packed
sgemm was measured fastest. oneDNN elsewhere: on a 2-core AMD EPYC (AVX2) MKL's kernels are 1.3-4.6x slower than
oneDNN's for these shapes (LM head, 5 rows: 17.6 ms with `F.linear`, 4.6 ms packed by oneDNN;
results/speed/packed_gemm_cpu_amd.md), and with oneDNN the same bench took treeflash@4 from 0.89x to 1.13x
`ar` (docs/speed.md). $TREEFLASH_CPU_GEMM ("mkl",
"onednn" or "plain") overrides the choice, e.g. to compare them; the choice is made once per weight, when it is
packed, so plain decoding and verification always share it.

Packed copies live beside the model's own weights (they are used only for inference; training and the
transformers baselines keep using the model's modules), so packing costs as much memory again as the
packed weights. It is done on the CPU only; elsewhere `FusedLinear` calls `F.linear` per weight.

Numerics: a packed GEMM sums in another order than `F.linear`, so results may differ from the model's own
modules in the last bits, like any change of BLAS. Losslessness does not depend on it: plain decoding and
tree verification run through the same packed maps.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import TreeFlashError
from .machine import cpu_vendor

# The batch size MKL and oneDNN are told to lay a weight out for. It is only a hint: any number of rows works.
PACK_ROWS_HINT = 64
# Up to this many rows MKL's plain kernel (a matrix-vector product) is as fast or faster than its packed GEMM
# (scripts/packed_gemm.py on an Intel Xeon: 0.95x packed at 1-2 rows, 1.24x at 4), so those products skip the
# packing. Not so for oneDNN's float32 kernels on an AMD EPYC, faster at every row count (the LM head at one
# row: 7.4 ms through F.linear, 3.5 ms packed), which run every product packed.
PLAIN_MAX_ROWS = 2


_MKL_LINEAR = getattr(torch.ops.mkl, "_mkl_linear", None) if torch._C.has_mkl else None
_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
_FLOAT32_BACKENDS = ("mkl", "onednn", "plain")


def float32_backend() -> str | None:
    """The library that packs float32 weights here: $TREEFLASH_CPU_GEMM if set, else "mkl" on an Intel CPU and
    "onednn" on any other (see the module docstring); None where this build of torch has neither."""
    choice = os.environ.get("TREEFLASH_CPU_GEMM")
    if choice is not None and choice not in _FLOAT32_BACKENDS:
        raise TreeFlashError(f"TREEFLASH_CPU_GEMM must be one of {', '.join(_FLOAT32_BACKENDS)}; got {choice!r}")
    if choice is None:
        choice = "mkl" if cpu_vendor() == "GenuineIntel" and _MKL_LINEAR is not None else "onednn"
    available = {"mkl": _MKL_LINEAR is not None, "onednn": _ONEDNN_LINEAR is not None, "plain": False}
    return choice if available[choice] else None


def packing_backend(weight: Tensor) -> str | None:
    """"mkl" or "onednn" (float32, see `float32_backend`) or "onednn" (bfloat16) where this build of torch can
    pack `weight`, else None."""
    if weight.device.type != "cpu":
        return None
    if weight.dtype == torch.float32:
        return float32_backend()
    if weight.dtype == torch.bfloat16 and _ONEDNN_LINEAR is not None and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "onednn"
    return None


class FusedLinear:
    """x [..., in] -> (x @ W_1^T + b_1, x @ W_2^T + b_2, ...) for fixed weights W_i [out_i, in].

    With `pack` (and a backend that can), the weights are concatenated and packed into one GEMM, and the
    outputs are column slices of its result: a snapshot, for inference only. Otherwise each output is its own
    `F.linear` on the original weights (no copy; gradients flow to them). `__call__` returns the one output
    of a single-weight map, `split` the tuple.
    """

    def __init__(self, weights: Sequence[Tensor], biases: Sequence[Tensor | None] | None = None, pack: bool = True):
        biases = list(biases or [None] * len(weights))
        if len({w.shape[1] for w in weights}) != 1:
            raise ValueError("fused weights must share their input size")
        self.sizes = [w.shape[0] for w in weights]
        self.backend = packing_backend(weights[0]) if pack else None
        self._parts = list(zip(weights, biases))
        if self.backend is None:
            return
        weights = [w.detach() for w in weights]
        biases = [None if b is None else b.detach() for b in biases]
        weight = torch.cat(weights) if len(weights) > 1 else weights[0]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) if b is None else b
                              for w, b in zip(weights, biases)])
        try:
            if self.backend == "mkl":
                packed = torch.ops.mkl._mkl_reorder_linear_weight(weight.contiguous(), PACK_ROWS_HINT)
            else:
                packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_ROWS_HINT)
        except RuntimeError:  # a build whose kernels refuse this shape: stay with F.linear
            self.backend = None
            return
        # -1: no product takes the plain path (oneDNN float32 packed is faster at every row count, and takes 0 rows)
        self._plain_max_rows = -1 if self.backend == "onednn" and weight.dtype == torch.float32 else PLAIN_MAX_ROWS
        # MKL reads the original weight too (its signature asks for it), and so do the plain few-row products;
        # oneDNN float32 needs only the packed one, so the (for fused maps, concatenated) copy is not kept.
        keep = self.backend == "mkl" or self._plain_max_rows >= 0
        self._weight, self._packed, self._bias = weight.contiguous() if keep else None, packed, bias
        self._parts = []

    def split(self, x: Tensor) -> tuple[Tensor, ...]:
        if self.backend is None:
            return tuple(F.linear(x, w, b) for w, b in self._parts)
        y = self._full(x)
        return y.split(self.sizes, dim=-1) if len(self.sizes) > 1 else (y,)

    def __call__(self, x: Tensor) -> Tensor:
        if len(self.sizes) != 1:
            raise TypeError("this map has several outputs; call split()")
        if self.backend is None:
            weight, bias = self._parts[0]
            return F.linear(x, weight, bias)
        return self._full(x)

    def _full(self, x: Tensor) -> Tensor:
        # Called ~120 times per target pass: kept free of Python work beyond the dispatch (measured: a few
        # microseconds per call add up to 5% of a one-token pass).
        if x.dim() != 2:
            return self._full(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)
        rows = x.shape[0]
        if rows <= self._plain_max_rows:
            return F.linear(x, self._weight, self._bias)
        if self.backend == "mkl":
            return _MKL_LINEAR(x, self._packed, self._weight, self._bias, rows)
        return _ONEDNN_LINEAR(x, self._packed, self._bias, "none", [], "")


def linear_map(module: torch.nn.Linear, pack: bool = True) -> FusedLinear:
    """A `FusedLinear` of one `nn.Linear`."""
    return FusedLinear([module.weight], [module.bias], pack=pack)


def fused_map(modules: Sequence[torch.nn.Linear], pack: bool = True) -> FusedLinear:
    """A `FusedLinear` of several `nn.Linear`s that read the same input."""
    return FusedLinear([m.weight for m in modules], [m.bias for m in modules], pack=pack)
