"""The FlashInfer backends (`flashinfer`, `fa3`): flag errors, `auto` and the paged-layout maths on
CPU (no flashinfer needed); on the GPU (`-m gpu`) each against the torch reference on random
inputs, graph replay against eager, and the whole engine's greedy tokens across backends."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from engine_utils import save_random_llama
from graph_utils import decode_both_ways

from llmconsole.core.attention import AttentionInputs, TorchAttention, make_backend
from llmconsole.core.attention.flashinfer_backend import paged_layout, use_tensor_core_decode
from llmconsole.core.config import ConfigError, EngineConfig, auto_attention_backend
from llmconsole.core.kv_cache import KVPool, KVPoolSpec
from llmconsole.core.telemetry import StepRecord, of_type
from llmconsole.kernels.page_indices import page_indices_ref

# ---- CPU: flags, auto, layout ------------------------------------------------------------------


def _pool(dtype: torch.dtype = torch.bfloat16, head_dim: int = 64) -> KVPool:
    return KVPool(KVPoolSpec(1, 2, head_dim, 1, 4, dtype), torch.device("cpu"))


@pytest.mark.parametrize("name", ["flashinfer", "fa3"])
def test_flashinfer_on_cpu_is_a_clear_config_error(name: str) -> None:
    with pytest.raises(ConfigError, match=f"--attention-backend {name} needs a CUDA device"):
        make_backend(name, _pool())


def _pretend_cuda(pool: KVPool) -> KVPool:
    """The checks that come before any CUDA call, on a CPU pool posing as a CUDA one."""
    pool.device = torch.device("cuda")
    return pool


def test_flashinfer_refuses_float32_and_odd_head_dims_naming_the_flag() -> None:
    with pytest.raises(ConfigError, match="flashinfer needs --dtype bfloat16 or float16"):
        make_backend("flashinfer", _pretend_cuda(_pool(torch.float32)))
    with pytest.raises(ConfigError, match="fa3 supports head dims 64, 128 and 256, not 96"):
        make_backend("fa3", _pretend_cuda(_pool(head_dim=96)))


def test_fa3_off_hopper_is_a_clear_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ConfigError, match=r"fa3 needs a Hopper GPU.*A100 is SM80"):
        make_backend("fa3", _pretend_cuda(_pool()))


def test_missing_flashinfer_is_a_clear_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "flashinfer", None)  # `import flashinfer` raises
    with pytest.raises(ConfigError, match="flashinfer needs the flashinfer package"):
        make_backend("flashinfer", _pretend_cuda(_pool()))


def test_core_imports_without_flashinfer() -> None:
    code = (
        "import sys; sys.modules['flashinfer'] = None; "
        "import llmconsole.core, llmconsole.core.attention.flashinfer_backend"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_auto_is_flashinfer_on_cuda_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    installed = {"flashinfer", "triton"}

    def find_spec(name: str, *args: object) -> object:
        if name in ("flashinfer", "triton"):
            return object() if name in installed else None
        return real(name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert EngineConfig().resolve("cpu").attention_backend == "torch"
    assert auto_attention_backend("cpu") == "torch"
    assert EngineConfig().resolve("cuda", 79.2).attention_backend == "flashinfer"
    assert auto_attention_backend("cuda", "float16") == "flashinfer"
    assert auto_attention_backend("cuda", "float32") == "triton"  # FlashInfer has no fp32
    installed.discard("flashinfer")
    assert auto_attention_backend("cuda") == "triton"
    installed.discard("triton")
    assert auto_attention_backend("cuda") == "torch"


def test_paged_layout_indptr_and_last_page_len() -> None:
    indptr, last = paged_layout(torch.tensor([1, 4, 5, 9]), 4)
    assert indptr.tolist() == [0, 1, 2, 4, 7] and last.tolist() == [1, 4, 1, 1]
    indptr, last = paged_layout(torch.tensor([3, 1]), 1)  # page_size 1: a page per token
    assert indptr.tolist() == [0, 3, 4] and last.tolist() == [1, 1]
    assert indptr.dtype == last.dtype == torch.int32  # what FlashInfer's plan insists on


def test_page_ids_are_every_page_size_th_slot_over_page_size() -> None:
    # Row 1: pages 7 then 3 (slots 28..31, 12..); row 2: the dummy row's zeros.
    slots = torch.tensor([[0] * 8, [28, 29, 30, 31, 12, 13, 0, 0], [0] * 8])
    rows = torch.tensor([1, 2])
    assert page_indices_ref(slots, rows, torch.tensor([6, 1]), 4).tolist() == [7, 3, 0]
    ids = page_indices_ref(slots, None, torch.tensor([2, 5]), 1)
    assert ids.tolist() == [0, 0, 28, 29, 30, 31, 12] and ids.dtype == torch.int32


def test_tensor_core_decode_follows_sglang_rule() -> None:
    assert use_tensor_core_decode(32, 8) and not use_tensor_core_decode(16, 8)


# ---- GPU: kernels against the torch reference --------------------------------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
H, HKV, D = 32, 8, 128  # Llama-3-8B's attention


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


NEEDS_HOPPER = pytest.mark.skipif(not _hopper(), reason="fa3 needs an SM90 GPU")
BACKENDS = ["flashinfer", pytest.param("fa3", marks=NEEDS_HOPPER)]


def _step(
    spans: list[tuple[int, int]], page_size: int, gen: torch.Generator
) -> tuple[AttentionInputs, int]:
    """AttentionInputs for (prefix_len, extend_len) requests over shuffled pages, as the runner
    builds them, and the number of pages the pool needs (page 0 is the dummy page)."""
    kv_lens = [p + e for p, e in spans]
    pages_each = [-(-n // page_size) for n in kv_lens]
    num_pages = 1 + sum(pages_each) + 3
    order = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
    kv_slots = torch.zeros(len(spans), max(kv_lens), dtype=torch.int64)
    for i, (n, count) in enumerate(zip(kv_lens, pages_each, strict=True)):
        pages = torch.tensor([order.pop() for _ in range(count)])
        kv_slots[i, :n] = (pages[:, None] * page_size + torch.arange(page_size)).reshape(-1)[:n]
    inputs = AttentionInputs(
        prefix_lens=torch.tensor([p for p, _ in spans]),
        extend_lens=torch.tensor([e for _, e in spans]),
        kv_slots=kv_slots.cuda(),  # the runner hands them over on the device
        write_slots=torch.cat([kv_slots[i, p : p + e] for i, (p, e) in enumerate(spans)]).cuda(),
        is_decode=all(e == 1 for _, e in spans),
    )
    return inputs, num_pages


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("page_size", [1, 16])
def test_gpu_page_indices_match_reference(page_size: int) -> None:
    from llmconsole.kernels.page_indices import page_indices

    gen = torch.Generator().manual_seed(page_size)
    kv_lens = torch.randint(1, 3000, (37,), generator=gen)
    inputs, _ = _step([(int(n) - 1, 1) for n in kv_lens], page_size, gen)
    table = torch.cat([torch.zeros_like(inputs.kv_slots[:1]), inputs.kv_slots])  # row 0: dummy
    rows = torch.randperm(37, generator=gen) + 1
    table[rows] = inputs.kv_slots.clone()
    indptr, _ = paged_layout(kv_lens, page_size)
    out = torch.full((int(indptr[-1]),), -1, dtype=torch.int32, device="cuda")
    page_indices(table, rows.cuda(), kv_lens.cuda(), indptr.cuda(), page_size, out)
    assert torch.equal(out.cpu(), page_indices_ref(table.cpu(), rows, kv_lens, page_size))
    page_indices(inputs.kv_slots, None, kv_lens.cuda(), indptr.cuda(), page_size, out)
    want = page_indices_ref(inputs.kv_slots.cpu(), None, kv_lens, page_size)
    assert torch.equal(out.cpu(), want)


DECODE_MIXED = [(int(n), 1) for n in torch.randint(0, 4096, (64,), generator=torch.Generator())]
SPANS = {
    "decode64": DECODE_MIXED,
    "decode1": [(4095, 1)],
    "extend": [(0, 700), (1500, 64), (90, 1), (2000, 1), (13, 29)],
}


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("case", list(SPANS))
@pytest.mark.parametrize("heads", [(H, HKV), (16, 8)], ids=["gqa4", "gqa2"])
def test_gpu_backend_matches_torch(
    backend: str, page_size: int, case: str, heads: tuple[int, int]
) -> None:
    num_heads, kv_heads = heads
    inputs, num_pages = _step(SPANS[case], page_size, torch.Generator().manual_seed(1))
    spec = KVPoolSpec(2, kv_heads, D, page_size, num_pages, torch.bfloat16)
    pools = [KVPool(spec, torch.device("cuda")) for _ in range(2)]
    for layer in (0, 1):
        k = torch.randn_like(pools[0].k[layer])
        v = torch.randn_like(pools[0].v[layer])
        for pool in pools:
            pool.k[layer].copy_(k)
            pool.v[layer].copy_(v)
    attn, ref = make_backend(backend, pools[0]), TorchAttention(pools[1])
    tokens = int(inputs.extend_lens.sum())
    for step in range(2):  # the second step plans with the head count already known
        for b in (attn, ref):
            b.plan(inputs)
        for layer in (0, 1):
            q = torch.randn(tokens, num_heads, D, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(tokens, kv_heads, D, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(tokens, kv_heads, D, device="cuda", dtype=torch.bfloat16)
            scale = D**-0.5 if step == 0 else 0.05  # a non-default scale goes through q_scale
            got = attn.forward(layer, q, k, v, scale)
            want = ref.forward(layer, q, k, v, scale)
            assert got.shape == want.shape == (tokens, num_heads, D)
            assert _rel_err(got, want) < 2e-2, (case, layer)
            assert torch.equal(pools[0].k[layer], pools[1].k[layer])


# ---- GPU: engines ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random bf16 Llama with Llama-3's head dim (128) and GQA group (4), saved once."""
    path = tmp_path_factory.mktemp("tiny-llama-128")
    save_random_llama(path, hidden_size=512, max_positions=2048, dtype=torch.bfloat16)
    return path


