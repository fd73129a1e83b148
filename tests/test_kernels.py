"""Our Triton kernels against their torch references: on CPU through Triton's interpreter (fp32,
small awkward shapes), on the GPU in bf16 at real shapes (`-m gpu`)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import pytest
import torch

from llmconsole.core.attention import AttentionInputs, TorchAttention, make_backend
from llmconsole.core.kv_cache import KVPool, KVPoolSpec

if TYPE_CHECKING:
    from llmconsole.core.models.llama import MLP, Kernels

# ---- shared builders ---------------------------------------------------------------------------


def page_tables(
    kv_lens: list[int], page_size: int, gen: torch.Generator
) -> tuple[torch.Tensor, int]:
    """kv_slots [B, max_kv] over shuffled (non-contiguous) pages, padded with slot 0, and the
    number of pages the pool needs (page 0 is the dummy page)."""
    pages_each = [-(-n // page_size) for n in kv_lens]
    num_pages = 1 + sum(pages_each) + 3  # a few spare pages, never referenced
    order = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
    kv_slots = torch.zeros(len(kv_lens), max(max(kv_lens), 1), dtype=torch.int64)
    for i, (n, count) in enumerate(zip(kv_lens, pages_each, strict=True)):
        pages = torch.tensor([order.pop() for _ in range(count)], dtype=torch.int64)
        slots = (pages[:, None] * page_size + torch.arange(page_size)).reshape(-1)
        kv_slots[i, :n] = slots[:n]
    return kv_slots, num_pages


def random_pool(
    num_slots: int, num_kv_heads: int, head_dim: int, page_size: int, **kw: object
) -> tuple[torch.Tensor, torch.Tensor]:
    k_pool = torch.randn(num_slots, num_kv_heads, head_dim, **kw)  # type: ignore[arg-type]
    v_pool = torch.randn(num_slots, num_kv_heads, head_dim, **kw)  # type: ignore[arg-type]
    k_pool[:page_size] = 0  # the dummy page, as KVPool keeps it
    v_pool[:page_size] = 0
    return k_pool, v_pool


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


def step_inputs(
    spans: list[tuple[int, int]], page_size: int, gen: torch.Generator
) -> tuple[AttentionInputs, int]:
    """AttentionInputs for requests given as (prefix_len, extend_len), as the runner builds them."""
    kv_slots, num_pages = page_tables([p + e for p, e in spans], page_size, gen)
    write = [kv_slots[i, p : p + e] for i, (p, e) in enumerate(spans)]
    inputs = AttentionInputs(
        prefix_lens=torch.tensor([p for p, _ in spans]),
        extend_lens=torch.tensor([e for _, e in spans]),
        kv_slots=kv_slots,
        write_slots=torch.cat(write),
        is_decode=all(e == 1 for _, e in spans),
    )
    return inputs, num_pages


# ---- CPU: interpreted checks -------------------------------------------------------------------
# TRITON_INTERPRET is read when `triton` itself is imported (its standard library, tl.sum and
# friends, is @jit code) and whenever @triton.jit is applied. This pytest process may already
# hold compiled kernels (the GPU tests below, another module), so the interpreted checks run in
# one child process that sets the variable before anything imports triton; each check is
# reported as its own test.

CHECKS: dict[str, Callable[[], None]] = {}


def check(name: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    def register(fn: Callable[[], None]) -> Callable[[], None]:
        CHECKS[name] = fn
        return fn

    return register


@check("rms_norm")
def _check_rms_norm() -> None:
    from llmconsole.kernels import norm

    wide = torch.randn(7, 128)
    x = wide[:, :96]  # odd hidden size, strided rows
    weight = torch.randn(96)
    torch.testing.assert_close(norm.rms_norm(x, weight, 1e-6), norm.rms_norm_ref(x, weight, 1e-6))
    expected = norm.rms_norm_ref(x, weight, 1e-5)
    assert norm.rms_norm(x, weight, 1e-5, out=x) is x  # in place
    torch.testing.assert_close(x, expected)


@check("fused_add_rms_norm")
def _check_fused_add_rms_norm() -> None:
    from llmconsole.kernels import norm

    for tokens in (1, 5):
        x, residual, weight = torch.randn(tokens, 80), torch.randn(tokens, 80), torch.randn(80)
        want_out, want_res = norm.fused_add_rms_norm_ref(x, residual, weight, 1e-6)
        out, res = norm.fused_add_rms_norm(x, residual, weight, 1e-6)
        torch.testing.assert_close(out, want_out)
        torch.testing.assert_close(res, want_res)
        out, res = norm.fused_add_rms_norm(x, residual, weight, 1e-6, inplace=True)
        assert out is x and res is residual
        torch.testing.assert_close(x, want_out)
        torch.testing.assert_close(residual, want_res)


@check("silu_and_mul")
def _check_silu_and_mul() -> None:
    from llmconsole.kernels import activation

    for tokens, inter in ((5, 70), (3, 1500)):  # one partial block; several column blocks
        gate_up = torch.randn(tokens, 2 * inter + 8)[:, : 2 * inter]  # strided rows
        got = activation.silu_and_mul(gate_up)
        torch.testing.assert_close(got, activation.silu_and_mul_ref(gate_up))


@check("argmax")
def _check_argmax() -> None:
    from llmconsole.kernels import argmax

    gen = torch.Generator().manual_seed(0)
    # Batches on both sides of argmax_block's switch; vocabularies that leave a partial last
    # block; a max tied across blocks and within one (torch keeps the first); an all -inf row.
    for batch, vocab in ((1, 5000), (3, 2048), (9, 9000)):
        wide = torch.randn(batch, vocab + 16, generator=gen)
        logits = wide[:, :vocab]  # strided rows
        block = argmax.argmax_block(batch)
        logits[0, block + 7] = 50.0
        logits[0, vocab - 1] = 50.0  # the same max, later: loses
        if batch > 1:
            logits[1, 3] = logits[1, 5] = 40.0  # a tie inside block 0
            logits[-1] = float("-inf")
        got = argmax.greedy_ids(logits)
        assert got.dtype == torch.int64
        assert got.tolist() == logits.argmax(dim=-1).tolist()
        assert got[0] == block + 7


@check("gemv")
def _check_gemv() -> None:
    from llmconsole.kernels import gemv

    gen = torch.Generator().manual_seed(0)
    # Row counts that leave a partial last program, K that is and is not a multiple of the
    # block, with and without a bias, and every launch shape gemv_config picks.
    for n, k, bias in ((37, 300, True), (16, 1024, False), (5, 7, False), (9, 96, True)):
        weight = torch.randn(n, k + 3, generator=gen)[:, :k]  # strided rows
        x = torch.randn(1, k, generator=gen)
        b = torch.randn(n, generator=gen) if bias else None
        want = gemv.gemv_ref(x, weight, b)
        torch.testing.assert_close(gemv.gemv(x, weight, b), want, rtol=1e-4, atol=1e-4)
        for block_n, block_k in ((1, 64), (4, 32), (8, 128)):
            cfg = gemv.GemvConfig(block_n, block_k, num_warps=2)
            got = gemv.gemv(x, weight, b, config=cfg)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    out = torch.empty(1, 16)
    weight, x = torch.randn(16, 64, generator=gen), torch.randn(1, 64, generator=gen)
    assert gemv.gemv(x, weight, out=out) is out


@check("skinny_gemm")
def _check_skinny_gemm() -> None:
    from llmconsole.kernels import skinny_gemm as sg

    gen = torch.Generator().manual_seed(0)
    # Rows that fill one M block, leave it partial and need two; N with a partial last block;
    # K that is and is not a multiple of the chunk; strided x and W rows; with and without bias.
    for m, n, k, bias in ((2, 37, 300, True), (5, 64, 128, False), (17, 40, 96, True)):
        weight = torch.randn(n, k + 3, generator=gen)[:, :k]
        x = torch.randn(m, k + 5, generator=gen)[:, :k]
        b = torch.randn(n, generator=gen) if bias else None
        want = torch.nn.functional.linear(
            x.double(), weight.double(), None if b is None else b.double()
        )
        torch.testing.assert_close(sg.skinny_gemm(x, weight, b), want.float(), rtol=1e-4, atol=1e-4)
        cfg = sg.SkinnyConfig(16, 16, 32, num_warps=2, num_stages=2)
        got = sg.skinny_gemm(x, weight, b, config=cfg)  # m=17: two M blocks
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-4)
        # K in 2-3 slices summed by the second kernel: whole chunks (k=128) and a ragged last
        # slice (k=300, 96).
        for split in (2, 3):
            cfg = sg.SkinnyConfig(16, 16, 32, num_warps=2, num_stages=2, split_k=split)
            got = sg.skinny_gemm(x, weight, b, config=cfg)
            torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-4)
    out = torch.empty(3, 16)
    weight, x = torch.randn(16, 64, generator=gen), torch.randn(3, 64, generator=gen)
    assert sg.skinny_gemm(x, weight, out=out) is out
    # gate_up with SiLU-and-mul in the epilogue: an odd intermediate size (partial N block), K
    # on and off the chunk, one and two M blocks; against the unfused path's rounding.
    for m, inter, k in ((3, 40, 64), (17, 24, 100)):
        weight = torch.randn(2 * inter, k, generator=gen)
        x = torch.randn(m, k, generator=gen)
        gate, up = torch.nn.functional.linear(x.double(), weight.double()).float().chunk(2, -1)
        want = torch.nn.functional.silu(gate) * up
        cfg = sg.SkinnyConfig(16, 16, 32, num_warps=2, num_stages=2)
        got = sg.skinny_gemm_silu_mul(x, weight, config=cfg)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@check("split_add_rms_norm")
def _check_split_add_rms_norm() -> None:
    from llmconsole.kernels import norm
    from llmconsole.kernels import skinny_gemm as sg

    gen = torch.Generator().manual_seed(2)
    # A split-K product handed back unsummed, then summed inside the residual-add RMSNorm: the
    # same normed output and residual stream as summing first, for two slices (whole chunks and
    # a ragged last one), with and without a bias, and an odd hidden size.
    for m, n, k, split, bias in ((3, 40, 96, 2, True), (5, 24, 100, 2, False)):
        weight = torch.randn(n, k, generator=gen)
        x = torch.randn(m, k, generator=gen)
        b = torch.randn(n, generator=gen) if bias else None
        w_norm = torch.randn(n, generator=gen)
        residual = torch.randn(m, n, generator=gen)
        cfg = sg.SkinnyConfig(16, 16, 32, num_warps=2, num_stages=2, split_k=split)
        summed = sg.skinny_gemm(x, weight, b, config=cfg)
        want_out, want_res = norm.fused_add_rms_norm(summed, residual, w_norm, 1e-6)
        partials = sg.skinny_gemm(x, weight, b, config=cfg, defer_sum=True)
        assert isinstance(partials, sg.SplitPartials) and partials.parts.shape == (split, m, n)
        torch.testing.assert_close(partials.finish(), summed, rtol=0, atol=0)
        res = residual.clone()
        out, res_out = norm.split_add_rms_norm(partials.parts, partials.bias, res, w_norm, 1e-6)
        assert res_out is res  # the residual stream is updated in place
        torch.testing.assert_close(out, want_out, rtol=0, atol=0)
        torch.testing.assert_close(res, want_res, rtol=0, atol=0)
    # One slice, or more than DEFER_MAX_SPLIT: the product comes back summed.
    x, weight = torch.randn(3, 96, generator=gen), torch.randn(16, 96, generator=gen)
    for split in (1, 3):
        cfg = sg.SkinnyConfig(16, 16, 32, num_warps=2, num_stages=2, split_k=split)
        assert isinstance(sg.skinny_gemm(x, weight, config=cfg, defer_sum=True), torch.Tensor)
    # The norm's kernel itself takes any number of slices.
    parts = torch.randn(3, 4, 24, generator=gen)
    residual, w_norm = torch.randn(4, 24, generator=gen), torch.randn(24, generator=gen)
    want = norm.fused_add_rms_norm(parts.sum(0), residual, w_norm, 1e-6)
    got = norm.split_add_rms_norm(parts, None, residual.clone(), w_norm, 1e-6)
    torch.testing.assert_close(got, want)


@check("gemv_silu_mul")
def _check_gemv_silu_mul() -> None:
    from llmconsole.kernels import gemv

    gen = torch.Generator().manual_seed(1)
    # Odd intermediate sizes (a partial last program), K on and off the block, strided rows:
    # each output pairs gate row n with up row I + n, never a neighbour's.
    for inter, k in ((37, 300), (16, 1024), (3, 7)):
        weight = torch.randn(2 * inter, k + 5, generator=gen)[:, :k]
        x = torch.randn(1, k, generator=gen)
        want = gemv.gemv_silu_mul_ref(x, weight)
        assert want.shape == (1, inter)
        torch.testing.assert_close(gemv.gemv_silu_mul(x, weight), want, rtol=1e-4, atol=1e-4)
        for block_n, block_k in ((1, 64), (4, 32), (8, 128)):
            cfg = gemv.GemvConfig(block_n, block_k, num_warps=2)
            got = gemv.gemv_silu_mul(x, weight, config=cfg)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@check("rope_kv")
def _check_rope_kv() -> None:
    from llmconsole.core.models.llama import RotaryEmbedding, apply_rope
    from llmconsole.kernels import rope_kv

    gen = torch.Generator().manual_seed(0)
    tokens, heads, kv_heads, head_dim, page_size = 9, 6, 2, 32, 4
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, generator=gen)
    q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)  # strided views, as the model has
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    cache = rope_kv.rope_cos_sin_cache(inv_freq, 64, scale=1.1)
    positions = torch.randint(0, 64, (tokens,), generator=gen)
    kv_slots, num_pages = page_tables([tokens], page_size, gen)
    slots = kv_slots[0]
    k_pool, v_pool = random_pool(num_pages * page_size, kv_heads, head_dim, page_size)
    k_ref, v_ref = k_pool.clone(), v_pool.clone()
    q_ref = rope_kv.rope_and_write_kv_ref(q, k, v, positions, cache, k_ref, v_ref, slots)
    k_before = k.clone()
    got = rope_kv.rope_and_write_kv(q.clone(), k, v, positions, cache, k_pool, v_pool, slots)
    torch.testing.assert_close(got, q_ref)
    torch.testing.assert_close(k_pool, k_ref)  # untouched slots included
    torch.testing.assert_close(v_pool, v_ref)
    assert torch.equal(k, k_before)
    # Same convention as the model: its own cos/sin and rotate-half code.
    rotary = SimpleNamespace(inv_freq=inv_freq, scale=1.1)
    cos, sin = RotaryEmbedding.cos_sin(rotary, positions, torch.float32)  # type: ignore[arg-type]
    torch.testing.assert_close(got, apply_rope(q, cos, sin))
    torch.testing.assert_close(k_pool[slots], apply_rope(k, cos, sin))


DECODE_CASES = {
    # name: (page_size, heads, kv_heads, head_dim, kv_lens, num_splits)
    "p1_gqa3": (1, 6, 2, 32, [1, 70, 200, 33], None),
    "p4_gqa4_d48_splits7": (4, 8, 2, 48, [5, 129, 64, 1], 7),
    "p2_gqa4_one_split": (2, 8, 2, 32, [5, 129, 64, 1], 1),  # batch 64 / 128's launch on an H100
    "p16_mha_b1": (16, 4, 4, 32, [300], None),
}


def _decode_check(case: str) -> None:
    from llmconsole.kernels import decode_attention as da

    page_size, heads, kv_heads, head_dim, kv_lens, splits = DECODE_CASES[case]
    gen = torch.Generator().manual_seed(1)
    kv_slots, num_pages = page_tables(kv_lens, page_size, gen)
    # Two padding rows: a CUDA-graph dummy (1 token at slot 0) and an empty row.
    kv_slots = torch.cat([kv_slots, torch.zeros(2, kv_slots.shape[1], dtype=torch.int64)])
    lens = torch.tensor([*kv_lens, 1, 0])
    k_pool, v_pool = random_pool(num_pages * page_size, kv_heads, head_dim, page_size)
    q = torch.randn(len(lens), heads, head_dim, generator=gen)
    scale = head_dim**-0.5
    got = da.decode_attention(q, k_pool, v_pool, kv_slots, lens, scale, num_splits=splits)
    want = da.decode_attention_ref(q[:-1], k_pool, v_pool, kv_slots[:-1], lens[:-1], scale)
    torch.testing.assert_close(got[:-1], want)
    assert torch.equal(got[-1], torch.zeros_like(got[-1]))  # no KV: zeros, never NaN


for _case in DECODE_CASES:
    check(f"decode_attention[{_case}]")(lambda case=_case: _decode_check(case))


@check("decode_attention[slot_table_rows_fixed_splits]")
def _check_decode_rows() -> None:
    """The CUDA-graph launch: slots read in place from a slot table through per-request rows,
    one fixed split count for requests of any length (each cuts its own KV into slices)."""
    from llmconsole.kernels import decode_attention as da

    gen = torch.Generator().manual_seed(4)
    heads, kv_heads, head_dim, page_size, kv_lens = 8, 2, 32, 4, [1, 150, 64, 7]
    kv_slots, num_pages = page_tables(kv_lens, page_size, gen)
    table = torch.zeros(7, 200, dtype=torch.int64)  # row 0: the dummy row
    rows = torch.tensor([5, 2, 6, 3, 0])  # the last request is CUDA-graph padding
    table[rows[:-1], : kv_slots.shape[1]] = kv_slots
    lens = torch.tensor([*kv_lens, 1])
    k_pool, v_pool = random_pool(num_pages * page_size, kv_heads, head_dim, page_size)
    q = torch.randn(len(lens), heads, head_dim, generator=gen)
    want = da.decode_attention_ref(q, k_pool, v_pool, table, lens, 0.3, kv_rows=rows)
    for splits in (1, 5, 33):
        got = da.decode_attention(q, k_pool, v_pool, table, lens, 0.3, splits, kv_rows=rows)
        torch.testing.assert_close(got, want)


EXTEND_CASES = {
    # name: (page_size, heads, kv_heads, head_dim, [(prefix_len, extend_len), ...])
    "p1_gqa3": (1, 6, 2, 32, [(0, 17), (5, 1), (64, 70), (3, 2)]),
    "p4_mha": (4, 4, 4, 32, [(0, 33), (130, 7)]),
    "p8_gqa8_d48": (8, 8, 1, 48, [(9, 20), (0, 1)]),
}


def _extend_check(case: str) -> None:
    from llmconsole.kernels import extend_attention as ea

    page_size, heads, kv_heads, head_dim, spans = EXTEND_CASES[case]
    gen = torch.Generator().manual_seed(2)
    kv_slots, num_pages = page_tables([p + e for p, e in spans], page_size, gen)
    prefix = torch.tensor([p for p, _ in spans])
    extend = torch.tensor([e for _, e in spans])
    k_pool, v_pool = random_pool(num_pages * page_size, kv_heads, head_dim, page_size)
    q = torch.randn(int(extend.sum()), heads, head_dim, generator=gen)
    scale = head_dim**-0.5
    got = ea.extend_attention(q, k_pool, v_pool, kv_slots, prefix, extend, scale)
    want = ea.extend_attention_ref(q, k_pool, v_pool, kv_slots, prefix, extend, scale)
    torch.testing.assert_close(got, want)


for _case in EXTEND_CASES:
    check(f"extend_attention[{_case}]")(lambda case=_case: _extend_check(case))


@check("triton_backend_matches_torch")
def _check_backend() -> None:
    from llmconsole.core.attention.triton_backend import TritonAttention

    gen = torch.Generator().manual_seed(3)
    heads, kv_heads, head_dim, page_size = 6, 2, 32, 4
    steps = [
        [(0, 13), (40, 9), (7, 1)],  # mixed: a fresh prompt, a prefill chunk, a decode
        [(20, 1), (3, 1), (0, 1)],  # decode; the last row is the padding dummy (slot 0)
        # 12 x 2 KV heads = 24 programs on the interpreter's 4 SMs x 5: 1.2 waves at one split,
        # so the wave rule takes 2 (a 20% tail costs a 30% wave).
        [(70 + 5 * i, 1) for i in range(12)],
    ]
    for spans in steps:
        inputs, num_pages = step_inputs(spans, page_size, gen)
        if spans[-1] == (0, 1):
            inputs.kv_slots[-1] = 0
            inputs.write_slots[-1] = 0
        spec = KVPoolSpec(2, kv_heads, head_dim, page_size, num_pages, torch.float32)
        pools = [KVPool(spec, torch.device("cpu")) for _ in range(2)]
        for i in range(4):  # the same prefix K/V (2 layers x K, V) in both pools
            filler = torch.randn(pools[0].k[0][page_size:].shape, generator=gen)
            for pool in pools:
                (pool.k + pool.v)[i][page_size:] = filler
        triton_attn, torch_attn = TritonAttention(pools[0]), TorchAttention(pools[1])
        tokens = int(inputs.extend_lens.sum())
        for backend in (triton_attn, torch_attn):
            backend.plan(inputs)
        if len(spans) == 12:
            assert triton_attn._num_splits == 2
        for layer in (0, 1):
            q = torch.randn(tokens, heads, head_dim, generator=gen)
            k = torch.randn(tokens, kv_heads, head_dim, generator=gen)
            v = torch.randn(tokens, kv_heads, head_dim, generator=gen)
            got = triton_attn.forward(layer, q, k, v, 0.2)
            want = torch_attn.forward(layer, q, k, v, 0.2)
            torch.testing.assert_close(got, want)
            torch.testing.assert_close(pools[0].k[layer], pools[1].k[layer])


def _run_checks_here() -> dict[str, str | None]:
    """In the child: every check, its traceback or None."""
    _patch_interpreter_for_numpy_2_4()
    results: dict[str, str | None] = {}
    for name, fn in CHECKS.items():
        try:
            fn()
            results[name] = None
        except Exception:
            results[name] = traceback.format_exc()
    return results


def _patch_interpreter_for_numpy_2_4() -> None:
    """Triton 3.6's interpreter turns loop bounds into ints with int(1-element array), which
    numpy >= 2.4 refuses (triton-lang/triton#9171, fixed after 3.6); index the element."""
    import numpy as np
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        return

    def patch_lang_tensor(tensor: object, scope: object) -> None:
        original(tensor, scope)
        scope.set_attr(  # type: ignore[attr-defined]
            tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0])
        )

    interpreter._patch_lang_tensor = patch_lang_tensor


