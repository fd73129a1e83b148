"""Speculative decoding in the engine (n-gram prompt lookup, chain drafting) on the real default
model: lossless against plain decoding, its telemetry, its pages, and switching it live."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from engine_utils import wait_idle, wait_until

from llmconsole.core import Engine, EngineConfig, SamplingParams
from llmconsole.core.config import ConfigError
from llmconsole.core.telemetry import RequestRecord, StepRecord, of_type

# Prompts whose answers repeat what they contain (code, lists, copying), where prompt lookup
# finds drafts, and chat where it mostly does not.
PROMPTS = [
    "Repeat this line three times: the quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
    "Count from one to twenty in words: one, two, three, four,",
    "Copy this list exactly: apples, pears, plums, apples, pears, plums, apples,",
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "for i in range(10):\n    print(i)\nfor j in range(10):\n    print(j)\nfor k in range(10):\n",
    "A B C D E F G A B C D E F G A B C",
]


def greedy(max_tokens: int = 48, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def spec() -> Iterator[Engine]:
    eng = Engine(EngineConfig(speculative_algorithm="ngram", speculative_num_steps=4))
    yield eng
    eng.shutdown()


def _spec_records(engine: Engine, since: int = 0) -> list[StepRecord]:
    return [
        s for s in of_type(engine.telemetry.snapshot(), StepRecord)[since:] if s.kind == "verify"
    ]


def test_greedy_output_is_identical_with_ngram_speculation(engine: Engine, spec: Engine) -> None:
    assert spec.config.speculative_num_draft_tokens == 5  # chain: steps + 1
    expected = [r.token_ids for r in engine.generate(PROMPTS, greedy())]
    since = len(of_type(spec.telemetry.snapshot(), StepRecord))
    got = [r.token_ids for r in spec.generate(PROMPTS, greedy())]
    assert got == expected
    steps = _spec_records(spec, since)
    assert steps, "decode steps should be verify passes"
    drafted = sum(s.drafted_tokens for s in steps)
    accepted = sum(s.accepted_tokens for s in steps)
    assert drafted > 0 and 0 < accepted <= drafted
    # Fewer target passes than tokens: the point of speculating.
    assert sum(s.num_generated for s in steps) > sum(s.batch_size for s in steps)
    # Mixed accept lengths in one batch: some verify pass accepted drafts for some requests only.
    assert any(0 < s.accepted_per_position[0] < s.batch_size for s in steps if s.drafted_tokens)
    for s in steps:
        per = s.accepted_per_position
        assert sum(per) == s.accepted_tokens and list(per) == sorted(per, reverse=True)
    wait_idle(spec)
    spec.check_integrity()
    records = of_type(spec.telemetry.snapshot(), RequestRecord)[-len(PROMPTS) :]
    assert sum(r.accepted_draft_tokens for r in records) == accepted


def test_streams_logprobs_stops_and_penalties_under_speculation(engine: Engine, spec: Engine):
    prompt = PROMPTS[1]
    params = greedy(40, logprobs=2)
    plain = engine.generate([prompt], params)[0]
    handle = spec.submit(prompt, params)
    streamed = [t for delta in handle for t in delta.token_ids]
    fast = spec.generate([prompt], params)[0]
    assert streamed == fast.token_ids == plain.token_ids
    assert [lp.token_id for lp in fast.logprobs] == fast.token_ids
    for a, b in zip(fast.logprobs, plain.logprobs, strict=True):
        assert abs(a.logprob - b.logprob) < 1e-3 and len(a.top) == 2
    # A stop string inside an accepted run of drafts ends the request there.
    text = engine.generate([PROMPTS[7]], greedy(30))[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    stopped = spec.generate([PROMPTS[7]], greedy(30, stop=[stop]))[0]
    assert stopped.finish_reason == "stop" and stop not in stopped.text
    assert stopped.text == engine.generate([PROMPTS[7]], greedy(30, stop=[stop]))[0].text
    # Penalties: no drafts for that request, same output as plain decoding.
    pen = greedy(24, repetition_penalty=1.3)
    assert spec.generate([prompt], pen)[0].token_ids == engine.generate([prompt], pen)[0].token_ids
    wait_idle(spec)
    spec.check_integrity()


def test_console_and_metrics_show_acceptance(spec: Engine) -> None:
    import asyncio

    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from llmconsole.console.app import ConsoleApp
    from llmconsole.console.widgets.spec_panel import SpecPanel

    app = ConsoleApp(engine=spec)

    async def run() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            await asyncio.to_thread(spec.generate, PROMPTS[:4], greedy(32))
            await pilot.pause(0.3)
            app.refresh_all()
            panel = str(app.query_one(SpecPanel).render())
            assert "ngram" in panel and "accept length 1." in panel, panel
            assert not app.query_one(SpecPanel).has_class("-off")
            assert app.model.spec.verify_steps > 0 and app.model.spec.accepted > 0
            assert app.session is not None
            body = httpx.get(app.session.server.url + "/metrics", timeout=10).text
            values = {
                s.name: s.value
                for family in text_string_to_metric_families(body)
                for s in family.samples
            }
            assert values["llmconsole:spec_accept_length"] > 1.0
            assert 0 < values["llmconsole:spec_accept_rate"] <= 1.0

    asyncio.run(run())
    wait_idle(spec)


def test_sampled_requests_run_under_speculation(spec: Engine) -> None:
    params = SamplingParams(max_tokens=32, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
    a = spec.generate(PROMPTS[:4], params)
    b = spec.generate(PROMPTS[:4], params)
    assert all(r.error is None and len(r.token_ids) == 32 for r in a)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]  # seeded: reproducible
    wait_idle(spec)


def test_a_tiny_pool_still_verifies_and_frees_every_page(engine: Engine) -> None:
    expected = [r.token_ids for r in engine.generate(PROMPTS, greedy(40))]
    small = Engine(EngineConfig(speculative_algorithm="ngram", max_total_tokens=256, page_size=4))
    try:
        got = [r.token_ids for r in small.generate(PROMPTS, greedy(40))]
        wait_idle(small)
        small.check_integrity()
        assert small.stats()["kv_pages_used"] == 0
    finally:
        small.shutdown()
    assert got == expected


def test_speculation_switches_on_and_off_live(engine: Engine) -> None:
    expected = [r.token_ids for r in engine.generate(PROMPTS, greedy(64))]
    eng = Engine(EngineConfig())
    try:
        handles = [eng.submit(p, greedy(64)) for p in PROMPTS]
        assert wait_until(lambda: eng.counters["generated_tokens"] >= 3 * len(PROMPTS), 60)
        on = eng.restart({"speculative_algorithm": "ngram", "speculative_num_draft_tokens": 4})
        assert on.mode == "rebuild" and on.kv_kept
        assert eng.config.speculative_num_steps == 3
        assert wait_until(lambda: bool(_spec_records(eng)), 60)
        from llmconsole.core.models.source import default_model_path

        draft = eng.restart(
            {
                "speculative_algorithm": "draft",
                "speculative_draft_model_path": str(default_model_path()),
            }
        )
        assert not draft.kv_kept and draft.mode == "rebuild"  # a draft pool: a new pool
        assert eng.spec is not None and eng.spec.draft is not None
        verified = len(_spec_records(eng))
        assert wait_until(lambda: len(_spec_records(eng)) > verified, 60)
        off = eng.restart({"speculative_algorithm": "none"})
        assert eng.spec is None
        assert off.kv_kept
        assert [h.result().token_ids for h in handles] == expected
        wait_idle(eng)
        eng.check_integrity()
    finally:
        eng.shutdown()


def test_the_default_model_drafting_for_itself_is_lossless_and_accepts_nearly_all(
    engine: Engine,
) -> None:
    from llmconsole.core.models.source import default_model_path

    expected = [r.token_ids for r in engine.generate(PROMPTS[:6], greedy(40))]
    cfg = EngineConfig(
        speculative_algorithm="STANDALONE",  # SGLang's name for a draft model
        speculative_draft_model_path=str(default_model_path()),
        speculative_num_steps=3,
    )
    with Engine(cfg) as eng:
        assert eng.config.speculative_algorithm == "draft"
        got = [r.token_ids for r in eng.generate(PROMPTS[:6], greedy(40))]
        sampled = SamplingParams(max_tokens=24, temperature=0.7, seed=3, ignore_eos=True)
        draws = [eng.generate(PROMPTS[:3], sampled) for _ in range(2)]
        steps = _spec_records(eng)
        wait_idle(eng)
        eng.check_integrity()
        assert eng.stats()["kv_pages_used"] == 0
    assert got == expected
    drafted = sum(s.drafted_tokens for s in steps)
    accepted = sum(s.accepted_tokens for s in steps)
    assert drafted > 0 and accepted / drafted > 0.9  # the same model: the drafts are its own
    assert [r.token_ids for r in draws[0]] == [r.token_ids for r in draws[1]]  # seeded
    assert all(len(r.token_ids) == 24 and r.error is None for r in draws[0])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"speculative_algorithm": "eagle3"}, "needs --speculative-draft-model-path"),
        ({"speculative_algorithm": "STANDALONE"}, "needs --speculative-draft-model-path"),
        ({"speculative_algorithm": "ngram", "speculative_eagle_topk": 4}, "tree drafting"),
        (
            {
                "model": "smollm2-135m",
                "load_format": "dummy",
                "speculative_algorithm": "draft",
                "speculative_draft_model_path": "tiny-llama",
            },
            "another vocabulary",
        ),
    ],
)
def test_speculative_flags_that_cannot_run_are_refused(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Engine(EngineConfig(**changes))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_verify_passes_replay_decode_graphs() -> None:
    # Repetitive prompts so prompt lookup proposes; fp32 + triton so both runs share kernels.
    prompts = [[1, *([5, 9, 13, 21] * (6 + i))] for i in range(6)]
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    base = EngineConfig(model="smollm2-135m", load_format="dummy", dtype="float32")
    with Engine(base.replace(cuda_graph_max_bs=8)) as plain:
        expected = [r.token_ids for r in plain.generate(prompts, params)]
    with Engine(base.replace(cuda_graph_max_bs=8, speculative_algorithm="ngram")) as eng:
        got = [r.token_ids for r in eng.generate(prompts, params)]
        steps = _spec_records(eng)
        wait_idle(eng)
        eng.check_integrity()
    # fp32, the same kernels: a near-tie may still flip (split-KV summation order differs with
    # the bucket), so allow one sequence of six to part.
    assert sum(g == e for g, e in zip(got, expected, strict=True)) >= 5
    assert all(len(g) == 48 for g in got)
    # Verify passes replayed graphs with more rows than requests (a row per verified token;
    # graphs go up to 8 x 5 = 40 rows).
    assert any(s.cuda_graph and s.padded_bs > s.batch_size for s in steps)
    assert all(s.cuda_graph for s in steps)
    assert sum(s.accepted_tokens for s in steps) > 0


def test_bench_spec_sweeps_with_a_baseline_per_batch_size(tmp_path) -> None:
    import json

    from typer.testing import CliRunner

    from llmconsole.console import cli

    if not any(c.name == "spec" for c in cli.bench_app.registered_commands):
        cli._register_bench()
    out = tmp_path / "spec.jsonl"
    args = ["bench", "spec", "--dataset", "humaneval", "--no-chat", "--num-prompts", "2"]
    args += ["--batch-size", "1", "--batch-size", "2", "--num-steps", "3"]
    args += ["--max-tokens", "12", "--output-file", str(out)]
    result = CliRunner().invoke(cli.app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "accept length" in result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["concurrency"], r["num_steps"]) for r in rows] == [(1, 0), (1, 3), (2, 0), (2, 3)]
    assert all(r["output_tokens"] == 2 * 12 for r in rows)
    assert rows[0]["accept_length"] is None and rows[1]["accept_length"] >= 1.0
    assert rows[1]["num_draft_tokens"] == 4 and rows[1]["algorithm"] == "ngram"
    bad = CliRunner().invoke(cli.app, ["bench", "spec", "--algorithm", "eagle3"])
    assert bad.exit_code != 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_draft_model_drafting_for_itself() -> None:
    prompts = [[1, *range(100 + 7 * i, 160 + 7 * i)] for i in range(4)]
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    base = EngineConfig(model="smollm2-135m", load_format="dummy", dtype="float32")
    with Engine(base.replace(cuda_graph_max_bs=8)) as plain:
        expected = [r.token_ids for r in plain.generate(prompts, params)]
    spec = base.replace(
        cuda_graph_max_bs=8,
        speculative_algorithm="draft",
        speculative_draft_model_path="smollm2-135m",  # the same random weights (same seed)
        speculative_num_steps=3,
    )
    with Engine(spec) as eng:
        got = [r.token_ids for r in eng.generate(prompts, params)]
        steps = _spec_records(eng)
        wait_idle(eng)
        eng.check_integrity()
    assert sum(g == e for g, e in zip(got, expected, strict=True)) >= 3
    drafted = sum(s.drafted_tokens for s in steps)
    assert drafted > 0 and sum(s.accepted_tokens for s in steps) / drafted > 0.8
    assert any(s.cuda_graph for s in steps)


def test_a_draft_model_finds_its_own_kv_in_cached_prefixes(engine: Engine) -> None:
    """The radix cache stays on with a draft model (SGLang's default): the draft's KV lives in
    the target's pages, so a request whose prompt starts with a cached prefix finds the draft's
    KV there too and drafts from it. The default model drafting for itself accepts nearly all
    its drafts only if that KV is right."""
    from llmconsole.core.models.source import default_model_path

    system = {"role": "system", "content": "You are a terse assistant. Answer in one sentence."}
    questions = ["What is the capital of France?", "Why is the sky blue?", "What is a GPU?"]
    prompts = [
        engine.apply_chat_template([system, {"role": "user", "content": q}]) for q in questions
    ]
    expected = [r.token_ids for r in engine.generate(prompts, greedy(24))]
    cfg = EngineConfig(
        speculative_algorithm="draft",
        speculative_draft_model_path=str(default_model_path()),
        speculative_num_steps=3,
    )
    with Engine(cfg) as eng:
        assert eng.config.prefix_cache
        first = eng.generate(prompts[:1], greedy(24))[0]
        since = len(of_type(eng.telemetry.snapshot(), StepRecord))
        rest = [eng.generate([p], greedy(24))[0] for p in prompts[1:2]]
        # A restart that keeps the KV keeps the same draft model's pool, and with it the
        # draft's KV in the cache.
        assert eng.restart({"speculative_num_steps": 2}).kv_kept
        rest += [eng.generate([p], greedy(24))[0] for p in prompts[2:]]
        steps = _spec_records(eng, since)
        wait_idle(eng)
        eng.check_integrity()
    assert [r.token_ids for r in [first, *rest]] == expected
    assert all(r.usage is not None and r.usage.cached_tokens >= 20 for r in rest)
    drafted = sum(s.drafted_tokens for s in steps)
    accepted = sum(s.accepted_tokens for s in steps)
    assert drafted > 20 and accepted / drafted > 0.9
    # Arriving together: the first computes the shared system turn (the draft model catches up
    # over it right after the prefill pass), the others wait one step and read it.
    with Engine(cfg) as eng:
        together = eng.generate(prompts, greedy(24))
        wait_idle(eng)
        eng.check_integrity()
    assert [r.token_ids for r in together] == expected
    cached = [r.usage.cached_tokens if r.usage else 0 for r in together]
    assert cached[0] == 0 and all(c >= 20 for c in cached[1:]), cached
