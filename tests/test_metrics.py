"""The /metrics exposition: hand-made telemetry records in, exact Prometheus samples out."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from engine_utils import wait_idle, wait_until
from prometheus_client.parser import text_string_to_metric_families

from llmconsole.core import Engine, SamplingParams
from llmconsole.core.server.metrics import EngineMetrics
from llmconsole.core.telemetry import (
    EngineEvent,
    RequestRecord,
    StepRecord,
    Subscription,
    TelemetryBuffer,
)

T0 = 1_700_000_000.0
MODEL = "tiny-test"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class FakeEngine:
    """Just what EngineMetrics reads from an engine, on a real telemetry buffer."""

    buffer: TelemetryBuffer = field(default_factory=lambda: TelemetryBuffer(1024))
    live: dict[str, int] = field(
        default_factory=lambda: {
            "running": 3,
            "queued": 2,
            "kv_pages_used": 25,
            "kv_pages_total": 100,
            "page_size": 16,
        }
    )

    def subscribe(self) -> Subscription:
        return self.buffer.subscribe()

    def stats(self) -> dict[str, int]:
        return dict(self.live)


def step(
    i: int,
    kind: str = "decode",
    *,
    bs: int = 4,
    generated: int = 4,
    cuda_graph: bool = False,
    duration: float = 0.02,
    end: float | None = None,
    drafted: int = 0,
    accepted: int = 0,
    retracted: int = 0,
    bytes_read: int = 0,
) -> StepRecord:
    return StepRecord(
        step_id=i,
        time=T0 + i if end is None else end,
        kind=kind,
        batch_size=bs,
        num_tokens=bs,
        num_generated=generated,
        cuda_graph=cuda_graph,
        padded_bs=bs,
        duration_s=duration,
        queue_len=0,
        running=bs,
        kv_pages_used=10,
        kv_pages_total=100,
        drafted_tokens=drafted,
        accepted_tokens=accepted,
        retracted=retracted,
        bytes_read=bytes_read,
    )


def request(
    rid: str,
    ttft: float | None,
    e2e: float,
    prompt: int,
    completion: int,
    reason: str,
    cached: int = 0,
) -> RequestRecord:
    first = None if ttft is None else T0 + ttft
    return RequestRecord(rid, T0, first, T0 + e2e, prompt, cached, completion, 0, reason)


def parse(body: bytes) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, model: str = MODEL, **labels: str) -> float:
    return samples[("llmconsole:" + name, frozenset({"model_name": model, **labels}.items()))]


def scrape(metrics: EngineMetrics) -> Samples:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return parse(body)


REQUESTS = [
    request("a", 0.05, 1.0, 10, 20, "stop"),
    request("b", 0.25, 2.0, 30, 40, "length", cached=24),
    request("c", 1.5, 3.5, 7, 5, "length"),
    request("d", None, 0.01, 4, 0, "abort"),
]
STEPS = [
    step(0, "prefill", generated=4, cuda_graph=False, duration=0.3),
    step(1, cuda_graph=True),
    step(2, cuda_graph=True, retracted=1),
    step(3, cuda_graph=True, duration=0.5),
    step(4, generated=3, cuda_graph=False, retracted=2),
]


@pytest.fixture
def fed() -> tuple[FakeEngine, EngineMetrics]:
    eng = FakeEngine()
    metrics = EngineMetrics(eng, MODEL, clock=lambda: T0 + 1000.0)
    eng.buffer.append(EngineEvent(T0, "start", "ready"))
    for rec in [*STEPS, *REQUESTS]:
        eng.buffer.append(rec)
    return eng, metrics


def test_every_metric_is_exported_with_the_prefix_and_model_label() -> None:
    samples = scrape(EngineMetrics(FakeEngine(), MODEL))
    names = {name for name, _ in samples}
    expected = [
        "num_running_reqs", "num_queue_reqs", "num_used_tokens", "token_usage",
        "num_cached_tokens", "cache_hit_rate", "cached_tokens_total",
        "gen_throughput", "spec_accept_length", "spec_accept_rate",
        "prompt_tokens_total", "generation_tokens_total", "num_requests_total",
        "request_finished_total", "cuda_graph_steps_total", "eager_steps_total",
        "retracted_requests_total", "time_to_first_token_seconds_count", "read_bytes_total",
        "decode_read_bytes_per_second", "memory_copy_bytes_per_second",
        "inter_token_latency_seconds_bucket", "e2e_request_latency_seconds_sum",
    ]  # fmt: skip
    for name in expected:
        assert "llmconsole:" + name in names, name
    for name, labels in samples:
        assert name.startswith("llmconsole:")
        assert ("model_name", MODEL) in labels, name
    # finish reasons exist at 0 before any request, so rate() sees the first one
    assert value(samples, "request_finished_total", finish_reason="length") == 0


def test_counters_add_up_the_records(fed: tuple[FakeEngine, EngineMetrics]) -> None:
    _, metrics = fed
    s = scrape(metrics)
    assert value(s, "generation_tokens_total") == sum(r.num_generated for r in STEPS) == 19
    assert value(s, "prompt_tokens_total") == 51
    assert value(s, "cached_tokens_total") == 24
    assert value(s, "cache_hit_rate") == pytest.approx(24 / 51)
    assert value(s, "num_requests_total") == 4
    assert value(s, "request_finished_total", finish_reason="stop") == 1
    assert value(s, "request_finished_total", finish_reason="length") == 2
    assert value(s, "request_finished_total", finish_reason="abort") == 1
    assert value(s, "request_finished_total", finish_reason="error") == 0
    assert value(s, "cuda_graph_steps_total") == 3
    assert value(s, "eager_steps_total") == 2
    assert value(s, "retracted_requests_total") == 3
    assert value(s, "telemetry_dropped_records_total") == 0


def test_a_second_render_counts_only_new_records(fed: tuple[FakeEngine, EngineMetrics]) -> None:
    eng, metrics = fed
    scrape(metrics)
    assert value(scrape(metrics), "generation_tokens_total") == 19  # nothing new, nothing added
    eng.buffer.append(step(9, generated=6, cuda_graph=True))
    s = scrape(metrics)
    assert value(s, "generation_tokens_total") == 25
    assert value(s, "cuda_graph_steps_total") == 4


def test_histograms_observe_each_record_once(fed: tuple[FakeEngine, EngineMetrics]) -> None:
    _, metrics = fed
    s = scrape(metrics)
    # TTFT: requests that produced a token; E2E: every finished request
    assert value(s, "time_to_first_token_seconds_count") == 3
    assert value(s, "time_to_first_token_seconds_sum") == pytest.approx(0.05 + 0.25 + 1.5)
    assert value(s, "time_to_first_token_seconds_bucket", le="0.1") == 1
    assert value(s, "time_to_first_token_seconds_bucket", le="+Inf") == 3
    assert value(s, "e2e_request_latency_seconds_count") == 4
    assert value(s, "e2e_request_latency_seconds_sum") == pytest.approx(1.0 + 2.0 + 3.5 + 0.01)
    # ITL: one observation per decode step (the prefill step is not one)
    assert value(s, "inter_token_latency_seconds_count") == 4
    assert value(s, "inter_token_latency_seconds_sum") == pytest.approx(0.02 * 3 + 0.5)


def test_gauges_read_the_live_stats(fed: tuple[FakeEngine, EngineMetrics]) -> None:
    eng, metrics = fed
    s = scrape(metrics)
    assert value(s, "num_running_reqs") == 3
    assert value(s, "num_queue_reqs") == 2
    assert value(s, "num_used_tokens") == 25 * 16
    assert value(s, "token_usage") == 0.25
    assert value(s, "num_cached_tokens") == 0  # no kv_pages_cached: an engine without a cache
    eng.live.update(kv_pages_cached=3)
    assert value(scrape(metrics), "num_cached_tokens") == 3 * 16
    eng.live.update(kv_pages_used=0, running=0, queued=0)
    s = scrape(metrics)
    assert value(s, "token_usage") == 0 and value(s, "num_running_reqs") == 0
    # the old steps are far outside the window: an idle engine reads 0 tokens/s
    assert value(s, "gen_throughput") == 0


def test_throughput_counts_the_recent_window_only() -> None:
    eng = FakeEngine()
    now = T0 + 100.0
    metrics = EngineMetrics(eng, MODEL, window_s=5.0, clock=lambda: now)
    eng.buffer.append(step(0, generated=1000, end=now - 20.0, duration=0.5))  # too old
    for i in range(9):  # back to back 0.5 s steps ending at now - 4, ..., now
        eng.buffer.append(step(i + 1, generated=8, end=now - 4.0 + 0.5 * i, duration=0.5))
    assert value(scrape(metrics), "gen_throughput") == pytest.approx(8 / 0.5)


def test_decode_read_rate_is_bytes_over_decode_time_against_the_copy_rate() -> None:
    """Decode steps' bytes over their own durations (gaps between steps do not dilute it, a
    prefill step's bytes do not count); every step's bytes go into the counter."""
    eng = FakeEngine()
    eng.live["memory_copy_bytes_per_s"] = 3_000_000_000_000
    now = T0 + 100.0
    metrics = EngineMetrics(eng, MODEL, window_s=5.0, clock=lambda: now)
    eng.buffer.append(step(0, "prefill", end=now - 4.0, duration=0.5, bytes_read=40 * 10**9))
    for i, end in enumerate((now - 3.0, now - 2.99, now - 1.0)):  # 10 ms each, gaps between
        eng.buffer.append(step(i + 1, end=end, duration=0.01, bytes_read=25 * 10**9))
    s = scrape(metrics)
    assert value(s, "decode_read_bytes_per_second") == pytest.approx(25e9 / 0.01)
    assert value(s, "read_bytes_total") == 40e9 + 3 * 25e9
    assert value(s, "memory_copy_bytes_per_second") == 3e12
    now += 60.0  # idle: no decode step in the window reads nothing
    assert value(scrape(metrics), "decode_read_bytes_per_second") == 0


def test_speculative_acceptance_follows_sglang() -> None:
    eng = FakeEngine()
    now = T0 + 100.0
    metrics = EngineMetrics(eng, MODEL, clock=lambda: now)
    s = scrape(metrics)
    assert value(s, "spec_accept_length") == 0 and value(s, "spec_accept_rate") == 0
    # bs 4 drafting 3 each: 12 drafted, 6 accepted; bs 2: 6 drafted, 3 accepted
    eng.buffer.append(step(1, "verify", bs=4, end=now - 1, drafted=12, accepted=6))
    eng.buffer.append(step(2, "verify", bs=2, end=now - 0.5, drafted=6, accepted=3))
    eng.buffer.append(step(3, "decode", bs=8, end=now))  # no drafts: not a verify pass
    s = scrape(metrics)
    assert value(s, "spec_accept_length") == pytest.approx((6 + 3 + 4 + 2) / (4 + 2))
    assert value(s, "spec_accept_rate") == pytest.approx(9 / 18)


def test_overwritten_records_are_counted() -> None:
    eng = FakeEngine(buffer=TelemetryBuffer(4))
    metrics = EngineMetrics(eng, MODEL)
    for i in range(10):
        eng.buffer.append(step(i))
    s = scrape(metrics)
    assert value(s, "telemetry_dropped_records_total") == 6
    assert value(s, "generation_tokens_total") == 4 * 4


def test_two_instances_do_not_share_counts() -> None:
    a, b = FakeEngine(), FakeEngine()
    ma, mb = EngineMetrics(a, MODEL), EngineMetrics(b, MODEL)
    for i in range(3):
        a.buffer.append(step(i, generated=5))
    a.buffer.append(request("x", 0.1, 1.0, 9, 5, "length"))
    sa, sb = scrape(ma), scrape(mb)
    assert value(sa, "generation_tokens_total") == 15
    assert value(sb, "generation_tokens_total") == 0
    assert value(sa, "request_finished_total", finish_reason="length") == 1
    assert value(sb, "request_finished_total", finish_reason="length") == 0
    assert value(sb, "time_to_first_token_seconds_count") == 0


def test_real_engine_counts_generated_tokens_and_finishes(engine: Engine) -> None:
    wait_idle(engine)
    metrics = EngineMetrics(engine, engine.model_name)
    # The shared engine's buffer holds earlier tests' records and the subscription starts at its
    # oldest one, so compare against what the first scrape already counted.
    model = engine.model_name
    before = scrape(metrics)

    def delta(s: Samples, name: str, **labels: str) -> float:
        return value(s, name, model, **labels) - value(before, name, model, **labels)

    params = SamplingParams(max_tokens=5, ignore_eos=True, temperature=0)
    results = engine.generate(["Hello", "The sky is", "One two three"], params)
    assert [r.finish_reason for r in results] == ["length"] * 3
    # the request and step records land just after the results are handed over
    after: Samples = {}

    def caught_up() -> bool:
        nonlocal after
        after = scrape(metrics)
        return (
            delta(after, "request_finished_total", finish_reason="length") >= 3
            and delta(after, "generation_tokens_total") >= 15
        )

    assert wait_until(caught_up, timeout=30.0)
    wait_idle(engine)
    after = scrape(metrics)
    assert delta(after, "generation_tokens_total") == 15
    assert delta(after, "request_finished_total", finish_reason="length") == 3
    assert delta(after, "num_requests_total") == 3
    assert delta(after, "time_to_first_token_seconds_count") == 3
    # Every step (short prompts, decode) multiplied by the ~97 MB of 4-bit blocks once.
    steps = delta(after, "eager_steps_total") + delta(after, "cuda_graph_steps_total")
    assert steps >= 5 and 90e6 * steps < delta(after, "read_bytes_total") < 120e6 * steps
    assert (
        value(after, "memory_copy_bytes_per_second", model)
        == engine.stats()["memory_copy_bytes_per_s"]
    )
    assert value(after, "telemetry_dropped_records_total", model) == 0
    assert value(after, "num_running_reqs", model) == 0