@pytest.fixture(scope="module")
def interpreted_results() -> dict[str, str | None]:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve())],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        pytest.fail(f"interpreted checks crashed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


@pytest.mark.parametrize("name", list(CHECKS))
def test_kernel_in_triton_interpreter(
    name: str, interpreted_results: dict[str, str | None]
) -> None:
    error = interpreted_results[name]
    if error is not None:
        pytest.fail(error, pytrace=False)


# ---- CPU: import and backend selection ---------------------------------------------------------


def test_kernels_package_imports_without_triton_or_gpu() -> None:
    # A child where `import triton` raises: the package and the backend registry (not the
    # kernel modules) must still load.
    code = (
        "import sys; sys.modules['triton'] = None; import llmconsole.kernels; "
        "from llmconsole.core.attention import make_backend"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_triton_backend_on_cpu_is_a_clear_error() -> None:
    spec = KVPoolSpec(1, 2, 8, 1, 4, torch.float32)
    pool = KVPool(spec, torch.device("cpu"))
    with pytest.raises(ValueError, match="--attention-backend triton needs a CUDA device"):
        make_backend("triton", pool)
    with pytest.raises(ValueError, match="--attention-backend flashinfer needs a CUDA device"):
        make_backend("flashinfer", pool)
    assert isinstance(make_backend("torch", pool), TorchAttention)


# ---- GPU: bf16 at real shapes ------------------------------------------------------------------

H, HKV, D = 32, 8, 128  # Llama-3-8B's attention


@pytest.fixture
def cuda() -> Iterator[torch.device]:
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)
    yield torch.device("cuda")


def random_mlp(cuda: torch.device, hidden: int, intermediate: int) -> MLP:
    """A Llama MLP in bf16 on the GPU with our kernels, weights ~N(0, 0.02)."""
    import transformers

    from llmconsole.core.models.config import ModelConfig
    from llmconsole.core.models.llama import MLP, Kernels

    hf = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_hidden_layers=1,
        vocab_size=512,
    )
    with torch.device(cuda):
        mlp = MLP(ModelConfig.from_hf(hf), torch.bfloat16, Kernels.for_device(cuda))
    mlp.gate_up_proj.weight.normal_(0, 0.02)
    mlp.down_proj.weight.normal_(0, 0.02)
    return mlp