def _config(path: Path, **kw: object) -> EngineConfig:
    base = dict(model=str(path), device="cuda", dtype="bfloat16", max_total_tokens=32768)
    return EngineConfig(**{**base, **kw})  # type: ignore[arg-type]


def _prompts(count: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 400, (count,), generator=gen).tolist()
    return [torch.randint(0, 512, (n,), generator=gen).tolist() for n in lengths]


GREEDY = {"max_tokens": 16, "temperature": 0, "ignore_eos": True, "logprobs": 2}
NEAR_TIE = 0.25  # logprob gap under which bf16 rounding may pick either of the top two


def _generate(path: Path, backend: str, page_size: int) -> tuple[list[object], list[StepRecord]]:
    """12 requests, then 5, with --cuda-graph-max-bs 8: greedy results and the decode steps."""
    from llmconsole.core import Engine, SamplingParams

    params = SamplingParams(**GREEDY)  # type: ignore[arg-type]
    cfg = _config(
        path,
        attention_backend=backend,
        page_size=page_size,
        cuda_graph_max_bs=8,
        chunked_prefill_size=256,  # long prompts extend over their own cached prefix
    )
    with Engine(cfg) as engine:
        out = engine.generate(_prompts(12, seed=1), params)
        out += engine.generate(_prompts(5, seed=2), params)
        steps = [s for s in of_type(engine.telemetry.snapshot(), StepRecord) if s.kind == "decode"]
        assert (engine.runner.graphs is not None) == (backend != "torch")
        engine.check_integrity()
    return out, steps


