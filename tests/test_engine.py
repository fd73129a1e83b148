"""End to end on the real default model (SmolLM2-135M-Instruct, fp32 on CPU)."""

from __future__ import annotations

import threading

import pytest
import torch
from engine_utils import wait_idle, wait_until

from llmconsole.core import Engine, EngineConfig, RequestError, SamplingParams
from llmconsole.core.telemetry import RequestRecord, StepRecord, of_type

QUESTIONS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Give me three tips for sleeping better.",
    "Explain what a hash table is in two sentences.",
    "Translate 'good morning' into Spanish and German.",
]


def chat_ids(engine: Engine, question: str) -> list[int]:
    return engine.apply_chat_template([{"role": "user", "content": question}])


def greedy(max_tokens: int = 32, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, **kw)


@pytest.fixture(scope="module")
def hf_model(engine: Engine):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(engine.loaded.source.path, dtype=torch.float32)
    return model.eval()


def test_greedy_tokens_equal_transformers_generate(engine: Engine, hf_model) -> None:
    prompts = [chat_ids(engine, q) for q in QUESTIONS]
    ours = engine.generate(prompts, greedy(32))
    for prompt, result in zip(prompts, ours, strict=True):
        with torch.no_grad():
            ref = hf_model.generate(
                torch.tensor([prompt]), max_new_tokens=32, do_sample=False, pad_token_id=2
            )[0, len(prompt) :].tolist()
        assert result.token_ids == ref
        assert result.finish_reason == ("stop" if len(ref) < 32 else "length")
    assert "Paris" in ours[0].text  # the weights really are the model's
    wait_idle(engine)


def test_concurrent_mixed_lengths_equal_one_at_a_time(engine: Engine) -> None:
    prompts = [chat_ids(engine, q * (1 + i % 4)) for i, q in enumerate(QUESTIONS * 4)][:16]
    lengths = [8 + (i * 5) % 24 for i in range(16)]
    alone = [
        engine.generate([p], greedy(n))[0].token_ids for p, n in zip(prompts, lengths, strict=True)
    ]
    handles = [engine.submit(p, greedy(n)) for p, n in zip(prompts, lengths, strict=True)]
    together = [h.result().token_ids for h in handles]
    assert together == alone
    steps = of_type(engine.telemetry.snapshot(), StepRecord)
    assert max(s.batch_size for s in steps if s.kind == "decode") > 8  # really batched
    wait_idle(engine)
    engine.check_integrity()


def test_chunked_prefill_and_retraction_keep_outputs_identical(engine: Engine) -> None:
    # Five requests of ~70 tokens each against a 96-token pool force retraction (16 in a run
    # here), and every prefill (re-prefills included) goes in 7-token chunks.
    prompts = [chat_ids(engine, q) for q in QUESTIONS]
    expected = [r.token_ids for r in engine.generate(prompts, greedy(32, ignore_eos=True))]
    small = Engine(EngineConfig(chunked_prefill_size=7, max_total_tokens=96, page_size=4))
    try:
        got = [r.token_ids for r in small.generate(prompts, greedy(32, ignore_eos=True))]
        records = small.telemetry.snapshot()
        wait_idle(small)
        small.check_integrity()
    finally:
        small.shutdown()
    assert got == expected
    steps = of_type(records, StepRecord)
    assert max(s.num_tokens for s in steps if s.kind == "prefill") <= 7
    assert sum(s.retracted for s in steps) > 0, "the tiny pool should have forced retraction"
    assert sum(r.retractions for r in of_type(records, RequestRecord)) > 0


def test_seeded_sampling_is_reproducible(engine: Engine) -> None:
    prompt = chat_ids(engine, "Tell me a short story about a robot.")

    def run(seed: int) -> list[int]:
        params = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=seed)
        return engine.generate([prompt], params)[0].token_ids

    a, b, c = run(1234), run(1234), run(99)
    assert a == b
    assert a != c
    # Same seed in the middle of a busy batch: still the same tokens.
    others = [engine.submit(chat_ids(engine, q), SamplingParams(max_tokens=24)) for q in QUESTIONS]
    mid = engine.submit(
        prompt, SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=1234)
    )
    assert mid.result().token_ids == a
    for h in others:
        h.result()


def test_stop_string_across_tokens_stops_and_is_not_emitted(engine: Engine) -> None:
    prompt = chat_ids(engine, "What is the capital of France?")
    full = engine.generate([prompt], greedy(40, ignore_eos=True))[0]
    tokenizer = engine.tokenizer
    # Pick a stop string that starts inside one token and ends inside a later one.
    pieces = [tokenizer.decode([t]) for t in full.token_ids]
    offsets = [sum(len(p) for p in pieces[:i]) for i in range(len(pieces))]
    i = next(
        k for k in range(2, len(pieces) - 1) if len(pieces[k]) >= 2 and len(pieces[k + 1]) >= 1
    )
    start = offsets[i] + 1
    stop = full.text[start : offsets[i + 1] + 1]
    assert len(stop) >= 2
    cut = full.text.find(stop)
    result = engine.generate([prompt], greedy(40, ignore_eos=True, stop=[stop]))[0]
    assert result.finish_reason == "stop"
    assert result.text == full.text[:cut]
    # Streamed deltas add up to the same text and never contain the stop string.
    streamed = "".join(d.text for d in engine.submit(prompt, greedy(40, stop=[stop])))
    assert streamed == full.text[:cut]


