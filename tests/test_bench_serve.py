"""`llmconsole bench serve`: the statistics on hand-made timings, SSE parsing, arrivals, datasets
and errors, a small fake OpenAI server for the whole client path, and (once it exists) our own
API server end to end."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from llmconsole.console import cli
from llmconsole.console.loadgen.client import api_root, describe_error
from llmconsole.console.loadgen.config import ServeBenchConfig
from llmconsole.console.loadgen.datasets import (
    BUILTIN_MAX_TOKENS,
    PromptSpec,
    load_prompts,
    random_prompts,
    sharegpt_pairs,
)
from llmconsole.console.loadgen.protocol import (
    DONE,
    build_payload,
    chunk_error,
    chunk_text,
    parse_sse_line,
)
from llmconsole.console.loadgen.results import RequestOutput, compute_metrics
from llmconsole.console.loadgen.stats import arrival_offsets, percentile, summarize_ms
from llmconsole.console.prompts import builtin_prompts

CliError = cli.CliError


def _output(start: float, chunks: tuple[float, ...], end: float, tokens: int, **kw: Any):
    return RequestOutput(
        success=kw.pop("success", True),
        start_s=start,
        end_s=end,
        chunk_times_s=chunks,
        output_tokens=tokens,
        prompt_tokens=kw.pop("prompt_tokens", 10),
        error=kw.pop("error", ""),
    )


# ---- statistics ------------------------------------------------------------------------------


def test_percentile_interpolates_linearly_like_numpy() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97)
    assert percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0, 3.0], 0) == 1.0 and percentile([1.0, 2.0, 3.0], 100) == 3.0
    values = [random.Random(3).random() for _ in range(101)]
    for q in (50, 90, 99):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))
    with pytest.raises(ValueError):
        percentile([], 50)


def test_one_request_ttft_itl_tpot() -> None:
    out = _output(1.0, (1.1, 1.15, 1.3), 1.4, tokens=4)
    assert out.latency_s == pytest.approx(0.4)
    assert out.ttft_s == pytest.approx(0.1)
    assert out.itl_s == pytest.approx([0.05, 0.15])
    assert out.tpot_s == pytest.approx((0.4 - 0.1) / 3)  # (latency - ttft) / (tokens - 1)
    assert _output(0.0, (0.2,), 0.3, tokens=1).tpot_s is None  # undefined for one token


def test_metrics_follow_sglang_definitions() -> None:
    outputs = [
        _output(0.0, (0.1, 0.2, 0.3), 0.5, tokens=5, prompt_tokens=10),
        _output(0.5, (0.8,), 1.0, tokens=1, prompt_tokens=20),
        _output(0.2, (), 0.4, tokens=0, success=False, error="HTTP 500: boom"),
    ]
    m = compute_metrics(outputs, duration_s=2.0)
    assert (m.completed, m.failed) == (2, 1)
    assert (m.total_input_tokens, m.total_output_tokens) == (30, 6)
    assert m.request_throughput == 1.0
    assert m.input_throughput == 15.0 and m.output_throughput == 3.0
    assert m.total_throughput == 18.0
    assert m.concurrency == pytest.approx((0.5 + 0.5) / 2.0)  # sum of latencies / duration
    assert m.ttft_ms.mean == pytest.approx(200.0)  # (100 + 300) / 2
    assert m.ttft_ms.median == pytest.approx(200.0)
    assert m.ttft_ms.p99 == pytest.approx(100 + 200 * 0.99)
    assert m.tpot_ms.mean == pytest.approx(100.0)  # only the 5-token request: 0.4 s / 4
    assert m.itl_ms.mean == pytest.approx(100.0) and m.itl_ms.p99 == pytest.approx(100.0)
    assert m.e2e_latency_ms.mean == pytest.approx(500.0)
    row = m.as_dict()
    assert {"mean_ttft_ms", "median_tpot_ms", "p99_itl_ms", "mean_e2e_latency_ms"} <= set(row)
    assert row["completed"] == 2 and "ttft_ms" not in row


def test_no_successes_give_undefined_latencies_not_zeros() -> None:
    assert summarize_ms([]).mean is None
    m = compute_metrics([_output(0.0, (), 1.0, 0, success=False)], duration_s=1.0)
    assert m.completed == 0 and m.ttft_ms.p99 is None and m.output_throughput == 0.0


# ---- the protocol -----------------------------------------------------------------------------


def test_sse_lines() -> None:
    assert parse_sse_line('data: {"a": 1}') == {"a": 1}
    assert parse_sse_line('data:{"a": 1}') == {"a": 1}  # the space is optional in SSE
    assert parse_sse_line("data: [DONE]") == DONE
    for ignored in ("", ": keep-alive", "event: message", "id: 3", "data: "):
        assert parse_sse_line(ignored) is None
    with pytest.raises(ValueError):
        parse_sse_line("data: {not json")
    with pytest.raises(ValueError):
        parse_sse_line("data: [1, 2]")


def test_chunk_text_and_errors() -> None:
    assert chunk_text({"choices": [{"index": 0, "text": " hi"}]}) == " hi"
    assert chunk_text({"choices": [{"delta": {"content": "yo"}}]}) == "yo"
    assert chunk_text({"choices": [{"delta": {"role": "assistant"}}]}) == ""
    assert chunk_text({"choices": [], "usage": {"completion_tokens": 3}}) == ""
    assert chunk_error({"error": {"message": "bad model"}}) == "bad model"
    assert chunk_error({"object": "error", "message": "too long"}) == "too long"
    assert chunk_error({"choices": []}) is None


def test_payload_streams_with_usage_and_ignore_eos() -> None:
    spec = PromptSpec("hello", 7)
    body = build_payload(spec, "m", "completions", ignore_eos=True)
    assert body["prompt"] == "hello" and body["max_tokens"] == 7 and body["ignore_eos"] is True
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    chat = build_payload(spec, "m", "chat", ignore_eos=False)
    assert chat["messages"] == [{"role": "user", "content": "hello"}]
    assert "ignore_eos" not in chat and "prompt" not in chat


def test_api_root_and_error_words() -> None:
    assert api_root("http://h:1/") == api_root("http://h:1/v1/") == "http://h:1"
    refused = httpx.ConnectError("All connection attempts failed")
    refused.__cause__ = ConnectionRefusedError(111, "Connect call failed")
    assert describe_error(refused) == "connection refused"
    assert describe_error(httpx.ReadTimeout("")) == "timed out"


# ---- arrivals ---------------------------------------------------------------------------------


def test_poisson_arrivals_are_seeded_with_the_right_mean_gap() -> None:
    first = arrival_offsets(20_000, rate=50.0, seed=7)
    assert first == arrival_offsets(20_000, rate=50.0, seed=7)
    assert first != arrival_offsets(20_000, rate=50.0, seed=8)
    assert first[0] == 0.0 and all(np.diff(first) >= 0)
    assert first[-1] / (len(first) - 1) == pytest.approx(1 / 50.0, rel=0.03)
    assert arrival_offsets(3, rate=math.inf, seed=7) == [0.0, 0.0, 0.0]


# ---- datasets ---------------------------------------------------------------------------------


def test_builtin_prompts_cycle_with_the_default_budget() -> None:
    texts = builtin_prompts()
    specs = load_prompts(ServeBenchConfig(num_prompts=len(texts) + 2))
    assert [s.prompt for s in specs[-2:]] == texts[:2]
    assert {s.max_tokens for s in specs} == {BUILTIN_MAX_TOKENS}
    capped = load_prompts(ServeBenchConfig(num_prompts=3, max_tokens=5))
    assert [s.max_tokens for s in capped] == [5, 5, 5]


def test_random_prompts_have_lengths_in_range() -> None:
    specs = random_prompts(50, input_len=40, output_len=9, range_ratio=0.5, seed=3)
    assert all(20 <= len(s.prompt.split()) <= 40 and 4 <= s.max_tokens <= 9 for s in specs)
    assert specs == random_prompts(50, input_len=40, output_len=9, range_ratio=0.5, seed=3)
    exact = load_prompts(
        ServeBenchConfig(dataset="random", num_prompts=4, random_input_len=12, random_range_ratio=1)
    )
    assert [len(s.prompt.split()) for s in exact] == [12] * 4
    assert len({s.prompt for s in exact}) == 4  # distinct: no shared prefix to cache


def _write_sharegpt(path: Path) -> Path:
    def turn(who: str, text: str) -> dict[str, str]:
        return {"from": who, "value": text}

    data = [
        {"conversations": [turn("human", "Hi there"), turn("gpt", "x" * 40)]},
        {"conversations": [turn("system", "be kind"), turn("human", "Q2"), turn("gpt", "y" * 8)]},
        {"conversations": [turn("human", "no answer")]},
        {"id": "no conversations"},
    ]
    path.write_text(json.dumps(data))
    return path


def test_sharegpt_first_human_turn_and_answer_budget(tmp_path: Path) -> None:
    path = _write_sharegpt(tmp_path / "sg.json")
    assert sharegpt_pairs(json.loads(path.read_text())) == [("Hi there", "x" * 40), ("Q2", "y" * 8)]
    config = ServeBenchConfig(dataset="sharegpt", dataset_path=str(path), num_prompts=4)
    specs = load_prompts(config)
    assert len(specs) == 4  # two conversations, repeated
    budgets = {s.prompt: s.max_tokens for s in specs}
    assert budgets == {"Hi there": 10, "Q2": 2}  # ~4 characters per token
    fixed = ServeBenchConfig(
        dataset="sharegpt", dataset_path=str(path), num_prompts=2, sharegpt_output_len=6
    )
    assert [s.max_tokens for s in load_prompts(fixed)] == [6, 6]


# ---- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_prompts": 0}, "--num-prompts must be >= 1"),
        ({"max_concurrency": 0}, "--max-concurrency must be >= 1"),
        ({"request_rate": 0.0}, "--request-rate must be > 0"),
        ({"request_rate": -2.0}, "--request-rate must be > 0"),
        ({"dataset": "alpaca"}, "unknown dataset 'alpaca'"),
        ({"endpoint": "embeddings"}, "unknown endpoint"),
        ({"dataset": "sharegpt", "dataset_path": "/no/such.json"}, "dataset file not found"),
        ({"base_url": "127.0.0.1:8000"}, "must start with http://"),
    ],
)
def test_bad_input_is_a_one_line_cli_error(overrides: dict[str, Any], message: str) -> None:
    config = ServeBenchConfig(**{"base_url": "http://fake", "num_prompts": 2, **overrides})
    with pytest.raises(CliError, match=message) as info:
        asyncio.run(run_fake(config))
    assert "\n" not in str(info.value)


def test_sharegpt_without_file_or_package(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmconsole.console.loadgen import datasets

    monkeypatch.setattr(datasets, "find_sharegpt_file", lambda: None)
    with pytest.raises(CliError, match="needs --dataset-path"):
        load_prompts(ServeBenchConfig(dataset="sharegpt", num_prompts=1))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli_unreachable_server_is_one_line_exit_2() -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    proc = subprocess.run(
        [sys.executable, "-m", "llmconsole.console", "bench", "serve", "--base-url", url],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: cannot reach {url}: connection refused"
    assert "Traceback" not in proc.stdout + proc.stderr


# ---- the whole client on a fake server --------------------------------------------------------


def _sse(chunk: dict[str, Any] | str) -> bytes:
    return f"data: {chunk if isinstance(chunk, str) else json.dumps(chunk)}\n\n".encode()


class FakeOpenAI:
    """An httpx transport speaking just enough of the OpenAI streaming API."""

    def __init__(self, usage: bool = True, fail_every: int = 0) -> None:
        self.usage, self.fail_every = usage, fail_every
        self.calls = self.in_flight = self.peak = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "fake"}]})
        body = json.loads(request.content)
        self.calls += 1
        if self.fail_every and self.calls % self.fail_every == 0:
            return httpx.Response(503, json={"error": {"message": "overloaded"}})
        return httpx.Response(200, content=self._stream(body))

    async def _stream(self, body: dict[str, Any]):
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        for i in range(body["max_tokens"]):
            await asyncio.sleep(0.002)
            if "messages" in body:
                yield _sse({"choices": [{"delta": {"content": f" w{i}"}}]})
            else:
                yield _sse({"choices": [{"text": f" w{i}"}]})
        if self.usage:
            usage = {"prompt_tokens": 3, "completion_tokens": body["max_tokens"]}
            yield _sse({"choices": [], "usage": usage})
        self.in_flight -= 1  # before DONE: the client stops reading there
        yield _sse(DONE)


async def run_fake(config: ServeBenchConfig, fake: FakeOpenAI | None = None, **kw: Any):
    from llmconsole.console.loadgen.client import run_benchmark

    transport = httpx.MockTransport(fake or FakeOpenAI())
    return await run_benchmark(config, transport=transport, **kw)


def test_run_benchmark_counts_usage_and_caps_concurrency() -> None:
    fake, seen = FakeOpenAI(), []
    config = ServeBenchConfig(
        base_url="http://fake", num_prompts=12, max_concurrency=3, max_tokens=5, endpoint="chat"
    )
    result = asyncio.run(run_fake(config, fake, progress=lambda d, t: seen.append((d, t))))
    m = result.metrics
    assert result.model == "fake" and (m.completed, m.failed) == (12, 0)
    assert (m.total_output_tokens, m.total_input_tokens) == (60, 36)
    assert fake.peak == 3 and fake.calls == 13  # one warm-up request
    assert seen[-1] == (12, 12) and len(seen) == 12
    assert all(len(o.chunk_times_s) == 5 for o in result.outputs)
    assert 0 < m.ttft_ms.mean <= m.e2e_latency_ms.mean
    row = result.to_row()
    assert row["request_rate"] == "inf" and "api_key" not in row and row["model"] == "fake"
    json.dumps(row, allow_nan=False)


def test_run_benchmark_without_usage_and_with_failures() -> None:
    config = ServeBenchConfig(
        base_url="http://fake", num_prompts=6, max_tokens=4, request_rate=200.0, warmup=False
    )
    result = asyncio.run(run_fake(config, FakeOpenAI(usage=False, fail_every=3)))
    m = result.metrics
    assert (m.completed, m.failed) == (4, 2)
    assert m.total_output_tokens == 16 and m.total_input_tokens == 0  # content chunks counted
    assert result.no_usage == 4
    assert {o.error for o in result.outputs if not o.success} == {
        'HTTP 503: {"error":{"message":"overloaded"}}'
    }


def test_failed_warmup_stops_the_run() -> None:
    config = ServeBenchConfig(base_url="http://fake", num_prompts=2, max_tokens=2)
    with pytest.raises(CliError, match="warm-up request .* failed: HTTP 503"):
        asyncio.run(run_fake(config, FakeOpenAI(fail_every=1)))


class _SSEHandler(BaseHTTPRequestHandler):
    """A real socket and chunked SSE, to check what MockTransport cannot: line framing."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._send_body(json.dumps({"data": [{"id": "sock-model"}]}).encode())

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        pieces = [_sse({"choices": [{"text": f" t{i}"}]}) for i in range(body["max_tokens"])]
        usage = {"prompt_tokens": 4, "completion_tokens": body["max_tokens"]}
        pieces += [b": keep-alive\n\n", _sse({"choices": [], "usage": usage}), _sse(DONE)]
        for piece in pieces:  # split mid-line: the client must reassemble lines
            for part in (piece[:7], piece[7:]):
                self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def _send_body(self, data: bytes) -> None:
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def sse_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SSEHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def registered() -> None:
    if not any(c.name == "serve" for c in cli.bench_app.registered_commands):
        cli._register_bench()