@pytest.fixture(scope="module")
def torch_results(tiny_llama: Path) -> list[object]:
    return _generate(tiny_llama, "torch", 1)[0]


def _compare_greedy(got: list[object], want: list[object]) -> tuple[float, list[float]]:
    """(share of tokens before each sequence's first disagreement, the top-2 logprob gaps where
    sequences part). Kernels that round bf16 differently may flip a near-tie, after which a
    greedy sequence goes its own way; a wrong kernel parts sequences at clear winners."""
    same, gaps = 0, []
    for a, b in zip(got, want, strict=True):
        ids_a, ids_b = a.token_ids, b.token_ids  # type: ignore[attr-defined]
        n = 0
        while n < len(ids_b) and n < len(ids_a) and ids_a[n] == ids_b[n]:
            n += 1
        same += n
        if n < len(ids_b):
            for r in (a, b):  # each side's own view of the position where they part
                top = r.logprobs[n].top  # type: ignore[attr-defined]
                gaps.append(top[0][1] - top[1][1])
    return same / sum(len(b.token_ids) for b in want), gaps  # type: ignore[attr-defined]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize(
    ("backend", "page_size"),
    [
        ("triton", 1),
        ("flashinfer", 1),
        ("flashinfer", 4),
        pytest.param("fa3", 1, marks=NEEDS_HOPPER),
    ],
)
def test_gpu_greedy_tokens_match_torch_with_graphs(
    tiny_llama: Path, torch_results: list[object], backend: str, page_size: int
) -> None:
    """With CUDA graphs on, each backend's greedy tokens follow the torch reference's (bf16: a
    sequence may part from it only at a near-tie); the batch of 12 (above --cuda-graph-max-bs
    8) decodes eager, the batch of 5 replays the 8-bucket."""
    results, steps = _generate(tiny_llama, backend, page_size)
    eager = [s for s in steps if s.batch_size == 12]
    graph = [s for s in steps if s.batch_size == 5]
    assert eager and all(not s.cuda_graph and s.padded_bs == 12 for s in eager)
    assert graph and all(s.cuda_graph and s.padded_bs == 8 for s in graph)
    agreement, gaps = _compare_greedy(results, torch_results)
    assert agreement >= 0.6, f"{backend} page {page_size}: {agreement:.0%} of tokens agree"
    assert all(gap < NEAR_TIE for gap in gaps), f"parted at clear winners: {gaps}"