@pytest.mark.gpu
def test_gpu_norm_and_activation(cuda: torch.device) -> None:
    from llmconsole.kernels import activation, norm

    for tokens in (1, 257):
        x = torch.randn(tokens, 4096, device=cuda, dtype=torch.bfloat16)
        residual = torch.randn_like(x)
        weight = torch.randn(4096, device=cuda, dtype=torch.bfloat16)
        torch.testing.assert_close(
            norm.rms_norm(x, weight, 1e-5), norm.rms_norm_ref(x, weight, 1e-5)
        )
        out, res = norm.fused_add_rms_norm(x, residual, weight, 1e-5)
        want_out, want_res = norm.fused_add_rms_norm_ref(x, residual, weight, 1e-5)
        torch.testing.assert_close(out, want_out)
        torch.testing.assert_close(res, want_res)
        gate_up = torch.randn(tokens, 2 * 14336, device=cuda, dtype=torch.bfloat16)
        want = activation.silu_and_mul_ref(gate_up)
        torch.testing.assert_close(activation.silu_and_mul(gate_up), want)


def linear_from_a_graph(x: torch.Tensor, w: torch.Tensor, kernels: Kernels | None) -> torch.Tensor:
    """The model's linear(x, w) captured into a CUDA graph (after an eager warm-up, which takes
    cuBLAS) and replayed into a zeroed output."""
    from llmconsole.core.models.llama import linear

    out = torch.empty(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype)
    linear(x, w, None, kernels, out=out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        linear(x, w, None, kernels, out=out)
    out.zero_()
    graph.replay()
    return out


@pytest.mark.gpu
def test_gpu_skinny_gemm_matches_fp32_reference_in_a_graph(cuda: torch.device) -> None:
    """Batched decode's wide projections (gate_up, LM head) at graph bucket sizes, launched
    plainly and replayed from a CUDA graph, against an fp32 product; and the model's linear()
    takes the kernel only while capturing, for wide weights and 2-64 rows."""
    from llmconsole.core.models.llama import Kernels
    from llmconsole.kernels import skinny_gemm as sg

    kernels = Kernels.for_device(cuda)
    assert kernels is not None
    for rows, n, k in ((2, 28672, 4096), (24, 128256, 4096), (64, 28672, 4096), (17, 16400, 300)):
        w = torch.randn(n, k, device=cuda, dtype=torch.bfloat16) * 0.02
        x = torch.randn(rows, k, device=cuda, dtype=torch.bfloat16)
        assert sg.supported(x, w)
        want = x.float() @ w.float().t()
        scale = want.abs().max()
        got = sg.skinny_gemm(x, w)
        assert ((got.float() - want).abs().max() / scale).item() < 1e-2
        out = linear_from_a_graph(x, w, kernels)
        torch.testing.assert_close(out, got, rtol=0, atol=0)  # the graph ran our kernel
    assert not sg.supported(torch.randn(65, 64, device=cuda, dtype=torch.bfloat16), w[:, :64])
    narrow = torch.randn(4096, 4096, device=cuda, dtype=torch.bfloat16)
    assert not sg.supported(torch.randn(8, 4096, device=cuda, dtype=torch.bfloat16), narrow)


@pytest.mark.gpu
def test_gpu_split_k_skinny_gemm_matches_fp32_reference_in_a_graph(cuda: torch.device) -> None:
    """K in 2-8 slices summed by a second kernel (narrow weights: qkv, o, down), with a bias,
    launched plainly and replayed from a CUDA graph: same values, within bf16 of fp32."""
    from llmconsole.kernels import skinny_gemm as sg

    for rows, n, k, split in ((64, 4096, 4096, 4), (32, 6144, 4096, 2), (64, 4096, 14336, 8)):
        w = torch.randn(n, k, device=cuda, dtype=torch.bfloat16) * 0.02
        x = torch.randn(rows, k, device=cuda, dtype=torch.bfloat16)
        b = torch.randn(n, device=cuda, dtype=torch.bfloat16)
        cfg = sg.SkinnyConfig(64, 64, 128, 4, 3, split_k=split)
        want = x.float() @ w.float().t() + b.float()
        got = sg.skinny_gemm(x, w, b, config=cfg)
        assert ((got.float() - want).abs().max() / want.abs().max()).item() < 1e-2
        out = torch.empty(rows, n, device=cuda, dtype=torch.bfloat16)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            sg.skinny_gemm(x, w, b, out=out, config=cfg)
        graph.replay()
        torch.testing.assert_close(out, got, rtol=0, atol=0)
    # Which narrow shapes the model hands it at 17-64 rows: o and down, not qkv, not 8 rows.
    rows64 = torch.empty(64, 4096, device=cuda, dtype=torch.bfloat16)
    o_w = torch.empty(4096, 4096, device=cuda, dtype=torch.bfloat16)
    down_w = torch.empty(4096, 14336, device=cuda, dtype=torch.bfloat16)
    qkv_w = torch.empty(6144, 4096, device=cuda, dtype=torch.bfloat16)
    assert sg.supported(rows64, o_w)
    assert sg.supported(torch.empty(32, 14336, device=cuda, dtype=torch.bfloat16), down_w)
    assert sg.skinny_config(64, 4096, 4096).split_k > 1
    assert not sg.supported(rows64, qkv_w) and not sg.supported(rows64[:8], o_w)


@pytest.mark.gpu
def test_gpu_skinny_gate_up_silu_mul_matches_the_unfused_path_in_a_graph(
    cuda: torch.device,
) -> None:
    """Batched decode's MLP: gate_up with SiLU-and-mul in the epilogue equals the gate_up
    product followed by the SiLU-and-mul kernel, launched plainly and from a graph, and the
    model's MLP takes it only while capturing."""
    from llmconsole.kernels import activation
    from llmconsole.kernels import skinny_gemm as sg

    for rows, inter, k in ((64, 14336, 4096), (8, 14336, 4096), (3, 8200, 1000)):
        w = torch.randn(2 * inter, k, device=cuda, dtype=torch.bfloat16) * 0.02
        x = torch.randn(rows, k, device=cuda, dtype=torch.bfloat16)
        assert sg.supports_silu_mul(x, w)
        want = activation.silu_and_mul((x.float() @ w.float().t()).to(torch.bfloat16))
        got = sg.skinny_gemm_silu_mul(x, w)
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)
        out = torch.empty(rows, inter, device=cuda, dtype=torch.bfloat16)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            sg.skinny_gemm_silu_mul(x, w, out=out)
        graph.replay()
        torch.testing.assert_close(out, got, rtol=0, atol=0)
    mlp = random_mlp(cuda, 256, 8192)
    x = torch.randn(16, 256, device=cuda, dtype=torch.bfloat16)
    eager = mlp.forward(x)  # cuBLAS + the SiLU-and-mul kernel
    out = torch.empty_like(eager)
    mlp.forward(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(mlp.forward(x))
    graph.replay()
    fused = mlp.down_proj.forward(sg.skinny_gemm_silu_mul(x, mlp.gate_up_proj.weight))
    torch.testing.assert_close(out, fused, rtol=0, atol=0)  # the graph took the fused kernel
    torch.testing.assert_close(out, eager, rtol=2e-2, atol=2e-3)


@pytest.fixture
def table_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """Point the skinny GEMM at a table file (or "off") for one test, re-read on each change."""
    from llmconsole.kernels import skinny_table as st

    def use(value: str) -> None:
        monkeypatch.setenv(st.TUNING_ENV, value)
        st.table_for.cache_clear()

    yield use
    monkeypatch.undo()
    st.table_for.cache_clear()


@pytest.mark.gpu
def test_gpu_a_cards_table_takes_rows_past_64_with_its_shapes_in_a_graph(
    cuda: torch.device, tmp_path: Path, table_env: Callable[[str], None]
) -> None:
    """Rows the built-in rules leave to cuBLAS (65-128) go through our kernel where the card's
    table has an entry for that weight: with the entry's shape (split-K included), right values,
    replayed from a graph; the fused gate_up + SiLU too. Past the entry's rows, or with the
    table off, cuBLAS keeps them; a broken table file fails the model's load."""
    from llmconsole.core.models.llama import Kernels
    from llmconsole.kernels import activation
    from llmconsole.kernels import skinny_gemm as sg
    from llmconsole.kernels import skinny_table as st

    o_cfg = st.SkinnyConfig(128, 64, 128, 4, 3, split_k=2)
    silu_cfg = st.SkinnyConfig(128, 64, 64, 4, 3)
    entries = (
        st.TunedEntry("gemm", 4096, 4096, 65, 128, o_cfg, 1.0, 2.0),
        st.TunedEntry("silu_mul", 2 * 14336, 4096, 65, 128, silu_cfg, 1.0, 2.0),
    )
    path = tmp_path / "table.json"
    st.SkinnyTable(torch.cuda.get_device_name(cuda), entries, "test").save(path)
    table_env(str(path))
    kernels = Kernels.for_device(cuda)
    w = torch.randn(4096, 4096, device=cuda, dtype=torch.bfloat16) * 0.02
    for rows in (72, 128):
        x = torch.randn(rows, 4096, device=cuda, dtype=torch.bfloat16)
        assert sg.supported(x, w) and sg.tuned_config("gemm", x, w) == o_cfg
        want = x.float() @ w.float().t()
        out = linear_from_a_graph(x, w, kernels)
        assert ((out.float() - want).abs().max() / want.abs().max()).item() < 1e-2
        mine = sg.skinny_gemm(x, w, config=o_cfg)
        torch.testing.assert_close(out, mine, rtol=0, atol=0)  # the graph ran that shape
    assert not sg.supported(torch.randn(129, 4096, device=cuda, dtype=torch.bfloat16), w)
    gate_up = torch.randn(2 * 14336, 4096, device=cuda, dtype=torch.bfloat16) * 0.02
    x = torch.randn(96, 4096, device=cuda, dtype=torch.bfloat16)
    assert sg.supports_silu_mul(x, gate_up) and not sg.supported(x, gate_up)
    want = activation.silu_and_mul((x.float() @ gate_up.float().t()).to(torch.bfloat16))
    got = sg.skinny_gemm_silu_mul(x, gate_up)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)
    mine = sg.skinny_gemm_silu_mul(x, gate_up, config=silu_cfg)
    torch.testing.assert_close(got, mine, rtol=0, atol=0)
    table_env("off")
    assert not sg.supported(torch.randn(128, 4096, device=cuda, dtype=torch.bfloat16), w)
    assert not sg.supports_silu_mul(x, gate_up)
    (tmp_path / "broken.json").write_text("{")
    table_env(str(tmp_path / "broken.json"))
    from llmconsole.core.config import ConfigError

    with pytest.raises(ConfigError, match="not a skinny GEMM table.*LLMCONSOLE_SKINNY_TUNING=off"):
        Kernels.for_device(cuda)  # the CLI prints a ConfigError as one line


