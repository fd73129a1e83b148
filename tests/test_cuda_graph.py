"""Decode CUDA graphs: bucket and padding maths and the slot table on CPU; capture and replay
against eager execution on the GPU (`-m gpu`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from engine_utils import save_random_llama
from graph_utils import decode_both_ways

from llmconsole.core import Engine, EngineConfig, SamplingParams
from llmconsole.core.cuda_graph import (
    NUM_INPUTS,
    capture_batch_sizes,
    pad_decode_inputs,
    padded_batch_size,
)
from llmconsole.core.request import Request, RequestState
from llmconsole.core.slot_table import DUMMY_ROW, SlotTable
from llmconsole.core.telemetry import EngineEvent, StepRecord, of_type

# ---- CPU: pure parts ---------------------------------------------------------------------------


def test_buckets_follow_sglang_and_end_at_max_bs() -> None:
    assert capture_batch_sizes(256)[:7] == (1, 2, 4, 8, 16, 24, 32)
    assert capture_batch_sizes(256)[-2:] == (248, 256) and len(capture_batch_sizes(256)) == 35
    assert capture_batch_sizes(32) == (1, 2, 4, 8, 16, 24, 32)
    assert capture_batch_sizes(20) == (1, 2, 4, 8, 16, 20)
    assert capture_batch_sizes(3) == (1, 2, 3)
    assert capture_batch_sizes(1) == (1,)
    with pytest.raises(ValueError):
        capture_batch_sizes(0)


@pytest.mark.parametrize(
    ("batch", "padded"), [(1, 1), (2, 2), (3, 4), (5, 8), (9, 16), (17, 24), (32, 32), (33, None)]
)
def test_a_batch_pads_to_the_next_bucket_or_runs_eager(batch: int, padded: int | None) -> None:
    assert padded_batch_size(batch, capture_batch_sizes(32)) == padded


def test_padding_rows_are_a_dummy_request_on_the_dummy_page() -> None:
    flat = pad_decode_inputs([11, 12], [7, 30], [101, 205], [3, 1], 4)
    ids, pos, slots, rows, kv_lens = flat.view(NUM_INPUTS, 4).tolist()
    assert ids == [11, 12, 0, 0]
    assert pos == [7, 30, 0, 0]
    assert slots == [101, 205, 0, 0]  # slot 0: the dummy page, never a request's
    assert rows == [3, 1, DUMMY_ROW, DUMMY_ROW]
    assert kv_lens == [8, 31, 1, 1]  # a decode token sees itself and every earlier one
    assert pad_decode_inputs([5], [0], [9], [2], 1).tolist() == [5, 0, 9, 2, 1]
    with pytest.raises(ValueError):
        pad_decode_inputs([1, 2, 3], [0, 0, 0], [1, 2, 3], [1, 2, 3], 2)


def _request(rid: str) -> Request:
    return Request(rid, [1, 2, 3], SamplingParams(max_tokens=4), 4)


def test_slot_table_rows_are_kept_while_running_and_reclaimed_after() -> None:
    table = SlotTable(num_requests=2, width=8, device=torch.device("cpu"))
    a, b, c = _request("a"), _request("b"), _request("c")
    for req in (a, b, c):
        req.state = RequestState.RUNNING
    row_a, row_b = table.row(a), table.row(b)
    assert sorted([row_a, row_b]) == [1, 2] and table.row(a) == row_a  # row 0 is the dummy's
    with pytest.raises(RuntimeError, match="more than 2 running requests"):
        table.row(c)
    a.state = RequestState.FINISHED
    assert table.row(c) == row_a  # a finished request's row is handed on
    b.state = RequestState.WAITING  # retracted: it restarts at position 0 in whatever row
    d = _request("d")
    assert table.row(d) == row_b
    table.write(torch.tensor([row_b, row_b]), torch.tensor([0, 1]), torch.tensor([40, 41]))
    assert table.table[row_b, :3].tolist() == [40, 41, 0]
    assert table.table[DUMMY_ROW].eq(0).all()


def test_cpu_steps_report_no_cuda_graph(engine: Engine) -> None:
    """CPU: no graphs are captured and every step says so, with its real batch size."""
    since = max((r.step_id for r in of_type(engine.telemetry.snapshot(), StepRecord)), default=-1)
    engine.generate([[1, 5, 9], [1, 7, 7, 7]], SamplingParams(max_tokens=4, ignore_eos=True))
    steps = [r for r in of_type(engine.telemetry.snapshot(), StepRecord) if r.step_id > since]
    assert steps and all(not s.cuda_graph for s in steps)
    assert all(s.padded_bs == s.batch_size for s in steps)
    assert engine.runner.graphs is None
    assert "CUDA device" in (engine.runner.cuda_graph_unsupported() or "")


# ---- GPU: capture and replay -------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random fp32 Llama with Llama-3-like attention (GQA 4, head dim 64), saved once."""
    path = tmp_path_factory.mktemp("small-llama")
    save_random_llama(path, hidden_size=256)
    return path


