"""`llmconsole bench one-batch` (SGLang's bench_one_batch): the model runner alone, no engine loop.

For every batch size: one prefill of batch x input-len tokens (in --chunked-prefill-size chunks),
then decode steps alternating between the captured CUDA graph and eager execution, in the same
process on the same requests, so the graph speed-up is a ratio measured side by side. A step is
timed from the runner's call to its one host sync (inputs, forward, sampling); scheduling is
not. Its host part, the time to queue the step (`ModelRunner.launch`), is timed as well: where it
is most of the step, the step is bound by kernel launches, the part a CUDA graph removes. On
CUDA the prefill's FLOP rate is set against a bf16 matmul measured in the same process.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import typer
from rich.console import Console
from rich.table import Table

from llmconsole.core.attention import make_backend
from llmconsole.core.bandwidth import copy_rate
from llmconsole.core.config import EngineConfig
from llmconsole.core.kv_cache import KVPool, PageAllocator
from llmconsole.core.model_loader import LoadedModel, gpu_memory_gb, load_model, pick_device
from llmconsole.core.pool_sizing import kv_pool_spec
from llmconsole.core.read_bytes import StepReads, kv_bytes_per_position
from llmconsole.core.request import Request
from llmconsole.core.runner import ModelRunner, StepOutput
from llmconsole.core.sampling_params import SamplingParams
from llmconsole.core.scheduler import ScheduledBatch, Scheduler
from llmconsole.core.spec.chain_verify import verify_chain

from .bench_common import (
    append_jsonl,
    check_min,
    err,
    fail,
    json_rows,
    machine_info,
    read_cell,
)

BATCH_SIZES = typer.Option(
    [1, 8, 32], "--batch-size", help="batch sizes (SGLang style: --batch-size 1 8 32)"
)


@dataclass(frozen=True)
class OneBatchResult:
    batch_size: int
    input_len: int
    output_len: int
    prefill_s: float
    prefill_tok_s: float
    prefill_tflops: float
    eager_step_ms: float  # median decode step
    eager_tok_s: float
    graph_step_ms: float | None  # None: no CUDA graphs here (CPU, --disable-cuda-graph, ...)
    graph_tok_s: float | None
    cuda_graph: bool  # the "graph" steps really replayed a graph (False above the max bucket)
    padded_bs: int
    # bytes a decode step reads at least (weights + attended KV; core/read_bytes), median step
    decode_bytes: int = 0
    # speculative verify pass with k tokens per request (the last token + k - 1 drafts):
    # k -> (median ms, replayed a graph)
    verify: dict[int, tuple[float, bool]] = field(default_factory=dict)
    # median host time to queue a decode step (ModelRunner.launch), before its host sync; on a
    # CPU the step's compute runs inside it, so there it is nearly the whole step
    eager_launch_ms: float = 0.0
    graph_launch_ms: float | None = None


class Runtime:
    """What Engine._build_runtime makes, driven from this thread (no engine loop, no API)."""

    def __init__(self, config: EngineConfig, max_batch: int) -> None:
        device = pick_device(config.device)
        self.copy_rate = copy_rate(device)  # as the engine does: before the weights and pool
        running = max(config.max_running_requests or 0, max_batch)
        self.config = config.replace(max_running_requests=running).resolve(
            device.type, gpu_memory_gb(device)
        )
        self.loaded: LoadedModel = load_model(self.config)
        spec = kv_pool_spec(self.config, self.loaded)
        self.pool = KVPool(spec, device)
        self.allocator = PageAllocator(spec.num_pages)
        self.scheduler = Scheduler(
            self.allocator, spec.page_size, running, self.config.chunked_prefill_size
        )
        mc = self.loaded.model_config
        self.max_request_tokens = min(
            self.config.context_length or mc.max_position_embeddings,
            mc.max_position_embeddings,
            self.scheduler.capacity_tokens,
        )
        attention = make_backend(self.config.attention_backend, self.pool)
        self.runner = ModelRunner(
            self.loaded.model, self.pool, attention, device, running, self.max_request_tokens
        )
        self.graph_note = self.runner.cuda_graph_unsupported()
        if self.config.disable_cuda_graph or not self.config.cuda_graph_max_bs:
            self.graph_note = self.graph_note or "--disable-cuda-graph"
        if self.graph_note is None:
            assert self.config.cuda_graph_max_bs is not None
            report = self.runner.capture_cuda_graphs(min(self.config.cuda_graph_max_bs, running))
            self.graph_note = (
                f"{len(report.batch_sizes)} CUDA graphs up to batch {report.batch_sizes[-1]}, "
                f"captured in {report.seconds:.1f} s"
            )

    @property
    def has_graphs(self) -> bool:
        return self.runner.graphs is not None

    def step(
        self, batch: ScheduledBatch, use_cuda_graph: bool = True
    ) -> tuple[StepOutput, float, float]:
        """Run one step: (its output, seconds to its host sync, seconds to queue it)."""
        with torch.inference_mode():  # as ModelRunner.forward, which is launch + collect
            started = time.perf_counter()
            pending = self.runner.launch(batch, use_cuda_graph)
            queued = time.perf_counter() - started
            out = self.runner.collect(pending)  # returns after the step's one host sync
            seconds = time.perf_counter() - started
        for chunk, token in zip(batch.chunks, out.tokens, strict=True):
            chunk.req.num_computed = chunk.end
            if token is not None:
                chunk.req.output_ids.append(token)
        return out, seconds, queued


def prefill_flops(runtime: Runtime, batch_size: int, input_len: int) -> float:
    """Matmul FLOPs of one fresh prefill of batch x input_len tokens (attention causal)."""
    c = runtime.loaded.model_config
    per_token = c.hidden_size * (c.q_size + 2 * c.kv_size) + c.q_size * c.hidden_size
    per_token += 3 * c.hidden_size * c.intermediate_size
    linear = 2 * per_token * c.num_layers * input_len * batch_size
    attention = 4 * c.num_heads * c.head_dim * c.num_layers * input_len * (input_len + 1) / 2
    lm_head = 2 * c.hidden_size * c.vocab_size * batch_size  # only each request's last token
    return linear + attention * batch_size + lm_head


def matmul_tflops(device: torch.device) -> float | None:
    """bf16 [8192 x 4096] @ [4096 x 14336] (an 8B MLP's shape), median of 20, in TFLOP/s."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 4096, device=device, dtype=torch.bfloat16)
    b = torch.randn(4096, 14336, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        torch.mm(a, b)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.mm(a, b)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192 * 4096 * 14336 / statistics.median(times) / 1e12


def time_verify(
    runtime: Runtime, batch: ScheduledBatch, tokens: int, steps: int, gen: torch.Generator
) -> tuple[float, bool]:
    """Median ms of a verify pass over `batch` with `tokens` verified per request (random
    drafts: the cost does not depend on what is accepted); the requests are left as they were."""
    vocab = runtime.loaded.model_config.vocab_size
    reqs = [c.req for c in batch.chunks]
    for req in reqs:
        if not runtime.scheduler.reserve(req, req.num_tokens + tokens - 1):
            fail(f"no KV pages for a verify pass of {tokens} tokens at batch {len(reqs)}")
    times, graph = [], False
    for _ in range(steps):
        drafts = [torch.randint(0, vocab, (tokens - 1,), generator=gen).tolist() for _ in reqs]
        started = time.perf_counter()
        out = verify_chain(runtime.runner, batch, drafts)  # returns after its host sync
        times.append(time.perf_counter() - started)
        graph = out.cuda_graph
    for req in reqs:
        runtime.scheduler.trim(req)
    return statistics.median(times) * 1e3, graph


def run_batch(
    runtime: Runtime,
    batch_size: int,
    input_len: int,
    output_len: int,
    seed: int,
    verify_tokens: Sequence[int] = (),
) -> OneBatchResult:
    gen = torch.Generator().manual_seed(seed + batch_size)
    vocab = runtime.loaded.model_config.vocab_size
    params = SamplingParams(max_tokens=2 * output_len + 1, temperature=0, ignore_eos=True)
    reqs = [
        Request(
            f"bench-{batch_size}-{i}",
            torch.randint(0, vocab, (input_len,), generator=gen).tolist(),
            params,
            2 * output_len + 1,
        )
        for i in range(batch_size)
    ]
    scheduler = runtime.scheduler
    for req in reqs:
        scheduler.add(req)
    prefill_s = 0.0
    batch = scheduler.schedule()
    while batch is not None and batch.kind == "prefill":
        prefill_s += runtime.step(batch)[1]
        batch = scheduler.schedule()
    assert batch is not None and batch.batch_size == batch_size, "every request must decode"
    modes = [True, False] if runtime.has_graphs else [False]
    times: dict[bool, list[float]] = {True: [], False: []}
    launches: dict[bool, list[float]] = {True: [], False: []}
    graph_out: StepOutput | None = None
    reads = StepReads(runtime.loaded.model, kv_bytes_per_position(runtime.pool.spec))
    step_bytes: list[int] = []
    for step in range(output_len * len(modes)):
        use_graph = modes[step % len(modes)]  # alternate: both modes see the same KV lengths
        step_bytes.append(reads.of_batch(batch))
        out, seconds, queued = runtime.step(batch, use_graph)
        times[use_graph].append(seconds)
        launches[use_graph].append(queued)
        if use_graph:
            graph_out = out
        batch = scheduler.schedule()
        assert batch is not None and batch.kind == "decode"
    verify = {k: time_verify(runtime, batch, k, output_len, gen) for k in verify_tokens}
    for req in reqs:
        scheduler.finish(req)
    eager_s = statistics.median(times[False])
    graph_s = statistics.median(times[True]) if times[True] else None
    return OneBatchResult(
        batch_size=batch_size,
        input_len=input_len,
        output_len=output_len,
        prefill_s=prefill_s,
        prefill_tok_s=batch_size * input_len / prefill_s,
        prefill_tflops=prefill_flops(runtime, batch_size, input_len) / prefill_s / 1e12,
        eager_step_ms=eager_s * 1e3,
        eager_tok_s=batch_size / eager_s,
        graph_step_ms=None if graph_s is None else graph_s * 1e3,
        graph_tok_s=None if graph_s is None else batch_size / graph_s,
        cuda_graph=graph_out is not None and graph_out.cuda_graph,
        padded_bs=graph_out.padded_bs if graph_out is not None else batch_size,
        decode_bytes=round(statistics.median(step_bytes)),
        verify=verify,
        eager_launch_ms=statistics.median(launches[False]) * 1e3,
        graph_launch_ms=statistics.median(launches[True]) * 1e3 if launches[True] else None,
    )


def _check(runtime: Runtime, batch_sizes: Sequence[int], input_len: int, output_len: int) -> None:
    per_request = input_len + 2 * output_len + 1
    if per_request > runtime.max_request_tokens:
        fail(
            f"--input-len {input_len} + 2 x --output-len {output_len} needs {per_request} "
            f"tokens per request; this engine serves at most {runtime.max_request_tokens}"
        )
    need = max(batch_sizes) * per_request
    if need > runtime.scheduler.capacity_tokens:
        fail(
            f"batch {max(batch_sizes)} x {per_request} tokens needs {need} KV slots; the pool "
            f"has {runtime.scheduler.capacity_tokens} (lower --batch-size or raise the pool)"
        )


def warmup_sizes(batch_sizes: Sequence[int]) -> list[int]:
    """Batch sizes to run once, untimed, before the measured runs. Triton compiles a kernel per
    specialisation and treats an integer argument equal to 1 (one request) as a constant, so a
    batch-1 warm-up leaves the many-request variants to compile inside the first timed prefill
    (64 x 1,024 tokens measured 2.6 s instead of 1.6 s on an H100): warm up at 2 as well."""
    smallest = min(batch_sizes)
    return sorted({smallest, max(smallest, min(2, max(batch_sizes)))})


def bench_one_batch(
    config: EngineConfig,
    batch_sizes: Sequence[int],
    input_len: int,
    output_len: int,
    output_file: Path | None,
    say: Callable[[str], None] = err.print,
    verify_tokens: Sequence[int] = (),
) -> list[OneBatchResult]:
    for value in batch_sizes:
        check_min("--batch-size", value)
    check_min("--input-len", input_len)
    check_min("--output-len", output_len)
    for value in verify_tokens:
        check_min("--verify-tokens", value, 2)
    runtime = Runtime(config, max(batch_sizes) * max(verify_tokens, default=1))
    _check(runtime, batch_sizes, input_len, output_len)
    say(f"[dim]{runtime.loaded.source.name} on {runtime.config.device}, "
        f"{runtime.config.attention_backend} attention; {runtime.graph_note}[/dim]")  # fmt: skip
    for size in warmup_sizes(batch_sizes):
        run_batch(runtime, size, input_len, min(output_len, 2), seed=-1)
    seed = runtime.config.seed
    results = [
        run_batch(runtime, bs, input_len, output_len, seed, verify_tokens) for bs in batch_sizes
    ]
    rate = matmul_tflops(runtime.loaded.device)
    copy = runtime.copy_rate
    Console().print(_table(runtime, results, rate, copy))
    if verify_tokens:
        Console().print(_verify_table(results))
    if output_file is not None:
        info = {"bench": "one-batch", "model": runtime.loaded.source.name, **machine_info()}
        info |= {
            "attention_backend": runtime.config.attention_backend,
            "dtype": runtime.config.dtype,
            "matmul_tflops": rate,
            "copy_gb_per_s": copy / 1e9,
            "cuda_graph_max_bs": runtime.config.cuda_graph_max_bs,
        }
        append_jsonl(output_file, [{**asdict(r), **info} for r in results])
        say(f"[dim]wrote {json_rows(len(results))} to {output_file}[/dim]")
    return results


def decode_read_rate(r: OneBatchResult) -> float:
    """Bytes per second the faster decode mode read: graph steps where they ran, else eager."""
    ms = r.graph_step_ms if r.cuda_graph and r.graph_step_ms is not None else r.eager_step_ms
    return r.decode_bytes / (ms / 1e3)


def _table(
    runtime: Runtime, results: list[OneBatchResult], rate: float | None, copy: float
) -> Table:
    first = results[0]
    title = (
        f"{runtime.loaded.source.name} ({runtime.config.dtype}): input {first.input_len}, "
        f"{first.output_len} decode steps per mode"
    )
    table = Table(title=title)
    columns = ["batch", "prefill ms", "prefill tok/s", "prefill TFLOP/s"]
    columns += ["graph ms/step", "graph tok/s", "eager ms/step", "eager tok/s", "graph/eager"]
    columns += ["read GB/s"]
    for column in columns:
        table.add_column(column, justify="right")
    for r in results:
        tflops = f"{r.prefill_tflops:.1f}"
        if rate:
            tflops += f" ({r.prefill_tflops / rate:.0%})"
        if r.graph_step_ms is None or r.graph_tok_s is None:
            graph = ["-", "-", "-"]
        elif not r.cuda_graph:
            graph = ["eager: above max bs", "-", "-"]
        else:
            speedup = f"{r.graph_tok_s / r.eager_tok_s:.2f}x"
            graph = [f"{r.graph_step_ms:.2f} (bs {r.padded_bs})", f"{r.graph_tok_s:.0f}", speedup]
        table.add_row(
            str(r.batch_size),
            f"{r.prefill_s * 1e3:.1f}",
            f"{r.prefill_tok_s:.0f}",
            tflops,
            graph[0],
            graph[1],
            f"{r.eager_step_ms:.2f} (host {r.eager_launch_ms:.2f})",
            f"{r.eager_tok_s:.0f}",
            graph[2],
            read_cell(decode_read_rate(r) / 1e9, copy / 1e9),
        )
    if runtime.runner.device.type == "cuda":
        host_note = "i.e. launching its kernels; near the step's own time, launches bound the step"
        host_note += " (CUDA graphs remove that part)"
    else:
        host_note = "which on a CPU includes the step's compute"
    caption = (
        "read GB/s: the weights and attended KV a decode step must read, over its time (the "
        "faster mode); in brackets, its share of the memory copy rate. host: the time to queue an "
        f"eager step, {host_note}. Measured in this process: "
        f"copy {copy / 1e9:,.1f} GB/s (read + write)"
    )
    table.caption = caption + (f", bf16 matmul {rate:.0f} TFLOP/s" if rate else "")
    return table


def _verify_table(results: list[OneBatchResult]) -> Table:
    table = Table(title="speculative verify pass vs a plain decode step (same batch)")
    for column in ("batch", "tokens per request", "verify ms", "decode ms", "verify / decode"):
        table.add_column(column, justify="right")
    for r in results:
        decode_ms = r.graph_step_ms if r.graph_step_ms is not None and r.cuda_graph else None
        decode_ms = decode_ms or r.eager_step_ms
        for k, (ms, graph) in r.verify.items():
            table.add_row(
                str(r.batch_size),
                str(k),
                f"{ms:.2f}" + (" (graph)" if graph else " (eager)"),
                f"{decode_ms:.2f}",
                f"{ms / decode_ms:.2f}x",
            )
    return table


def register_one_batch(bench_app: typer.Typer, engine_flags: Any) -> None:
    @bench_app.command("one-batch", context_settings={"allow_extra_args": True})
    @engine_flags
    def one_batch(
        ctx: typer.Context,
        batch_size: list[int] = BATCH_SIZES,
        input_len: int = typer.Option(1024, help="prompt tokens per request"),
        output_len: int = typer.Option(16, help="decode steps timed per mode (graph, eager)"),
        output_file: Path | None = typer.Option(None, help="append one JSON row per batch size"),
        verify_tokens: str = typer.Option(
            "", help="also time speculative verify passes with these tokens per request: 4,8"
        ),
        *,
        config: EngineConfig,
    ) -> None:
        """Prefill and decode latency of one static batch, CUDA graph vs eager (SGLang's
        bench_one_batch): the model runner alone, no scheduler loop or API."""
        sizes = list(batch_size)
        for extra in ctx.args:  # `--batch-size 1 8 32`: click leaves 8 and 32 over
            if not extra.isdigit():
                fail(f"unexpected argument {extra!r}")
            sizes.append(int(extra))
        try:
            verify = [int(v) for v in verify_tokens.split(",") if v.strip()]
        except ValueError:
            fail(f"--verify-tokens takes numbers like 4,8, got {verify_tokens!r}")
        bench_one_batch(config, sizes, input_len, output_len, output_file, verify_tokens=verify)
