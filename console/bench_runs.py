"""Closed-loop measured runs of our engine: the shared prompt ids, one run's figures (RunStats),
its telemetry, the warm-up request and `run_ours` itself. `bench offline` and `bench
api-overhead` both time the engine through these."""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .bench_common import err, fail, progress_bar
from .prompts import builtin_prompts

if TYPE_CHECKING:
    from llmconsole.core import Engine
    from llmconsole.core.server.streams import DeltaStream
    from llmconsole.core.telemetry import Subscription

WARMUP_TOKENS = 4
TELEMETRY_WAIT_S = 10.0


def _percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks; defined for a single value too."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


# ---- prompts ----------------------------------------------------------------------------------


def build_prompts(
    engine: Engine, dataset: str, num_prompts: int, input_len: int, chat: bool, seed: int
) -> list[list[int]]:
    """Token ids, made once, so every system in the run sees exactly the same input."""
    if dataset == "random":
        # Random ids never include special tokens: a stray EOS/BOS mid-prompt is not a workload.
        vocab = engine.loaded.model_config.vocab_size
        if engine.tokenizer is not None:
            vocab = min(vocab, len(engine.tokenizer))
        special = set(getattr(engine.tokenizer, "all_special_ids", None) or ())
        usable = [t for t in range(vocab) if t not in special]
        rng = random.Random(seed)
        return [[rng.choice(usable) for _ in range(input_len)] for _ in range(num_prompts)]
    if engine.tokenizer is None:
        fail(f"{engine.model_name} has no tokenizer: use --dataset random")
    texts = builtin_prompts()
    texts = [texts[i % len(texts)] for i in range(num_prompts)]
    if not chat:
        return [engine.tokenize(t) for t in texts]
    if not getattr(engine.tokenizer, "chat_template", None):
        fail(f"{engine.model_name} has no chat template: pass --no-chat")
    return [engine.apply_chat_template([{"role": "user", "content": t}]) for t in texts]


# ---- measured runs ----------------------------------------------------------------------------


@dataclass
class RunStats:
    system: str  # "llmconsole" | "transformers"
    batch: int  # requests in flight (ours) or generate() batch size (transformers)
    num_prompts: int
    input_tokens: int
    output_tokens: int
    seconds: float
    cached_tokens: int = 0
    ttft_mean_s: float | None = None
    decode_steps: int = 0
    decode_ms_median: float | None = None
    decode_ms_p99: float | None = None
    decode_batch_median: float | None = None
    # bytes decode steps read (weights + attended KV) / their time, and the engine's copy rate
    decode_read_gb_s: float | None = None
    copy_gb_s: float | None = None
    # speculative verify passes: per-request passes, drafted and accepted tokens
    spec_passes: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def accept_length(self) -> float | None:
        """SGLang's: tokens per request per verify pass, (accepted + passes) / passes."""
        if not self.spec_passes:
            return None
        return (self.accepted_tokens + self.spec_passes) / self.spec_passes

    @property
    def label(self) -> str:
        """Short enough for a table column in an 80-column terminal."""
        if self.system == "llmconsole":
            return f"llmconsole c={self.batch}"
        return f"HF b={self.batch}"

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def total_tok_s(self) -> float:
        return (self.input_tokens + self.output_tokens) / self.seconds

    def row(self, common: dict[str, Any]) -> dict[str, Any]:
        key = "concurrency" if self.system == "llmconsole" else "batch"
        row: dict[str, Any] = {
            "system": self.system,
            key: self.batch,
            "num_prompts": self.num_prompts,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "seconds": round(self.seconds, 4),
            "output_tok_s": round(self.output_tok_s, 2),
            "total_tok_s": round(self.total_tok_s, 2),
        }
        if self.system == "llmconsole":
            row |= {
                "cached_tokens": self.cached_tokens,
                "ttft_mean_ms": _ms(self.ttft_mean_s),
                "decode_steps": self.decode_steps,
                "decode_step_ms_median": _round(self.decode_ms_median),
                "decode_step_ms_p99": _round(self.decode_ms_p99),
                "decode_batch_median": self.decode_batch_median,
                "decode_read_gb_per_s": _round(self.decode_read_gb_s),
                "copy_gb_per_s": _round(self.copy_gb_s),
            }
        return row | common


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


class RunRecords:
    """Gathers one run's telemetry. The engine appends a step's record after handing out its
    tokens, so a run's records are complete only once every token it generated is accounted for;
    waiting for that keeps one run's steps out of the next run's figures."""

    def __init__(self, engine: Engine) -> None:
        self.sub: Subscription = engine.subscribe()
        self.sub.poll()  # the engine is idle: skip its start-up events

    def collect(self, rids: set[str], generated: int) -> tuple[list[Any], list[Any]]:
        from llmconsole.core.telemetry import RequestRecord, StepRecord, of_type

        steps: list[StepRecord] = []
        finished: dict[str, RequestRecord] = {}
        deadline = time.monotonic() + TELEMETRY_WAIT_S
        while True:
            records = self.sub.poll()
            steps += of_type(records, StepRecord)
            finished |= {r.rid: r for r in of_type(records, RequestRecord)}
            complete = sum(s.num_generated for s in steps) >= generated and rids <= finished.keys()
            if complete or time.monotonic() > deadline:
                break
            time.sleep(0.005)
        if not complete or self.sub.dropped:
            err.print("[yellow]warning:[/yellow] telemetry incomplete; step figures may be off")
        return steps, [finished[r] for r in rids if r in finished]


