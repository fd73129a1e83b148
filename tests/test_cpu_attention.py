"""The CPU decode attention kernel (`kernels/cpu_attention.c`): rope, the KV write and attention
over the paged pool in one call, against torch's rope and SDPA; and its use by the engine."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from engine_utils import wait_idle

from llmconsole.core import Engine, EngineConfig, SamplingParams
from llmconsole.core.attention.base import AttentionInputs
from llmconsole.core.attention.torch_backend import TorchAttention
from llmconsole.core.cpu_kernels import library
from llmconsole.core.kv_cache import KVPool, KVPoolSpec
from llmconsole.core.models.llama import apply_rope
from llmconsole.kernels import cpu_attention, cpu_blocks

LIB = library()
pytestmark = pytest.mark.skipif(
    LIB is None, reason=f"no C kernels: {cpu_blocks.unavailable_reason()}"
)


def rope_tables(positions: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    freqs = positions.float()[:, None] * inv[None]
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos(), emb.sin()
    sin[:, : dim // 2].neg_()  # RotaryEmbedding.cos_sin's convention
    return cos, sin


def case(bsz: int, heads: int, kv_heads: int, dim: int, lens: list[int], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    num_slots = 8192
    k_pool = torch.randn(num_slots, kv_heads, dim, generator=gen)
    v_pool = torch.randn(num_slots, kv_heads, dim, generator=gen)
    width = max(lens) + 3  # a slot table wider than any request, as the runner's is
    # Distinct slots per request (pages are never shared by two running requests' new tokens).
    slots = (torch.randperm(num_slots - 1, generator=gen)[: bsz * width] + 1).view(bsz, width)
    qkv = torch.randn(bsz, (heads + 2 * kv_heads) * dim, generator=gen)
    return qkv, k_pool, v_pool, slots, torch.tensor(lens)


def reference(qkv, cos, sin, k_pool, v_pool, slots, lens, heads, kv_heads, dim):
    """torch: rope, write the new K/V, then SDPA per request over its gathered keys."""
    bsz = qkv.shape[0]
    x = qkv.view(bsz, heads + 2 * kv_heads, dim)
    qk = (
        x[:, : heads + kv_heads]
        if cos is None
        else apply_rope(x[:, : heads + kv_heads], cos[:, None], sin[:, None])
    )
    q, k, v = qk[:, :heads], qk[:, heads:], x[:, heads + kv_heads :]
    k_pool, v_pool = k_pool.clone(), v_pool.clone()
    for b in range(bsz):
        k_pool[slots[b, lens[b] - 1]] = k[b]
        v_pool[slots[b, lens[b] - 1]] = v[b]
    out = []
    for b in range(bsz):
        n = int(lens[b])
        keys = k_pool[slots[b, :n]].transpose(0, 1)  # [Hkv, n, D]
        values = v_pool[slots[b, :n]].transpose(0, 1)
        grouped = q[b].reshape(kv_heads, heads // kv_heads, dim)
        out.append(F.scaled_dot_product_attention(grouped, keys, values, scale=dim**-0.5))
    return torch.stack(out).reshape(bsz, heads, dim), q, k, k_pool, v_pool


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim"), [(9, 3, 64), (4, 4, 16), (8, 2, 128), (6, 1, 32)]
)
@pytest.mark.parametrize("lens", [[1], [31, 32, 33], [5, 100, 64, 2, 77, 1, 129]])
def test_rope_kv_write_and_attention_match_torch(heads, kv_heads, dim, lens) -> None:
    bsz = len(lens)
    qkv, k_pool, v_pool, slots, kv_lens = case(bsz, heads, kv_heads, dim, lens)
    cos, sin = rope_tables(kv_lens - 1, dim)
    want, q, k, k_want, v_want = reference(
        qkv, cos, sin, k_pool, v_pool, slots, kv_lens, heads, kv_heads, dim
    )
    got = cpu_attention.decode_attention(
        LIB, qkv, cos, sin, k_pool, v_pool, slots, kv_lens, heads, dim**-0.5
    )
    x = qkv.view(bsz, heads + 2 * kv_heads, dim)
    assert torch.equal(x[:, :heads], q) and torch.equal(x[:, heads : heads + kv_heads], k)
    assert torch.equal(k_pool, k_want) and torch.equal(v_pool, v_want)  # only the new slots
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


def test_rows_read_what_other_rows_of_the_call_write() -> None:
    """A draft tree's nodes are verified in one call, each reading its ancestors' new K/V:
    every write lands before any row attends (as in the torch path), whatever the threads."""
    qkv, k_pool, v_pool, slots, kv_lens = case(4, 6, 2, 32, [5, 6, 7, 8])
    for b in range(3):  # row b holds row b+1's new slot (written later in row order)
        slots[b, kv_lens[b] - 2] = slots[b + 1, kv_lens[b + 1] - 1]
    cos, sin = rope_tables(kv_lens - 1, 32)
    want, *_ = reference(qkv, cos, sin, k_pool, v_pool, slots, kv_lens, 6, 2, 32)
    for _ in range(5):  # any thread order
        got = cpu_attention.decode_attention(
            LIB, qkv.clone(), cos, sin, k_pool.clone(), v_pool.clone(), slots, kv_lens, 6, 32**-0.5
        )
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


def test_without_tables_q_and_k_are_taken_as_roped() -> None:
    qkv, k_pool, v_pool, slots, kv_lens = case(3, 6, 2, 32, [7, 40, 2])
    want, *_ = reference(qkv, None, None, k_pool, v_pool, slots, kv_lens, 6, 2, 32)
    before = qkv.clone()
    got = cpu_attention.decode_attention(
        LIB, qkv, None, None, k_pool, v_pool, slots, kv_lens, 6, 32**-0.5
    )
    assert torch.equal(qkv, before)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


def test_one_dominant_key_and_long_contexts_stay_finite() -> None:
    qkv, k_pool, v_pool, slots, kv_lens = case(2, 4, 2, 64, [3000, 1])
    k_pool *= 30  # scores in the hundreds: exp underflows for all but a few keys
    cos, sin = rope_tables(kv_lens - 1, 64)
    want, *_ = reference(qkv, cos, sin, k_pool, v_pool, slots, kv_lens, 4, 2, 64)
    got = cpu_attention.decode_attention(
        LIB, qkv, cos, sin, k_pool, v_pool, slots, kv_lens, 4, 64**-0.5
    )
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_bad_inputs_are_refused_naming_the_problem() -> None:
    qkv, k_pool, v_pool, slots, kv_lens = case(2, 4, 2, 16, [3, 5])
    call = cpu_attention.decode_attention
    with pytest.raises(ValueError, match="fp32"):
        call(LIB, qkv.double(), None, None, k_pool, v_pool, slots, kv_lens, 4, 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        call(LIB, qkv, None, None, k_pool, v_pool, slots.t().contiguous().t(), kv_lens, 4, 1.0)
    with pytest.raises(ValueError, match="does not fit 5 heads"):
        call(LIB, qkv, None, None, k_pool, v_pool, slots, kv_lens, 5, 1.0)
    with pytest.raises(ValueError, match=r"lengths \(each must be 1\.\."):
        call(LIB, qkv, None, None, k_pool, v_pool, slots, torch.tensor([0, 5]), 4, 1.0)
    for dim in (8, 48):  # not a power-of-two number of 16-float vectors
        odd = torch.randn(4, 2, dim)
        with pytest.raises(ValueError, match=f"takes head dims .* of {dim}"):
            call(LIB, torch.randn(2, 8 * dim), None, None, odd, odd, slots, kv_lens, 4, 1.0)


def test_the_backend_leaves_shapes_the_kernel_refuses_to_torch() -> None:
    """Head dim 48 (3 vectors): the torch backend declines the C call and attends as before."""
    spec = KVPoolSpec(1, 2, 48, 1, 64, torch.float32)
    backend = TorchAttention(KVPool(spec, torch.device("cpu")))
    inputs = AttentionInputs(
        prefix_lens=torch.tensor([3]),
        extend_lens=torch.tensor([1]),
        kv_slots=torch.tensor([[1, 2, 3, 4]]),
        write_slots=torch.tensor([4]),
        is_decode=True,
        rows=(1,),
    )
    backend.plan(inputs)
    qkv = torch.randn(1, (4 + 2 * 2) * 48)
    cos, sin = rope_tables(torch.tensor([3]), 48)
    assert backend.decode_from_qkv(0, qkv, cos, sin, 4, 48**-0.5) is None
    q, k, v = torch.randn(1, 4, 48), torch.randn(1, 2, 48), torch.randn(1, 2, 48)
    out = backend.forward(0, q, k, v, 48**-0.5)  # plans the torch path on first use
    assert out.shape == (1, 4, 48) and torch.isfinite(out).all()
    assert torch.equal(backend.pool.k[0][4], k[0])


def test_engine_decode_takes_the_c_path_and_the_switch_turns_it_off(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = [
        engine.apply_chat_template([{"role": "user", "content": q}])
        for q in ("Name a fruit.", "What is rain?", "Say hello.")
    ]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    got = [r.token_ids for r in engine.generate(prompts, params)]
    mirror = engine.runner.attention.mirror  # type: ignore[attr-defined]
    assert mirror is not None and mirror.allocated_bytes == 0  # decode never needed it
    monkeypatch.setenv("LLMCONSOLE_CPU_DECODE_ATTENTION", "0")
    with Engine(EngineConfig()) as off:
        assert [r.token_ids for r in off.generate(prompts, params)] == got
        assert off.runner.attention.mirror.allocated_bytes > 0  # type: ignore[attr-defined]
        wait_idle(off)
