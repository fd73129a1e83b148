"""fp32 projections on CPU through MKL's packed-weight GEMM.

MKL can reorder a weight matrix once into the blocked layout its sgemm kernels stream
(`cblas_sgemm_pack`); torch exposes that as the two ops its inductor uses when it freezes a CPU
graph. For the few-row products of batched decode the packed GEMM is much faster than
`F.linear`: all projections of the default model, 2-core Sapphire Rapids box, 8 rows 46.9 vs
30.1 ms, 32 rows 71.5 vs 51.9 ms. At one row (a memory-bound matrix-vector product) and at
prefill sizes (over ~100 rows) it gains nothing, so those keep `F.linear`.

The packed copy costs as much memory as the weight, so it is made lazily, by the first product
that would use it, and only for fp32 weights on the CPU. `LLMCONSOLE_CPU_PACKED_GEMM=0` turns it
off (A/B runs, or a torch built without MKL's ops).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

# Rows (tokens in the step) that take the packed GEMM: measured faster from 2 to ~96.
PACKED_ROWS = range(2, 97)
_ENV = "LLMCONSOLE_CPU_PACKED_GEMM"
# MKL's packed B layout does not depend on the row count in practice; the pack call still
# asks for one, and `PackedWeight` checks the result at both ends of PACKED_ROWS.
_PACK_ROWS_HINT = 32


def available() -> bool:
    if os.environ.get(_ENV, "1") == "0" or not torch.backends.mkl.is_available():
        return False
    try:
        torch.ops.mkl._mkl_linear  # noqa: B018 - absent from builds without MKL's ops
        torch.ops.mkl._mkl_reorder_linear_weight  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


class PackedWeight:
    """y = x W^T (+ b) from MKL's packed copy of W, made on first use. Contract: W (and b) are
    filled before the first call and never reassigned afterwards (weights are loaded once; in
    place is fine until then)."""

    __slots__ = ("weight", "bias", "_packed", "_ok")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight = weight  # [out, in] fp32, CPU
        self.bias = bias  # [out] or None
        self._packed: torch.Tensor | None = None
        self._ok = True

    def applies(self, rows: int) -> bool:
        return self._ok and rows in PACKED_ROWS

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, in] -> [T, out]
        packed = self._packed
        if packed is None:
            packed = self._pack()
            if packed is None:
                return F.linear(x, self.weight, self.bias)
        return torch.ops.mkl._mkl_linear(x, packed, self.weight, self.bias, x.shape[0])

    def _pack(self) -> torch.Tensor | None:
        packed = _reorder(self.weight)
        # Trust the layout only once it reproduces F.linear at both ends of the row range; a
        # build where the layout depends on the row count keeps F.linear for this weight.
        gen = torch.Generator().manual_seed(0)
        for rows in (PACKED_ROWS.start, PACKED_ROWS.stop - 1):
            x = torch.randn(rows, self.weight.shape[1], generator=gen)
            want = F.linear(x, self.weight, self.bias)
            got = torch.ops.mkl._mkl_linear(x, packed, self.weight, self.bias, rows)
            scale = float(want.abs().max()) + 1e-6
            if not torch.allclose(got, want, rtol=1e-4, atol=1e-4 * scale):
                self._ok = False
                return None
        self._packed = packed
        return packed


def _reorder(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkl._mkl_reorder_linear_weight(weight, _PACK_ROWS_HINT)


def for_weight(weight: torch.Tensor, bias: torch.Tensor | None) -> PackedWeight | None:
    """A PackedWeight for an fp32 CPU weight where MKL's ops exist, else None (F.linear)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.dim() != 2:
        return None
    if bias is not None and bias.dtype != torch.float32:
        return None
    return PackedWeight(weight, bias) if available() else None