def test_streamed_text_equals_final_text_and_usage_counts(engine: Engine) -> None:
    prompt = chat_ids(engine, "List five fruits.")
    deltas = list(engine.submit(prompt, greedy(30)))
    assert deltas[-1].finished and sum(1 for d in deltas if d.finished) == 1
    text = "".join(d.text for d in deltas)
    ids = [t for d in deltas for t in d.token_ids]
    result = engine.generate([prompt], greedy(30))[0]
    assert text == result.text and ids == result.token_ids
    assert deltas[-1].usage.prompt_tokens == len(prompt)
    assert deltas[-1].usage.completion_tokens == len(ids)


def test_logprobs_match_a_full_softmax(engine: Engine, hf_model) -> None:
    prompt = chat_ids(engine, "Name a color.")
    result = engine.generate([prompt], greedy(3, logprobs=5))[0]
    assert len(result.logprobs) == len(result.token_ids) == 3
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt])).logits[0, -1]
    ref = torch.log_softmax(logits, -1)
    first = result.logprobs[0]
    assert first.token_id == result.token_ids[0] == int(ref.argmax())
    assert first.logprob == pytest.approx(float(ref.max()), abs=1e-3)
    assert [t for t, _ in first.top] == ref.topk(5).indices.tolist()


def test_too_long_prompt_fails_alone(engine: Engine) -> None:
    too_long = [5] * (engine.max_request_tokens + 10)
    ok = chat_ids(engine, "Say hi.")
    results = engine.generate([ok, too_long, ok], greedy(8))
    assert results[0].finish_reason in ("stop", "length") and results[0].token_ids
    assert results[1].finish_reason == "error" and "prompt has" in results[1].error
    assert results[2].token_ids == results[0].token_ids
    with pytest.raises(RequestError, match="exceeds the limit"):
        engine.submit(ok, SamplingParams(max_tokens=engine.max_request_tokens))
    with pytest.raises(RequestError, match="empty"):
        engine.submit([], greedy(4))


def test_a_failing_request_does_not_hurt_the_others(engine: Engine) -> None:
    prompts = [chat_ids(engine, q) for q in QUESTIONS[:3]]
    expected = [r.token_ids for r in engine.generate(prompts, greedy(16, ignore_eos=True))]
    victim_rid = "faulty-request"

    def hook(req) -> None:
        if req.rid == victim_rid and len(req.output_ids) == 3:
            raise RuntimeError("injected fault")

    engine.fault_hook = hook
    try:
        handles = [engine.submit(p, greedy(16, ignore_eos=True)) for p in prompts]
        bad = engine.submit(prompts[0], greedy(16, ignore_eos=True), rid=victim_rid)
        results = [h.result() for h in handles]
        bad_result = bad.result()
    finally:
        engine.fault_hook = None
    assert [r.token_ids for r in results] == expected
    assert bad_result.finish_reason == "error" and "injected fault" in bad_result.error
    assert len(bad_result.token_ids) == 3
    wait_idle(engine)
    engine.check_integrity()


def test_abort_frees_pages(engine: Engine) -> None:
    handle = engine.submit(
        chat_ids(engine, "Count to one thousand."), greedy(2000, ignore_eos=True)
    )
    first = handle.get(timeout=30)
    assert first is not None and not first.finished
    handle.abort()
    last = None
    for delta in handle:
        last = delta
    assert last is not None and last.finish_reason == "abort"
    wait_idle(engine)
    engine.check_integrity()


def test_submit_from_many_threads(engine: Engine) -> None:
    prompt = chat_ids(engine, "Say something nice.")
    expected = engine.generate([prompt], greedy(12))[0].token_ids
    results: list[list[int]] = []
    lock = threading.Lock()

    def client() -> None:
        ids = engine.submit(prompt, greedy(12)).result().token_ids
        with lock:
            results.append(ids)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [expected] * 8


def test_step_telemetry_describes_the_work(engine: Engine) -> None:
    sub = engine.subscribe()
    sub.poll()
    engine.generate([chat_ids(engine, q) for q in QUESTIONS[:4]], greedy(6, ignore_eos=True))
    assert wait_until(lambda: engine.stats()["running"] == 0)
    records = sub.poll()
    steps = of_type(records, StepRecord)
    reqs = of_type(records, RequestRecord)
    assert len(reqs) == 4 and all(r.completion_tokens == 6 for r in reqs)
    assert sum(s.num_generated for s in steps) == 24
    assert all(not s.cuda_graph and s.padded_bs == s.batch_size for s in steps)
    assert {s.kind for s in steps} == {"prefill", "decode"}
    assert all(r.first_token is not None and r.first_token <= r.finish for r in reqs)
