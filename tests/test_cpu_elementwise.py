"""The CPU element-wise kernels (`kernels/cpu_elementwise.c`): residual add + RMSNorm and
SiLU(gate) * up against torch, and the engine's greedy tokens with and without them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmconsole.core import Engine, EngineConfig, SamplingParams
from llmconsole.core.cpu_kernels import library
from llmconsole.kernels import cpu_blocks, cpu_elementwise

LIB = library()
pytestmark = pytest.mark.skipif(
    LIB is None, reason=f"no C kernels: {cpu_blocks.unavailable_reason()}"
)


@pytest.mark.parametrize(("rows", "width"), [(1, 576), (32, 576), (300, 100), (3, 17)])
def test_add_rms_norm_matches_torch(rows: int, width: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    x, r = torch.randn(rows, width, generator=gen), torch.randn(rows, width, generator=gen)
    w = torch.randn(width, generator=gen)
    want_sum = x + r
    want = F.rms_norm(want_sum, (width,), w, 1e-5)
    normed, summed = cpu_elementwise.add_rms_norm(LIB, x, r, w, 1e-5)
    assert torch.equal(summed, want_sum)  # one fp32 add: exact
    torch.testing.assert_close(normed, want, rtol=1e-6, atol=1e-6)  # rrms within an ulp or two
    plain, none = cpu_elementwise.add_rms_norm(LIB, x, None, w, 1e-5)
    assert none is None
    torch.testing.assert_close(plain, F.rms_norm(x, (width,), w, 1e-5), rtol=1e-6, atol=1e-6)
    # In place, as the model calls it: x becomes the norm, r the sum.
    out, res = cpu_elementwise.add_rms_norm(LIB, x, r, w, 1e-5, inplace=True)
    assert out is x and res is r
    assert torch.equal(r, want_sum) and torch.equal(x, normed)


def test_silu_mul_matches_torch_over_a_wide_range() -> None:
    gen = torch.Generator().manual_seed(0)
    gate_up = torch.randn(7, 2 * 1537, generator=gen) * 20  # odd width: the scalar tail too
    gate_up[0, :4] = torch.tensor([0.0, -100.0, 100.0, -88.5])
    gate, up = gate_up.chunk(2, dim=-1)
    want = F.silu(gate) * up
    got = cpu_elementwise.silu_mul(LIB, gate_up)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-30)
    assert got.shape == (7, 1537) and torch.isfinite(got).all()


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="contiguous fp32"):
        cpu_elementwise.silu_mul(LIB, torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[T, 2I\]"):
        cpu_elementwise.silu_mul(LIB, torch.randn(2, 7))
    with pytest.raises(ValueError, match="differ"):
        cpu_elementwise.add_rms_norm(LIB, torch.randn(2, 8), torch.randn(2, 8), torch.ones(4), 1e-5)


def test_engine_tokens_are_the_same_without_them(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = [
        engine.apply_chat_template([{"role": "user", "content": q}])
        for q in ("Name a fruit.", "What is rain?", "Say hello.", "Count to five.")
    ]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    got = [r.token_ids for r in engine.generate(prompts, params)]
    monkeypatch.setenv("LLMCONSOLE_CPU_FUSED_OPS", "0")
    with Engine(EngineConfig()) as off:
        assert [r.token_ids for r in off.generate(prompts, params)] == got