@pytest.mark.gpu
def test_gpu_this_cards_table_gives_right_products(cuda: torch.device) -> None:
    """Every entry of the table the engine reads on this card (shipped, or the one
    LLMCONSOLE_SKINNY_TUNING names) computes its product within bf16 of fp32 at both ends of
    its rows."""
    from llmconsole.kernels import skinny_gemm as sg
    from llmconsole.kernels import skinny_table as st

    table = st.table_on(cuda)
    if table is None:
        pytest.skip(f"no skinny GEMM table for {torch.cuda.get_device_name(cuda)}")
    for e in table.entries:
        w = torch.randn(e.n, e.k, device=cuda, dtype=torch.bfloat16) * 0.02
        for rows in (e.min_rows, e.max_rows):
            x = torch.randn(rows, e.k, device=cuda, dtype=torch.bfloat16)
            product = (x.float() @ w.float().t()).to(torch.bfloat16)
            if e.op == "silu_mul":
                got = sg.skinny_gemm_silu_mul(x, w, config=e.config)
                gate, up = product.float().chunk(2, -1)
                want = torch.nn.functional.silu(gate) * up
            else:
                got, want = sg.skinny_gemm(x, w, config=e.config), product.float()
            err = ((got.float() - want).abs().max() / want.abs().max()).item()
            assert err < 2e-2, (e, rows, err)


