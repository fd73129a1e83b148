"""Tests for SamplingParams validation and the batched sampler (CPU, fast)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from llmconsole.core.sampling import (
    SamplingBatch,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
    sample,
)
from llmconsole.core.sampling_params import SamplingParams


def make_batch(
    params: list[SamplingParams],
    vocab_size: int,
    prompt: list[list[int]] | None = None,
    output: list[list[int]] | None = None,
    generators: list[torch.Generator | None] | None = None,
) -> SamplingBatch:
    n = len(params)
    return SamplingBatch.build(
        params,
        prompt if prompt is not None else [[] for _ in range(n)],
        output if output is not None else [[] for _ in range(n)],
        generators if generators is not None else [None] * n,
        vocab_size,
        "cpu",
    )


def draw_many(logits_row: torch.Tensor, params: SamplingParams, n: int) -> torch.Tensor:
    """n independent draws from one distribution, as one batch of n identical rows."""
    # logits_row: [V] -> tokens: [n]
    logits = logits_row.unsqueeze(0).expand(n, -1).contiguous()
    return sample(logits, make_batch([params] * n, logits.shape[-1])).token_ids


# ---------------------------------------------------------------- SamplingParams


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("max_tokens", -5),
        ("max_tokens", 1.5),
        ("min_tokens", -1),
        ("temperature", -1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", math.nan),
        ("top_k", 0),
        ("top_k", -2),
        ("top_k", 2.0),
        ("min_p", -0.1),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", math.inf),
        ("frequency_penalty", 2.5),
        ("frequency_penalty", -2.01),
        ("presence_penalty", 3.0),
        ("presence_penalty", -math.inf),
        ("seed", "42"),
        ("logprobs", -1),
        ("logprobs", 21),
        ("stop", ""),
        ("stop", ["ok", ""]),
        ("stop", [3]),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", ["a"]),
        ("ignore_eos", "yes"),
    ],
)
def test_params_validation_names_parameter(field: str, value: object) -> None:
    prefix = "stop strings" if field == "stop" else field
    with pytest.raises(ValueError, match=prefix):
        SamplingParams(**{field: value})


def test_params_messages_are_specific() -> None:
    with pytest.raises(ValueError, match=r"temperature must be >= 0, got -1"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match=r"top_k must be -1 \(disabled\) or >= 1"):
        SamplingParams(top_k=0)
    with pytest.raises(ValueError, match="finite"):
        SamplingParams(top_p=math.nan)


def test_params_defaults_and_normalisation() -> None:
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.logprobs) == (16, 1.0, 1.0, -1, None)
    assert SamplingParams(stop="END").stop == ("END",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop_token_ids=[2, 3]).stop_token_ids == (2, 3)
    assert SamplingParams(stop_token_ids=7).stop_token_ids == (7,)
    assert SamplingParams(max_tokens=None).max_tokens is None
    assert SamplingParams(logprobs=0).logprobs == 0
    assert SamplingParams(top_p=1, frequency_penalty=-2, presence_penalty=2).top_p == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5  # type: ignore[misc]


def test_params_greedy_property() -> None:
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=0.7, top_k=1).greedy
    assert not SamplingParams(temperature=0.7, top_k=2).greedy
    assert not SamplingParams().greedy


# ---------------------------------------------------------------- greedy and filters


def test_greedy_equals_argmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 500)
    out = sample(logits, make_batch([SamplingParams(temperature=0)] * 8, 500))
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert out.logprobs is None and out.top_logprobs is None


def test_top_k_one_with_temperature_equals_argmax() -> None:
    torch.manual_seed(1)
    logits = torch.randn(16, 300)
    params = [SamplingParams(temperature=1.5, top_k=1)] * 16
    assert torch.equal(sample(logits, make_batch(params, 300)).token_ids, logits.argmax(-1))
    # The filter itself, bypassing the greedy shortcut, leaves exactly the argmax.
    kept = apply_top_k_top_p(logits, torch.ones(16, dtype=torch.int64), None)
    assert torch.equal(torch.isfinite(kept).sum(-1), torch.ones(16, dtype=torch.int64))
    assert torch.equal(kept.argmax(-1), logits.argmax(-1))


def test_top_k_never_leaves_the_k_best() -> None:
    torch.manual_seed(2)
    row = torch.randn(200) * 0.3  # flat-ish so that a broken filter would show quickly
    allowed = set(row.topk(5).indices.tolist())
    tokens = draw_many(row, SamplingParams(temperature=2.0, top_k=5), 4000)
    assert set(tokens.tolist()) == allowed


def test_top_p_keeps_smallest_nucleus() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    row = probs.log()
    filtered = apply_top_k_top_p(row.unsqueeze(0), None, torch.tensor([0.7]))
    assert torch.isfinite(filtered[0]).tolist() == [True, True, False, False]
    torch.manual_seed(3)
    tokens = draw_many(row, SamplingParams(top_p=0.7), 4000)
    assert set(tokens.tolist()) == {0, 1}


def test_top_p_tiny_keeps_top_token_and_one_keeps_all() -> None:
    row = torch.tensor([[0.1, 3.0, -40.0, 0.2]])
    tiny = apply_top_k_top_p(row, None, torch.tensor([1e-6]))
    assert torch.isfinite(tiny[0]).tolist() == [False, True, False, False]
    full = apply_top_k_top_p(row, None, torch.tensor([1.0]))
    assert torch.equal(full, row)  # no tail clipping from cumsum round-off


def test_min_p_filters() -> None:
    row = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    # Threshold 0.2 * 0.5 = 0.1: only the 0.05 token goes.
    got = apply_min_p(row.unsqueeze(0), torch.tensor([0.2]))
    assert torch.isfinite(got[0]).tolist() == [True, True, True, False]
    assert torch.equal(apply_min_p(row.unsqueeze(0), torch.tensor([0.0])), row.unsqueeze(0))
    torch.manual_seed(4)
    tokens = draw_many(row, SamplingParams(min_p=0.5), 4000)  # threshold 0.25
    assert set(tokens.tolist()) == {0, 1}


def test_empirical_distribution_matches_softmax() -> None:
    torch.manual_seed(5)
    row = torch.tensor([1.0, 0.5, 0.0, -1.0, 2.0, 0.3])
    temp, n = 0.7, 30000
    tokens = draw_many(row, SamplingParams(temperature=temp), n)
    observed = torch.bincount(tokens, minlength=6).double()
    expected = torch.softmax(row.double() / temp, -1) * n
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 20.5  # df = 5, p ~ 0.001
    # Same check must fail if temperature were ignored.
    untempered = torch.softmax(row.double(), -1) * n
    assert float(((observed - untempered) ** 2 / untempered).sum()) > 100


# ---------------------------------------------------------------- seeds


def _seeded_run(
    logits_steps: torch.Tensor, seed: int, row: int, companions: list[SamplingParams]
) -> list[int]:
    """Sample `steps` tokens for one seeded request placed at `row` among companions."""
    # logits_steps: [steps, V]
    gen = torch.Generator().manual_seed(seed)
    params = list(companions)
    params.insert(row, SamplingParams(temperature=0.9, top_p=0.95, seed=seed))
    gens: list[torch.Generator | None] = [None] * len(params)
    gens[row] = gen
    others = [torch.Generator().manual_seed(999 + i) if i % 2 else None for i in range(len(gens))]
    gens = [g if i == row else others[i] for i, g in enumerate(gens)]
    tokens = []
    for step_logits in logits_steps:
        logits = torch.randn(len(params), logits_steps.shape[-1])  # neighbours vary freely
        logits[row] = step_logits
        batch = make_batch(params, logits.shape[-1], generators=gens)
        tokens.append(int(sample(logits, batch).token_ids[row]))
    return tokens


def test_seeded_rows_reproducible_and_batch_independent() -> None:
    torch.manual_seed(6)
    steps = torch.randn(12, 400) * 0.5
    alone = _seeded_run(steps, seed=1234, row=0, companions=[])
    torch.manual_seed(77)  # a different global RNG state must not matter either
    crowded = _seeded_run(
        steps,
        seed=1234,
        row=2,
        companions=[SamplingParams(temperature=0), SamplingParams(), SamplingParams(top_k=3)],
    )
    assert alone == crowded
    assert alone != _seeded_run(steps, seed=4321, row=0, companions=[])


def test_mixed_batch_greedy_sampled_seeded() -> None:
    torch.manual_seed(8)
    logits = torch.randn(4, 100)
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.0, top_k=10),
        SamplingParams(temperature=0.8, seed=5),
        SamplingParams(temperature=0.0, seed=6),
    ]
    gens = [None, None, torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
    batch = make_batch(params, 100, generators=gens)
    assert not batch.all_greedy and batch.need_top_k and not batch.need_top_p
    out = sample(logits, batch)
    assert out.token_ids.shape == (4,) and out.token_ids.dtype == torch.int64
    assert int(out.token_ids[0]) == int(logits[0].argmax())
    assert int(out.token_ids[3]) == int(logits[3].argmax())
    assert int(out.token_ids[1]) in logits[1].topk(10).indices.tolist()
    solo = sample(
        logits[2:3], make_batch([params[2]], 100, generators=[torch.Generator().manual_seed(5)])
    )
    assert int(solo.token_ids[0]) == int(out.token_ids[2])


# ---------------------------------------------------------------- penalties


LOGITS = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
PROMPT = torch.tensor([[0, 1, -1]])
OUTPUT = torch.tensor([[1, 3, 3, -1]])  # the -1 pad must not touch token 4 (= index -1)


def _penalise(rep: float, freq: float, pres: float) -> list[float]:
    out = apply_penalties(
        LOGITS, PROMPT, OUTPUT, torch.tensor([rep]), torch.tensor([freq]), torch.tensor([pres])
    )
    return out[0].tolist()


def test_repetition_penalty_hf_style() -> None:
    # Seen (prompt+output): 0, 1, 3. Positive divided, negative multiplied.
    assert _penalise(2.0, 0.0, 0.0) == [1.0, -2.0, 0.5, 1.5, -2.0]


def test_frequency_penalty_counts_output_only() -> None:
    # Output counts: token 1 once, token 3 twice; prompt-only token 0 untouched.
    assert _penalise(1.0, 0.5, 0.0) == [2.0, -1.5, 0.5, 2.0, -2.0]


def test_presence_penalty_output_only() -> None:
    assert _penalise(1.0, 0.0, 0.25) == [2.0, -1.25, 0.5, 2.75, -2.0]


def test_penalties_combined_and_through_sample() -> None:
    assert _penalise(2.0, 0.5, 0.25) == [1.0, -2.75, 0.5, 0.25, -2.0]
    original = LOGITS.clone()
    params = SamplingParams(
        temperature=0, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25
    )
    batch = make_batch([params], 5, prompt=[[0, 1]], output=[[1, 3, 3]])
    assert batch.need_penalties
    # Raw argmax is token 3 (3.0); after penalties token 0 (1.0) wins.
    assert int(sample(LOGITS, batch).token_ids[0]) == 0
    assert torch.equal(LOGITS, original)  # caller's logits not modified


# ---------------------------------------------------------------- logprobs


def test_logprobs_match_log_softmax_and_top_n_sorted() -> None:
    torch.manual_seed(9)
    logits = torch.randn(3, 50)
    params = [
        SamplingParams(temperature=0, logprobs=2),
        SamplingParams(temperature=0.5, top_k=4, logprobs=5),  # knobs don't change logprobs
        SamplingParams(),
    ]
    out = sample(logits, make_batch(params, 50))
    ref = torch.log_softmax(logits, -1)
    assert out.logprobs is not None and out.top_logprobs is not None
    assert out.top_token_ids is not None
    torch.testing.assert_close(out.logprobs, ref.gather(1, out.token_ids[:, None]).squeeze(1))
    assert out.top_logprobs.shape == (3, 5)
    assert torch.all(out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:])
    torch.testing.assert_close(out.top_logprobs, ref.gather(1, out.top_token_ids))
    torch.testing.assert_close(out.top_logprobs, ref.topk(5, -1).values)


def test_logprobs_after_penalties_and_zero_top_n() -> None:
    params = SamplingParams(temperature=0, repetition_penalty=2.0, logprobs=0)
    out = sample(LOGITS, make_batch([params], 5, prompt=[[0, 1]], output=[[3]]))
    penalised = torch.tensor([[1.0, -2.0, 0.5, 1.5, -2.0]])
    expected = torch.log_softmax(penalised, -1)[0, 3]
    assert out.logprobs is not None and out.top_logprobs is not None
    torch.testing.assert_close(out.logprobs[0], expected)
    assert out.top_logprobs.shape == (1, 0) and out.top_token_ids is not None
    assert out.top_token_ids.shape == (1, 0)
