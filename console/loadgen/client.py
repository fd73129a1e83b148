"""The async HTTP client of `bench serve`: streams each request, times its chunks, and runs the
whole load (arrivals, concurrency cap, warm-up) in `run_benchmark`."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import httpx

from ..bench_common import fail
from .config import ENDPOINTS, ServeBenchConfig, check_config
from .datasets import PromptSpec, load_prompts
from .protocol import build_payload, chunk_error, chunk_text, parse_sse_line
from .results import RequestOutput, ServeBenchResult, compute_metrics
from .stats import arrival_offsets

WARMUP_MAX_TOKENS = 16
CONNECT_TIMEOUT_S = 10.0


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
        fail(f"cannot reach {config.base_url.rstrip('/')}: {describe_error(exc)}")
    if config.model:
        return config.model
    if resp.status_code != 200:
        fail(f"GET {url} answered HTTP {resp.status_code}; pass --model")
    try:
        ids = [str(m["id"]) for m in resp.json()["data"]]
    except (ValueError, KeyError, TypeError):
        fail(f"GET {url} did not return an OpenAI model list; pass --model")
    if not ids:
        fail(f"GET {url} lists no models; pass --model")
    return ids[0]


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
                fail(f"warm-up request to {url} failed: {warm.error}")

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