@pytest.mark.gpu
def test_gpu_mlp_down_slices_summed_in_the_next_norm_match_the_plain_path(
    cuda: torch.device,
) -> None:
    """Batched decode in a graph: the MLP's down projection (two K slices at 48 rows) hands its
    slices to the next residual-add RMSNorm unsummed; the normed output and the residual stream
    are bitwise those of summing first. At 24 rows (four slices) it sums them itself."""
    from llmconsole.core.models.llama import Kernels, RMSNorm
    from llmconsole.kernels import skinny_gemm as sg

    mlp = random_mlp(cuda, 4096, 8192)
    with torch.device(cuda):
        norm = RMSNorm(4096, 1e-5, torch.bfloat16, Kernels.for_device(cuda))
    norm.weight.normal_(1, 0.1)

    def run(rows: int, defer: bool) -> tuple[torch.Tensor, torch.Tensor, bool]:
        sg.DEFER_SUM = defer
        gen = torch.Generator(device=cuda).manual_seed(rows)
        x = torch.randn(rows, 4096, device=cuda, dtype=torch.bfloat16, generator=gen)
        residual = torch.randn(rows, 4096, device=cuda, dtype=torch.bfloat16, generator=gen)
        normed = torch.empty_like(residual)
        deferred = []
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            down = mlp.forward_unsummed(x)
            deferred.append(not isinstance(down, torch.Tensor))
            normed.copy_(norm.add_and_norm(down, residual)[0])
        graph.replay()
        return normed, residual, deferred[0]

    try:
        want_normed, want_residual, deferred = run(48, defer=False)
        assert not deferred
        normed, residual, deferred = run(48, defer=True)
        assert deferred
        torch.testing.assert_close(normed, want_normed, rtol=0, atol=0)
        torch.testing.assert_close(residual, want_residual, rtol=0, atol=0)
        assert not run(24, defer=True)[2]
    finally:
        sg.DEFER_SUM = True
    # Outside a graph nothing is deferred: cuBLAS computes the projection.
    x = torch.randn(48, 4096, device=cuda, dtype=torch.bfloat16)
    assert isinstance(mlp.forward_unsummed(x), torch.Tensor)


