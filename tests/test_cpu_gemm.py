"""MKL's packed-weight GEMM for batched CPU decode (core/models/cpu_gemm.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmconsole.core.models import cpu_gemm
from llmconsole.core.models.llama import Linear

pytestmark = pytest.mark.skipif(not cpu_gemm.available(), reason="torch built without MKL's ops")


def _linear(n_in: int, n_out: int, bias: bool) -> Linear:
    layer = Linear(n_in, n_out, torch.float32, bias=bias)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n_out, n_in, generator=gen) * 0.05)
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(n_out, generator=gen))
    return layer


@pytest.mark.parametrize("rows", [2, 7, 32, 96])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_rows_match_f_linear(rows: int, bias: bool) -> None:
    layer = _linear(96, 200, bias)
    assert layer.packed is not None and layer.packed.applies(rows)
    x = torch.randn(rows, 96)
    got = layer.forward(x)
    want = F.linear(x.double(), layer.weight.double(), None if not bias else layer.bias.double())
    assert layer.packed._packed is not None  # the packed path really ran
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)


def test_one_row_and_prefill_sizes_keep_f_linear() -> None:
    layer = _linear(64, 48, False)
    assert layer.packed is not None
    for rows in (1, 97, 512):
        assert not layer.packed.applies(rows)
        x = torch.randn(rows, 64)
        assert torch.equal(layer.forward(x), F.linear(x, layer.weight))
    assert layer.packed._packed is None  # never packed: no second copy of the weight


def test_half_precision_gpu_style_weights_are_not_packed() -> None:
    assert Linear(16, 16, torch.bfloat16).packed is None


def test_env_switch_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMCONSOLE_CPU_PACKED_GEMM", "0")
    assert Linear(16, 16, torch.float32).packed is None


def test_a_layout_that_disagrees_with_f_linear_is_never_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A build whose packed layout is not what the check expects (here: another matrix's
    pack) must fall back to F.linear for good, never return wrong products."""
    layer = _linear(64, 48, False)
    other = torch.randn(48, 64)
    real = cpu_gemm._reorder
    monkeypatch.setattr(cpu_gemm, "_reorder", lambda weight: real(other))
    x = torch.randn(8, 64)
    assert torch.equal(layer.forward(x), F.linear(x, layer.weight))
    assert layer.packed is not None and not layer.packed.applies(8)
    assert torch.equal(layer.forward(x), F.linear(x, layer.weight))