@pytest.fixture(scope="module")
def flashinfer_engine(tiny_llama: Path) -> Iterator[object]:
    from llmconsole.core import Engine

    with Engine(_config(tiny_llama, attention_backend="flashinfer", cuda_graph_max_bs=16)) as eng:
        yield eng


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("batch", [1, 3, 16, 19])
def test_gpu_flashinfer_replay_equals_eager_logits(flashinfer_engine: object, batch: int) -> None:
    """One decode batch through the runner from its graph and eagerly: the same logits (bf16
    bounds), the padded rows cut off, and above the largest bucket the step runs eager."""
    from llmconsole.core import Engine

    assert isinstance(flashinfer_engine, Engine)
    runner = flashinfer_engine.runner
    assert runner.graphs is not None and runner.graphs.max_bs == 16
    both = decode_both_ways(flashinfer_engine, _prompts(batch, seed=batch), f"fi{batch}")
    graph_out, eager_out = both.graph, both.eager
    graph_logits, eager_logits = both.graph_logits, both.eager_logits
    assert graph_logits.shape == eager_logits.shape == (batch, 512)
    assert _rel_err(graph_logits, eager_logits) < 1e-2
    assert graph_out.cuda_graph == (batch <= 16) and not eager_out.cuda_graph


def _shared_prefix_run(path: Path, backend: str, page_size: int, cache: bool) -> list[object]:
    """Six prompts behind one 300-token prefix, then three of them again."""
    from llmconsole.core import Engine, SamplingParams

    gen = torch.Generator().manual_seed(5)
    prefix = torch.randint(0, 512, (300,), generator=gen).tolist()
    prompts = [prefix + torch.randint(0, 512, (n,), generator=gen).tolist() for n in (3, 40, 90)]
    prompts += [p[:-1] for p in prompts]
    params = SamplingParams(**GREEDY)  # type: ignore[arg-type]
    cfg = _config(
        path, attention_backend=backend, page_size=page_size, disable_radix_cache=not cache
    )
    with Engine(cfg) as engine:
        out = engine.generate(prompts, params) + engine.generate(prompts[:3], params)
        engine.check_integrity()
        assert engine.flush_cache() > 0 if cache else engine.flush_cache() == 0
    return out


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize(("backend", "page_size"), [("triton", 1), ("flashinfer", 16)])
def test_gpu_prefix_cache_hits_follow_computed_prefixes(
    tiny_llama: Path, backend: str, page_size: int
) -> None:
    """Prefill over a prefix read from the cache (the extend kernels with a long cached part,
    whole pages only) gives the greedy tokens of computing it (up to bf16 near-ties)."""
    want = _shared_prefix_run(tiny_llama, backend, page_size, cache=False)
    got = _shared_prefix_run(tiny_llama, backend, page_size, cache=True)
    cached = [r.usage.cached_tokens for r in got]  # type: ignore[attr-defined]
    aligned = 300 // page_size * page_size
    assert cached[0] == 0 and all(c >= aligned for c in cached[1:6]), cached
    assert all(c % page_size == 0 for c in cached)
    agreement, gaps = _compare_greedy(got, want)
    assert agreement >= 0.8, f"{backend}: {agreement:.0%} of tokens agree"
    assert all(gap < NEAR_TIE for gap in gaps), f"parted at clear winners: {gaps}"
