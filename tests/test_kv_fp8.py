"""--kv-cache-dtype fp8_e4m3 / fp8_e5m2: the KV pool holds one byte per element (twice the tokens
of bf16 in the same memory), attention widens it as it reads, outputs stay close to the
full-precision pool's, and the flag is refused where the kernels cannot read fp8."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from eagle_utils import count_kv_moves
from engine_utils import wait_idle

from llmconsole.core import Engine, EngineConfig, SamplingParams
from llmconsole.core.config import ConfigError
from llmconsole.core.kv_cache import KVPool, KVPoolSpec

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time",
    "List the planets of the solar system:",
    "Water boils at",
]
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def _agreement(got: list[list[int]], want: list[list[int]]) -> float:
    """Share of tokens before each sequence's first disagreement (greedy paths part for good
    once one token differs)."""
    same = 0
    for a, b in zip(got, want, strict=True):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        same += n
    return same / sum(len(b) for b in want)


@pytest.fixture(scope="module")
def full_precision(engine: Engine) -> list[list[int]]:
    return [r.token_ids for r in engine.generate(PROMPTS, GREEDY)]


@pytest.fixture(scope="module")
def fp8_engine() -> Iterator[Engine]:
    with Engine(EngineConfig(kv_cache_dtype="fp8_e4m3")) as eng:
        yield eng


def test_fp8_pool_holds_one_byte_per_element_and_stays_close(
    fp8_engine: Engine, full_precision: list[list[int]]
) -> None:
    pool = fp8_engine.pool
    assert all(buf.dtype == torch.float8_e4m3fn for buf in (*pool.k, *pool.v))
    assert pool.spec.bytes_per_page == 2 * 30 * 3 * 64  # layers x kv heads x head dim, 1 byte
    got = [r.token_ids for r in fp8_engine.generate(PROMPTS, GREEDY)]
    assert _agreement(got, full_precision) >= 0.75
    wait_idle(fp8_engine)
    fp8_engine.check_integrity()


def test_fp8_e5m2_serves_with_chunked_prefill_and_retraction() -> None:
    """Fewer mantissa bits (e5m2): still a working engine under chunking and a pool too small
    for every request at once; nothing is lost and every page comes back."""
    config = EngineConfig(kv_cache_dtype="fp8_e5m2", chunked_prefill_size=8, max_total_tokens=96)
    with Engine(config) as eng:
        assert eng.pool.k[0].dtype == torch.float8_e5m2
        results = eng.generate(PROMPTS, GREEDY)
        assert [len(r.token_ids) for r in results] == [24] * len(PROMPTS)
        assert all(r.finish_reason == "length" for r in results)
        wait_idle(eng)
        eng.check_integrity()


def test_same_memory_holds_twice_the_tokens_of_bf16() -> None:
    budget = 1 << 30
    shape = dict(num_layers=32, num_kv_heads=8, head_dim=128, page_size=16)
    bf16 = KVPoolSpec.for_budget(**shape, dtype=torch.bfloat16, max_bytes=budget)
    fp8 = KVPoolSpec.for_budget(**shape, dtype=torch.float8_e4m3fn, max_bytes=budget)
    assert fp8.num_pages == 2 * bf16.num_pages  # pages of the budget, the dummy page included


def test_flashinfer_with_fp8_kv_is_refused_and_auto_picks_triton() -> None:
    with pytest.raises(ConfigError, match="--kv-cache-dtype fp8_e4m3 needs --attention-backend"):
        EngineConfig(kv_cache_dtype="fp8_e4m3", attention_backend="flashinfer")
    with pytest.raises(ConfigError, match="--kv-cache-dtype must be one of auto, fp8_e4m3"):
        EngineConfig(kv_cache_dtype="int4")
    resolved = EngineConfig(kv_cache_dtype="fp8_e4m3").resolve("cuda", 80)
    assert resolved.attention_backend in ("triton", "torch")
    assert EngineConfig().resolve("cpu").attention_backend == "torch"


def test_switching_to_fp8_live_re_prefills_requests_in_flight(engine: Engine) -> None:
    """A KV-layout change: the pool is rebuilt in fp8 and running requests are re-prefilled
    into it, keeping what they generated."""
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    handles = [engine.submit(p, params) for p in PROMPTS[:3]]
    first = [len(h.get(timeout=60).token_ids) for h in handles]  # each has started decoding
    try:
        result = engine.restart({"kv_cache_dtype": "fp8_e4m3"})
        assert result.mode == "rebuild" and not result.kv_kept
        assert engine.pool.k[0].dtype == torch.float8_e4m3fn
        done = [h.result() for h in handles]
        assert [n + len(r.token_ids) for n, r in zip(first, done, strict=True)] == [48] * 3
        assert all(r.finish_reason == "length" for r in done)
    finally:
        engine.restart({"kv_cache_dtype": "auto"})
    assert engine.pool.k[0].dtype == torch.float32
    wait_idle(engine)
    engine.check_integrity()


# ---- GPU: our Triton kernels read the fp8 pool inside CUDA graphs ------------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


NEAR_TIE = 0.25  # logprob gap under which bf16 rounding may pick either of the top two


@pytest.mark.gpu
@needs_gpu
def test_gpu_triton_graphs_read_the_fp8_pool_like_the_torch_reference(
    tiny_bf16_llama: Path,
) -> None:
    """Both backends read the same fp8 KV (on CUDA the fused rope kernel writes it for either),
    the Triton one from decode CUDA graphs: greedy paths may part only at near-ties. (How
    close fp8 stays to a full-precision pool is a property of the model; a random one has
    near-flat logits, so that is checked on the real default model, on CPU.)"""
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 512, (int(n),), generator=gen).tolist()
               for n in torch.randint(1, 400, (10,), generator=gen)]  # fmt: skip
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=2)
    results = {}
    for backend in ("torch", "triton"):
        config = EngineConfig(
            model=str(tiny_bf16_llama),
            device="cuda",
            dtype="bfloat16",
            attention_backend=backend,
            cuda_graph_max_bs=8,
            max_total_tokens=16384,
            kv_cache_dtype="fp8_e4m3",
        )
        with Engine(config) as eng:
            assert eng.pool.k[0].dtype == torch.float8_e4m3fn
            assert (eng.runner.graphs is not None) == (backend == "triton")
            results[backend] = eng.generate(prompts, params)
            wait_idle(eng)
            eng.check_integrity()
    got, want = results["triton"], results["torch"]
    assert _agreement([r.token_ids for r in got], [r.token_ids for r in want]) >= 0.6
    for a, b in zip(got, want, strict=True):
        n = next(
            (i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=True)) if x != y),
            None,
        )
        if n is not None:  # where they part, each side's top two were nearly tied
            for r in (a, b):
                top = r.logprobs[n].top
                assert top[0][1] - top[1][1] < NEAR_TIE, f"parted at a clear winner: {top}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e4m3fn, torch.float8_e5m2])
def test_copy_slots_moves_kv_bytes_exactly(dtype: torch.dtype) -> None:
    pool = KVPool(KVPoolSpec(2, 3, 8, 4, 6, dtype), torch.device("cpu"))
    for buf in (*pool.k, *pool.v):
        buf.copy_(torch.randn(buf.shape).to(dtype))
    before = [buf.clone() for buf in (*pool.k, *pool.v)]
    src, dst = torch.tensor([5, 9, 13]), torch.tensor([9, 20, 21])  # 9 is read, then written
    pool.copy_slots(src, dst)
    for old, new in zip(before, (*pool.k, *pool.v), strict=True):
        raw_old, raw_new = old.view(torch.uint8), new.view(torch.uint8)
        assert torch.equal(raw_new[dst], raw_old[src])
        keep = torch.ones(len(old), dtype=torch.bool)
        keep[dst] = False
        assert torch.equal(raw_new[keep], raw_old[keep])


def test_eagle_trees_on_an_fp8_pool_move_side_branches(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Accepted side branches have their KV moved to their new slots (byte copies, which CPU
    has no fp8 kernel for otherwise). The tree follows the fp8 pool's own plain greedy text:
    fp8 rounds the K/V a verify pass computes where a decode pass would, and a last-bit
    difference can land on either side of an fp8 step, so near-ties may part."""
    from test_spec_eagle import _echo_head

    moved = count_kv_moves(monkeypatch)
    plain = EngineConfig(kv_cache_dtype="fp8_e4m3")
    head = _echo_head(tmp_path / "echo", engine.loaded.model_config)
    tree = plain.replace(
        speculative_algorithm="eagle",
        speculative_draft_model_path=str(head),
        speculative_eagle_topk=3,
        speculative_num_steps=3,
        speculative_num_draft_tokens=6,
    )
    results = {}
    for name, config in (("plain", plain), ("tree", tree)):
        with Engine(config) as eng:
            results[name] = [r.token_ids for r in eng.generate(PROMPTS, GREEDY)]
            wait_idle(eng)
            eng.check_integrity()
    assert sum(moved) > 0, "no side branch was accepted: the fp8 KV move went untested"
    assert _agreement(results["tree"], results["plain"]) >= 0.75