def warm_up(engine: Engine, records: RunRecords, prompt: list[int]) -> None:
    """One short request first, so one-time costs (allocations, lazy init) stay out of timings."""
    from llmconsole.core import SamplingParams

    params = SamplingParams(max_tokens=WARMUP_TOKENS, temperature=0.0, ignore_eos=True)
    handle = engine.submit(prompt[:16], params)
    result = handle.result()
    if result.error:
        fail(f"warm-up request failed: {result.error}")
    records.collect({handle.rid}, len(result.token_ids))


def run_ours(
    engine: Engine,
    records: RunRecords,
    prompts: list[list[int]],
    max_tokens: int,
    concurrency: int,
) -> RunStats:
    """Closed loop: `concurrency` clients, each sending its next prompt when one ends.

    The clients are coroutines on one event loop, fed as the API server's streams are (see
    `DeltaStream`: one loop wakeup per batch of deltas): the process then holds the engine and
    one consumer, as SGLang's offline benchmark does. One OS thread per client made every decode
    step wake `concurrency` threads that each took the GIL from the engine thread; at 256
    requests that stretched a CPU step of the tiny model from ~9 to ~13 ms and more."""
    from llmconsole.core import SamplingParams
    from llmconsole.core.server.streams import DeltaStream  # imported before the clock starts
    from llmconsole.core.telemetry import read_rate

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    concurrency = min(concurrency, len(prompts))
    rids: list[str] = []
    usage: list[Any] = []
    failures: list[str] = []

    engine.flush_cache()  # every run starts cold: prompts cached by an earlier run are not reused
    with progress_bar() as bar:
        task = bar.add_task(f"llmconsole c={concurrency}", total=len(prompts) * max_tokens)
        started = time.perf_counter()
        asyncio.run(
            _closed_loop(
                DeltaStream,
                engine,
                prompts,
                params,
                concurrency,
                lambda n: bar.advance(task, n),
                (rids, usage, failures),
            )
        )
        seconds = time.perf_counter() - started

    if failures:
        fail(f"a benchmark request failed: {failures[0]}")
    output_tokens = sum(u.completion_tokens for u in usage if u is not None)
    steps, finished = records.collect(set(rids), output_tokens)
    decode = [s for s in steps if s.kind in ("decode", "verify")]
    verify = [s for s in steps if s.kind == "verify"]
    ttfts = [r.ttft_s for r in finished if r.ttft_s is not None]
    durations_ms = [s.duration_s * 1000 for s in decode]
    read = read_rate((s.bytes_read, s.duration_s) for s in decode if s.kind == "decode")
    return RunStats(
        system="llmconsole",
        batch=concurrency,
        num_prompts=len(prompts),
        input_tokens=sum(u.prompt_tokens for u in usage if u is not None),
        output_tokens=output_tokens,
        seconds=seconds,
        cached_tokens=sum(u.cached_tokens for u in usage if u is not None),
        ttft_mean_s=statistics.fmean(ttfts) if ttfts else None,
        decode_steps=len(decode),
        decode_ms_median=statistics.median(durations_ms) if decode else None,
        decode_ms_p99=_percentile(durations_ms, 0.99) if decode else None,
        decode_batch_median=statistics.median(s.batch_size for s in decode) if decode else None,
        decode_read_gb_s=None if read is None else read / 1e9,
        copy_gb_s=engine.memory_copy_rate / 1e9,
        spec_passes=sum(s.batch_size for s in verify),
        drafted_tokens=sum(s.drafted_tokens for s in verify),
        accepted_tokens=sum(s.accepted_tokens for s in verify),
    )


async def _closed_loop(
    stream_of: Callable[[Engine, list[int], Any], DeltaStream],
    engine: Engine,
    prompts: list[list[int]],
    params: Any,
    concurrency: int,
    advance: Callable[[int], None],
    out: tuple[list[str], list[Any], list[str]],  # rids, usage, failures: filled here
) -> None:
    rids, usage, failures = out
    pending = iter(range(len(prompts)))  # shared by the clients: one thread, no lock
    tokens = 0

    async def client() -> None:
        nonlocal tokens
        for index in pending:
            if failures:
                return
            try:
                stream = stream_of(engine, prompts[index], params)
            except Exception as exc:  # reported by run_ours
                failures.append(str(exc))
                return
            rids.append(stream.handle.rid)
            async for delta in stream:
                tokens += len(delta.token_ids)
                if delta.finished:
                    usage.append(delta.usage)
                    if delta.error:
                        failures.append(delta.error)

    shown = 0

    def show() -> None:
        nonlocal shown
        advance(tokens - shown)
        shown = tokens

    async def ticker() -> None:  # the bar at 10 Hz, not once per delta
        while True:
            await asyncio.sleep(0.1)
            show()

    tick = asyncio.create_task(ticker())
    try:
        await asyncio.gather(*(client() for _ in range(concurrency)))
    finally:
        tick.cancel()
    show()  # what the last tick did not