@pytest.mark.gpu
def test_gpu_gemv_matches_fp32_reference_at_llama_shapes(cuda: torch.device) -> None:
    from llmconsole.kernels import gemv

    # Llama-3-8B's projections (qkv, o, gate_up, down), a vocabulary, and odd sizes with a bias.
    shapes = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)]
    for n, k in [*shapes, (1000, 4000), (37, 300)]:
        weight = torch.randn(n, k, device=cuda, dtype=torch.bfloat16) * 0.02
        x = torch.randn(1, k, device=cuda, dtype=torch.bfloat16)
        bias = torch.randn(n, device=cuda, dtype=torch.bfloat16) if n % 2 else None
        assert gemv.supported(x, weight)
        got = gemv.gemv(x, weight, bias)
        # Same fp32 sums in another order: at most one bf16 rounding step apart.
        torch.testing.assert_close(got, gemv.gemv_ref(x, weight, bias), rtol=8e-3, atol=1e-3)
    assert not gemv.supported(torch.randn(2, 64, device=cuda), torch.randn(8, 64, device=cuda))
    # The fused gate_up + SiLU-and-mul at Llama-3-8B's MLP and an odd one.
    for inter, k in ((14336, 4096), (1000, 4000)):
        weight = torch.randn(2 * inter, k, device=cuda, dtype=torch.bfloat16) * 0.02
        x = torch.randn(1, k, device=cuda, dtype=torch.bfloat16)
        got = gemv.gemv_silu_mul(x, weight)
        want = gemv.gemv_silu_mul_ref(x, weight)
        torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1e-3)