def _config(path: Path, **kw: object) -> EngineConfig:
    base = dict(model=str(path), device="cuda", dtype="float32", max_total_tokens=16384)
    return EngineConfig(**{**base, **kw})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def graph_engine(small_llama: Path) -> Iterator[Engine]:
    with Engine(_config(small_llama, cuda_graph_max_bs=16, page_size=4)) as engine:
        yield engine


def _prompts(count: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 300, (count,), generator=gen).tolist()
    return [torch.randint(0, 512, (n,), generator=gen).tolist() for n in lengths]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("batch", [1, 3, 8, 11, 16, 19])
def test_gpu_replay_equals_eager_logits_in_every_bucket(graph_engine: Engine, batch: int) -> None:
    """One decode batch through the engine's runner (its loop is idle meanwhile), from its graph
    and eagerly: the real rows' logits agree, padded rows are cut off, and above the largest
    bucket the "graph" step runs eager and says so."""
    runner = graph_engine.runner
    assert runner.graphs is not None and runner.graphs.batch_sizes == (1, 2, 4, 8, 16)
    both = decode_both_ways(graph_engine, _prompts(batch, seed=batch), f"g{batch}")
    graph_out, eager_out = both.graph, both.eager
    graph_logits, eager_logits = both.graph_logits, both.eager_logits
    assert graph_logits.shape == eager_logits.shape == (batch, 512)
    # At batch 1 the graph's projections run our GEMV and eager ones cuBLAS: the same fp32 sums
    # in another order, so activations may part by a bf16 rounding step. Elsewhere both sides
    # run the same kernels.
    tol = 2e-2 if batch == 1 else 1e-4
    torch.testing.assert_close(graph_logits, eager_logits, rtol=tol, atol=tol)
    assert graph_out.tokens == eager_out.tokens
    assert not eager_out.cuda_graph and eager_out.padded_bs == batch
    if batch <= 16:
        expected = padded_batch_size(batch, (1, 2, 4, 8, 16))
        assert graph_out.cuda_graph and graph_out.padded_bs == expected
    else:
        assert not graph_out.cuda_graph and graph_out.padded_bs == batch


@pytest.mark.gpu
@needs_gpu
def test_gpu_greedy_tokens_identical_with_and_without_graphs(small_llama: Path) -> None:
    prompts = _prompts(12, seed=7)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    tokens = {}
    for disable in (False, True):
        with Engine(_config(small_llama, disable_cuda_graph=disable)) as engine:
            assert engine.config.attention_backend == "triton"
            assert (engine.runner.graphs is None) == disable
            tokens[disable] = [r.token_ids for r in engine.generate(prompts, params)]
            steps = [s for s in of_type(engine.telemetry.snapshot(), StepRecord)]
            decode = [s for s in steps if s.kind == "decode"]
            assert decode and all(s.cuda_graph != disable for s in decode)
            assert all(not s.cuda_graph for s in steps if s.kind == "prefill")
    assert tokens[False] == tokens[True]


@pytest.mark.gpu
@needs_gpu
def test_gpu_batch_above_max_bs_runs_eager_and_telemetry_says_so(small_llama: Path) -> None:
    """--cuda-graph-max-bs 32: a decode batch of 40 runs eager, one of 3 pads to the 4-bucket."""
    seen: list[tuple[str, float]] = []
    config = _config(small_llama, cuda_graph_max_bs=32)
    with Engine(config, progress=lambda stage, f: seen.append((stage, f))) as engine:
        [event] = [e for e in of_type(engine.telemetry.snapshot(), EngineEvent)
                   if e.kind == "cuda_graph"]  # fmt: skip
        assert event.data["batch_sizes"] == [1, 2, 4, 8, 16, 24, 32]
        assert "captured 7 decode CUDA graphs" in event.message
        assert ("capturing CUDA graphs", 1.0) in seen
        params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        engine.generate(_prompts(40, seed=1), params)
        engine.generate(_prompts(3, seed=2), params)
        decode = [s for s in of_type(engine.telemetry.snapshot(), StepRecord) if s.kind == "decode"]
        big = [s for s in decode if s.batch_size == 40]
        small = [s for s in decode if s.batch_size == 3]
        assert big and all(not s.cuda_graph and s.padded_bs == 40 for s in big)
        assert small and all(s.cuda_graph and s.padded_bs == 4 for s in small)
        engine.check_integrity()
    assert engine.runner.graphs is None  # shutdown let the graphs' memory go
