"""The OpenAI-compatible API over real HTTP on loopback, driven by the official `openai` client."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from engine_utils import wait_idle, wait_until
from prometheus_client.parser import text_string_to_metric_families

from llmconsole.core import Engine
from llmconsole.core.server import ApiServer
from llmconsole.core.telemetry import EngineEvent, of_type


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[ApiServer]:
    srv = ApiServer(engine, port=0).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: ApiServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


CHAT = [{"role": "user", "content": "Name three colors of the rainbow."}]


def chat_text(client: openai.OpenAI, engine: Engine, **kw) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(model=engine.model_name, messages=CHAT, **kw)


def test_models_lists_the_served_model(client: openai.OpenAI, engine: Engine) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [engine.model_name]


def test_completion_equals_engine_and_stream_equals_non_stream(client, engine) -> None:
    prompt = "The three primary colors are"
    direct = engine.generate([prompt], _greedy(24))[0]
    out = client.completions.create(
        model=engine.model_name, prompt=prompt, max_tokens=24, temperature=0
    )
    assert out.choices[0].text == direct.text
    assert out.usage.prompt_tokens == len(engine.tokenize(prompt))
    assert out.usage.completion_tokens == len(direct.token_ids)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    stream = client.completions.create(
        model=engine.model_name, prompt=prompt, max_tokens=24, temperature=0, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == direct.text
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason


def test_chat_stream_equals_non_stream_with_usage(client, engine) -> None:
    full = chat_text(client, engine, max_tokens=40, temperature=0)
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].finish_reason in ("stop", "length")
    chunks = list(
        chat_text(
            client,
            engine,
            max_tokens=40,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens
    prompt_ids = engine.apply_chat_template(CHAT)
    assert full.usage.prompt_tokens == len(prompt_ids)


def test_max_completion_tokens_and_length_finish(client, engine) -> None:
    out = chat_text(client, engine, max_completion_tokens=3, temperature=0)
    assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length"


def test_stop_strings(client, engine) -> None:
    full = chat_text(client, engine, max_tokens=40, temperature=0).choices[0].message.content
    stop = full.split()[2]
    cut = full.index(stop)
    out = chat_text(client, engine, max_tokens=40, temperature=0, stop=[stop])
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].message.content == full[:cut]


def test_n_choices_and_seeded_reproducibility(client, engine) -> None:
    kw = dict(max_tokens=16, temperature=1.0, seed=7, n=2)
    a = chat_text(client, engine, **kw)
    b = chat_text(client, engine, **kw)
    texts_a = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1]
    assert texts_a == [c.message.content for c in b.choices]
    assert texts_a[0] != texts_a[1]  # seed + i: the choices differ
    prompt_len = len(engine.apply_chat_template(CHAT))
    assert a.usage.prompt_tokens == prompt_len  # the shared prompt counts once


def test_completion_logprobs_and_echo(client, engine) -> None:
    prompt = "One, two, three,"
    out = client.completions.create(
        model=engine.model_name, prompt=prompt, max_tokens=4, temperature=0, logprobs=3
    )
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(
        len(top) <= 3 and max(top.values()) >= chosen - 1e-5
        for top, chosen in zip(lp.top_logprobs, lp.token_logprobs, strict=True)
    )
    assert "".join(lp.tokens) == out.choices[0].text
    echo = client.completions.create(
        model=engine.model_name, prompt=prompt, max_tokens=1, temperature=0, logprobs=1, echo=True
    )
    n_prompt = len(engine.tokenize(prompt))
    elp = echo.choices[0].logprobs
    assert echo.choices[0].text.startswith(prompt)
    assert len(elp.token_logprobs) == n_prompt + 1
    assert elp.token_logprobs[0] is None and all(x <= 0 for x in elp.token_logprobs[1:])
    # Prompt logprobs agree with a completion that generates those tokens greedily.
    assert elp.token_logprobs[-1] == pytest.approx(
        client.completions.create(
            model=engine.model_name, prompt=prompt, max_tokens=1, temperature=0, logprobs=0
        )
        .choices[0]
        .logprobs.token_logprobs[0],
        abs=1e-4,
    )


def test_chat_logprobs_shape(client, engine) -> None:
    out = chat_text(client, engine, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token for t in content)


def test_token_id_prompts_and_prompt_lists(client, engine) -> None:
    ids = engine.tokenize("Hello there")
    out = client.completions.create(
        model=engine.model_name, prompt=[ids, ids], max_tokens=4, temperature=0
    )
    assert len(out.choices) == 2 and out.choices[0].text == out.choices[1].text


def test_thirty_two_concurrent_streams_complete(server, engine) -> None:
    results: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        try:
            c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
            stream = c.completions.create(
                model=engine.model_name,
                prompt=f"Story number {i}:",
                max_tokens=12,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            text = "".join(ch.choices[0].text for ch in stream if ch.choices)
            with lock:
                results.append(text)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not errors and len(results) == 32 and all(results)
    wait_idle(engine)


# ---- bad input -------------------------------------------------------------------------------


def _post(server: ApiServer, path: str, **kw) -> httpx.Response:
    return httpx.post(server.url + path, timeout=60, **kw)


def _assert_error(resp: httpx.Response, status: int, needle: str) -> None:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert needle in err["message"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"model": None}, "prompt"),  # prompt missing
        ({"prompt": 5}, "prompt"),  # wrong type
        ({"prompt": "hi", "temperature": -1}, "temperature"),
        ({"prompt": "hi", "top_p": 0}, "top_p"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "n": 0}, "n"),
        ({"prompt": "hi", "logprobs": 99}, "logprobs"),
        ({"prompt": [10**9]}, "vocabulary"),
        ({"prompt": ""}, "empty"),
        ({"prompt": "hi", "seed": 2**70}, "seed"),
        ({"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty"),
        ({"prompt": "hi", "stop": ["", "x"]}, "stop"),
        ({"prompt": "hi", "best_of": 3}, "best_of"),
        ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    ],
)
def test_invalid_completion_requests_are_400(server, body, needle) -> None:
    _assert_error(_post(server, "/v1/completions", json=body), 400, needle)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "role"),
        ({"messages": CHAT, "top_logprobs": 3}, "top_logprobs"),
        ({"messages": CHAT, "max_completion_tokens": 0}, "max_tokens"),
        ({"messages": "hello"}, "messages"),
    ],
)
def test_invalid_chat_requests_are_400(server, body, needle) -> None:
    _assert_error(_post(server, "/v1/chat/completions", json=body), 400, needle)


def test_malformed_json_is_400(server) -> None:
    resp = _post(
        server,
        "/v1/chat/completions",
        content=b'{"messages": [',
        headers={"content-type": "application/json"},
    )
    _assert_error(resp, 400, "JSON")


def test_too_long_is_400_with_the_numbers(server, engine) -> None:
    limit = engine.max_request_tokens
    resp = _post(server, "/v1/completions", json={"prompt": "hi", "max_tokens": limit})
    _assert_error(resp, 400, str(limit))
    assert resp.json()["error"]["code"] == "context_length_exceeded"


def test_unknown_model_is_404(server) -> None:
    body = {"model": "gpt-9", "messages": CHAT}
    _assert_error(_post(server, "/v1/chat/completions", json=body), 404, "gpt-9")


def test_oversized_body_is_413(server) -> None:
    body = json.dumps({"prompt": "x" * (5 * 1024 * 1024)})
    resp = _post(
        server, "/v1/completions", content=body, headers={"content-type": "application/json"}
    )
    _assert_error(resp, 413, "exceeds")


def test_server_stays_healthy_after_bad_requests(server, client, engine) -> None:
    for body in (b"\xff\xfe", b"[]", b"null", b'{"prompt": {"a": 1}}'):
        resp = _post(
            server, "/v1/completions", content=body, headers={"content-type": "application/json"}
        )
        assert 400 <= resp.status_code < 500
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert client.completions.create(model=engine.model_name, prompt="Hi", max_tokens=2).choices


def test_disconnect_aborts_and_frees_pages(server, engine) -> None:
    body = {"prompt": "Count forever:", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: "):
                break
        assert engine.stats()["running"] == 1
    wait_idle(engine, timeout=10)  # the stream was closed mid-way
    body["stream"] = False
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=1.0)
    wait_idle(engine, timeout=10)
    engine.check_integrity()


def test_metrics_parse_with_prometheus_parser(server, client, engine) -> None:
    client.completions.create(model=engine.model_name, prompt="Hi", max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    names = {f.name for f in text_string_to_metric_families(text)}
    for name in (
        "llmconsole:num_running_reqs",
        "llmconsole:num_queue_reqs",
        "llmconsole:token_usage",
        "llmconsole:gen_throughput",
        "llmconsole:generation_tokens",
        "llmconsole:prompt_tokens",
        "llmconsole:time_to_first_token_seconds",
        "llmconsole:e2e_request_latency_seconds",
    ):
        assert name in names, sorted(names)


def test_engine_endpoint_describes_state(server, engine) -> None:
    info = httpx.get(server.url + "/v1/engine").json()
    assert info["model"] == engine.model_name and info["state"] == "running"
    assert info["config"]["page_size"] == engine.config.page_size
    assert info["counters"]["finished_requests"] >= 1


def test_usage_reports_cached_prompt_tokens_and_flush_cache_drops_them(
    server, client, engine
) -> None:
    httpx.post(server.url + "/flush_cache", timeout=30).raise_for_status()
    first = chat_text(client, engine, max_tokens=4, temperature=0)
    again = chat_text(client, engine, max_tokens=4, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    # The whole prompt but its last token, which is computed to sample from.
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    assert again.choices[0].message.content == first.choices[0].message.content
    wait_idle(engine)
    flushed = httpx.post(server.url + "/flush_cache", timeout=30).json()
    assert flushed["freed_pages"] >= first.usage.prompt_tokens and flushed["page_size"] == 1
    assert httpx.get(server.url + "/flush_cache", timeout=30).json()["freed_pages"] == 0
    third = chat_text(client, engine, max_tokens=4, temperature=0)
    assert third.usage.prompt_tokens_details.cached_tokens == 0


def test_a_flush_behind_a_busy_engine_answers_504_and_still_runs(
    server, client, engine, monkeypatch
) -> None:
    """The engine thread takes a flush between two steps. When it is held up longer than the
    route waits, the caller hears why (504), and the flush runs once the engine is free."""
    from llmconsole.core.server import app as app_module

    wait_idle(engine)
    engine.flush_cache()
    chat_text(client, engine, max_tokens=2, temperature=0)  # something to flush
    wait_idle(engine)

    def flushes() -> int:
        events = of_type(engine.telemetry.snapshot(), EngineEvent)
        return sum(e.kind == "cache_flush" for e in events)

    before = flushes()
    release = threading.Event()
    engine.fault_hook = lambda req: release.wait(30)  # the next token holds the engine thread
    monkeypatch.setattr(app_module, "FLUSH_TIMEOUT_S", 0.3)
    try:
        with ThreadPoolExecutor(1) as pool:
            busy = pool.submit(chat_text, client, engine, max_tokens=2, temperature=0)
            assert wait_until(lambda: engine.stats()["running"] == 1)
            _assert_error(httpx.post(server.url + "/flush_cache", timeout=30), 504, "queued")
            assert flushes() == before  # not yet
            release.set()
            busy.result(30)
    finally:
        engine.fault_hook = None
        release.set()
    wait_idle(engine)
    assert flushes() == before + 1  # the queued flush ran once the engine was free
    assert httpx.post(server.url + "/flush_cache", timeout=30).status_code == 200


def test_api_key_is_enforced(engine) -> None:
    with ApiServer(engine, port=0, api_key="s3cret") as srv:
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        resp = httpx.get(srv.url + "/v1/models")
        _assert_error(resp, 401, "API key")
        _assert_error(httpx.post(srv.url + "/flush_cache"), 401, "API key")
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.models.list().data
        assert httpx.get(srv.url + "/health").status_code == 200  # health stays open


def _greedy(n: int):
    from llmconsole.core import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0)


def test_a_stopped_engine_answers_503_not_500(tmp_path) -> None:
    from llmconsole.core import EngineConfig

    with Engine(EngineConfig(model="tiny-llama", load_format="dummy")) as tiny:
        with ApiServer(tiny, port=0) as srv:
            tiny.shutdown()
            resp = _post(srv, "/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 2})
            _assert_error(resp, 503, "shut down")
            assert httpx.get(srv.url + "/health").status_code == 503