@pytest.mark.gpu
def test_gpu_greedy_ids_equal_torch_argmax(cuda: torch.device) -> None:
    from llmconsole.core.sampling import greedy_ids

    gen = torch.Generator(device=cuda).manual_seed(0)
    for batch in (1, 8, 9, 64, 256):
        logits = torch.randn(batch, 128256, device=cuda, generator=gen).to(torch.bfloat16)
        logits[0, 70000] = logits[0, 90000] = 30.0  # a tie across blocks: the first wins
        got = greedy_ids(logits)
        assert torch.equal(got, logits.argmax(dim=-1))
        assert torch.equal(got, logits.float().argmax(dim=-1))
        assert int(got[0]) == 70000


@pytest.mark.gpu
def test_gpu_pdl_chain_in_a_graph_equals_plain_launches(
    cuda: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under PDL a kernel starts before the previous one ends; one that read its input before
    the wait would see a stale vector. A 36-kernel chain, each reading the last one's output,
    replayed from a CUDA graph, must give the plain launches' bits exactly."""
    from llmconsole.kernels import activation, gemv, norm, pdl

    if not pdl.enabled(torch.empty(0, device=cuda)):
        pytest.skip("PDL needs SM90+")
    hidden, inter = 1024, 2816
    w_up = torch.randn(2 * inter, hidden, device=cuda, dtype=torch.bfloat16) * 0.03
    w_down = torch.randn(hidden, inter, device=cuda, dtype=torch.bfloat16) * 0.03
    w_norm = torch.rand(hidden, device=cuda, dtype=torch.bfloat16) + 0.5
    x0 = torch.randn(1, hidden, device=cuda, dtype=torch.bfloat16)

    def chain(x: torch.Tensor) -> torch.Tensor:
        residual = torch.zeros_like(x)
        for _ in range(6):
            h, residual = norm.fused_add_rms_norm(x, residual, w_norm, 1e-5)
            x = gemv.gemv(activation.silu_and_mul(gemv.gemv(h, w_up)), w_down)
            x = gemv.gemv(gemv.gemv_silu_mul(x, w_up), w_down)
        return x + residual

    def replayed() -> torch.Tensor:
        static_x = x0.clone()
        chain(static_x)  # compile and warm up outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain(static_x)
        results = []
        for _ in range(3):
            graph.replay()
            results.append(out.clone())
        torch.cuda.synchronize()
        assert all(torch.equal(r, results[0]) for r in results)
        return results[0]

    with_pdl = replayed()
    monkeypatch.setattr(pdl, "SWITCHED_ON", False)  # as LLMCONSOLE_PDL=0 at start-up
    assert not pdl.enabled(x0)
    plain = replayed()
    assert with_pdl.abs().sum() > 0
    assert torch.equal(with_pdl, plain)


@pytest.mark.gpu
@pytest.mark.parametrize("kv", ["bf16", "fp8_e4m3"])
def test_gpu_rope_kv(cuda: torch.device, kv: str) -> None:
    from llmconsole.kernels import rope_kv

    tokens, page_size = 300, 16
    qkv = torch.randn(tokens, H + 2 * HKV, D, device=cuda, dtype=torch.bfloat16)
    q, k, v = qkv.split([H, HKV, HKV], dim=1)
    inv_freq = 1.0 / 500000 ** (torch.arange(0, D, 2, device=cuda).float() / D)
    cache = rope_kv.rope_cos_sin_cache(inv_freq, 8192)
    positions = torch.randint(0, 8192, (tokens,), device=cuda)
    kv_slots, num_pages = page_tables([tokens], page_size, torch.Generator().manual_seed(0))
    slots = kv_slots[0].to(cuda)
    k_pool, v_pool = (
        pool.to(KV_DTYPES[kv])
        for pool in random_pool(
            num_pages * page_size, HKV, D, page_size, device=cuda, dtype=torch.bfloat16
        )
    )
    k_ref, v_ref = k_pool.clone(), v_pool.clone()
    want = rope_kv.rope_and_write_kv_ref(q, k, v, positions, cache, k_ref, v_ref, slots)
    got = rope_kv.rope_and_write_kv(q.clone(), k, v, positions, cache, k_pool, v_pool, slots)
    torch.testing.assert_close(got, want)
    if kv == "bf16":
        torch.testing.assert_close(k_pool, k_ref)
        assert torch.equal(v_pool, v_ref)
    else:  # the kernel rounds fp32 to fp8 once, the reference via bf16: one fp8 step apart
        torch.testing.assert_close(k_pool.float(), k_ref.float(), rtol=0.13, atol=2e-3)
        torch.testing.assert_close(v_pool.float(), v_ref.float(), rtol=0.13, atol=2e-3)
        assert k_pool.dtype == torch.float8_e4m3fn


KV_DTYPES = {"bf16": torch.bfloat16, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


@pytest.mark.gpu
@pytest.mark.parametrize("kv", ["bf16", "fp8_e4m3"])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_gpu_decode_attention(cuda: torch.device, batch: int, page_size: int, kv: str) -> None:
    """fp8 pools (--kv-cache-dtype): the kernel widens what it reads; the reference reads the
    same fp8 values, so the bounds are bf16's either way."""
    from llmconsole.kernels import decode_attention as da

    gen = torch.Generator().manual_seed(batch)
    kv_lens = [4096] if batch == 1 else torch.randint(1, 4097, (batch,), generator=gen).tolist()
    kv_slots, num_pages = page_tables(kv_lens, page_size, gen)
    k_pool, v_pool = (
        pool.to(KV_DTYPES[kv])
        for pool in random_pool(
            num_pages * page_size, HKV, D, page_size, device=cuda, dtype=torch.bfloat16
        )
    )
    q = torch.randn(batch, H, D, device=cuda, dtype=torch.bfloat16)
    args = (q, k_pool, v_pool, kv_slots.to(cuda), torch.tensor(kv_lens, device=cuda), D**-0.5)
    got = da.decode_attention(*args)
    want = da.decode_attention_ref(*args)
    assert rel_err(got, want) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("kv", ["bf16", "fp8_e5m2"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_gpu_extend_attention(cuda: torch.device, page_size: int, kv: str) -> None:
    from llmconsole.kernels import extend_attention as ea

    spans = [(0, 1000), (3000, 1096), (17, 1), (512, 300), (0, 5)]
    gen = torch.Generator().manual_seed(page_size)
    kv_slots, num_pages = page_tables([p + e for p, e in spans], page_size, gen)
    k_pool, v_pool = (
        pool.to(KV_DTYPES[kv])
        for pool in random_pool(
            num_pages * page_size, HKV, D, page_size, device=cuda, dtype=torch.bfloat16
        )
    )
    extend = torch.tensor([e for _, e in spans], device=cuda)
    prefix = torch.tensor([p for p, _ in spans], device=cuda)
    q = torch.randn(int(extend.sum()), H, D, device=cuda, dtype=torch.bfloat16)
    args = (q, k_pool, v_pool, kv_slots.to(cuda), prefix, extend, D**-0.5)
    assert rel_err(ea.extend_attention(*args), ea.extend_attention_ref(*args)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize(
    "spans",
    [
        [(int(n), 1) for n in torch.randint(0, 4096, (64,), generator=torch.Generator())],
        [(0, 700), (1500, 64), (90, 1), (2000, 1)],
    ],
    ids=["decode64", "mixed"],
)
def test_gpu_triton_backend_matches_torch(cuda: torch.device, spans: list[tuple[int, int]]) -> None:
    from llmconsole.core.attention.triton_backend import TritonAttention

    inputs, num_pages = step_inputs(spans, 16, torch.Generator().manual_seed(0))
    spec = KVPoolSpec(1, HKV, D, 16, num_pages, torch.bfloat16)
    pools = [KVPool(spec, cuda) for _ in range(2)]
    filler = torch.randn_like(pools[0].k[0])
    for pool in pools:
        pool.k[0].copy_(filler)
        pool.v[0].copy_(filler.flip(0))
    backends = [make_backend("triton", pools[0]), TorchAttention(pools[1])]
    assert isinstance(backends[0], TritonAttention)
    tokens = int(inputs.extend_lens.sum())
    q = torch.randn(tokens, H, D, device=cuda, dtype=torch.bfloat16)
    k = torch.randn(tokens, HKV, D, device=cuda, dtype=torch.bfloat16)
    v = torch.randn(tokens, HKV, D, device=cuda, dtype=torch.bfloat16)
    outs = []
    for backend in backends:
        backend.plan(inputs)
        outs.append(backend.forward(0, q, k, v, D**-0.5))
    assert rel_err(outs[0], outs[1]) < 2e-2
    assert torch.equal(pools[0].k[0], pools[1].k[0])


@pytest.mark.gpu
def test_gpu_engine_with_triton_backend_matches_torch_backend(
    cuda: torch.device, tmp_path: Path
) -> None:
    """The whole engine (chunked prefill, paging, decode) gives the same greedy tokens with
    either backend on a small fp32 Llama: the kernels use IEEE fp32 dots there."""
    from engine_utils import save_random_llama

    from llmconsole.core import Engine, EngineConfig, SamplingParams

    save_random_llama(tmp_path, hidden_size=256, num_heads=8, num_kv_heads=2, seed=None)
    prompts = [[1, 5, 9, 33, 7], [1, *range(40, 340)], [3] * 70]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    tokens = {}
    for backend in ("torch", "triton"):
        cfg = EngineConfig(
            model=str(tmp_path),
            device="cuda",
            dtype="float32",
            attention_backend=backend,
            page_size=4,
            chunked_prefill_size=128,  # the 300-token prompt extends over a cached prefix
            max_total_tokens=4096,
        )
        with Engine(cfg) as engine:
            tokens[backend] = [r.token_ids for r in engine.generate(prompts, params)]
    assert tokens["triton"] == tokens["torch"]


if __name__ == "__main__":  # the child process of `interpreted_results`
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through pytest"
    print(json.dumps(_run_checks_here()))