def test_cli_reports_and_appends_jsonl(sse_server: str, registered: None, tmp_path: Path) -> None:
    out_file = tmp_path / "serve.jsonl"
    args = ["bench", "serve", "--base-url", f"{sse_server}/v1", "--num-prompts", "5"]
    args += ["--max-tokens", "3", "--max-concurrency", "2", "--output-file", str(out_file)]
    result = CliRunner().invoke(cli.app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "output token throughput (tok/s)" in result.stdout and "TTFT" in result.stdout
    [row] = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert (row["completed"], row["total_output_tokens"], row["total_input_tokens"]) == (5, 15, 20)
    assert row["model"] == "sock-model" and row["max_concurrency"] == 2 and row["timestamp"]


# ---- our own API server, end to end ------------------------------------------------------------


def _server_available() -> bool:
    try:
        from llmconsole.core.server import ApiServer  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _server_available(), reason="llmconsole.core.server is not there yet")
def test_end_to_end_on_our_server(engine) -> None:
    from llmconsole.console.loadgen.client import run_benchmark
    from llmconsole.core.server import ApiServer

    server = ApiServer(engine, host="127.0.0.1", port=0)
    server.start()
    try:
        config = ServeBenchConfig(
            base_url=server.url, num_prompts=8, max_concurrency=4, max_tokens=8, dataset="builtin"
        )
        started = time.perf_counter()
        result = asyncio.run(run_benchmark(config))
        elapsed = time.perf_counter() - started
    finally:
        server.stop()  # the engine belongs to the session fixture: not shut down here
    m = result.metrics
    assert (m.completed, m.failed) == (8, 0), result.outputs[0].error
    assert m.total_output_tokens == 8 * 8  # ignore_eos: every request runs its full budget
    assert m.total_input_tokens > 8
    assert 0 < m.ttft_ms.mean <= m.e2e_latency_ms.mean
    assert all(o.ttft_s <= o.latency_s for o in result.outputs)
    assert m.duration_s <= elapsed
