"""Tests for speculative decoding's pure parts: the n-gram proposer and draft verification
(CPU, fast). The sampling tests are statistical with fixed seeds: they check that speculative
sampling is lossless, i.e. emits tokens distributed exactly as the target samples them."""

from __future__ import annotations

import dataclasses
import math
import random
import time

import pytest
import torch

from llmconsole.core.sampling import SamplingBatch, sample, sampling_probs
from llmconsole.core.sampling_params import SamplingParams
from llmconsole.core.spec.ngram import propose_ngram
from llmconsole.core.spec.verify import Verdict, verify_greedy, verify_sampling

# ---------------------------------------------------------------- n-gram proposer


def naive_ngram(
    tokens: list[int], num_draft: int, max_ngram: int = 4, min_ngram: int = 1, window: int = 4096
) -> list[int]:
    """The definition, spelled out: the longest n-gram with an occurrence followed by num_draft
    tokens, at its most recent such occurrence; else the longest n-gram at its earliest one."""
    seq = tokens[-window:]
    fallback: list[int] | None = None
    for n in range(max_ngram, min_ngram - 1, -1):
        if n >= len(seq):
            continue
        key = seq[-n:]
        ends = [e for e in range(n - 1, len(seq) - 1) if seq[e - n + 1 : e + 1] == key]
        full = [e for e in ends if e + num_draft <= len(seq) - 1]
        if full:
            return seq[full[-1] + 1 : full[-1] + 1 + num_draft]
        if ends and fallback is None:
            fallback = seq[ends[0] + 1 : ends[0] + 1 + num_draft]
    return fallback or []


def test_ngram_drafts_a_whole_run() -> None:
    # In a run the longer n-grams only recur one token back; the 1-gram's earlier occurrence
    # is followed by a full draft.
    assert propose_ngram([5, 7, 7, 7, 7], num_draft=3) == [7, 7, 7]
    assert propose_ngram([1, 2, 1, 2, 1, 2], num_draft=4) == [1, 2, 1, 2]


def test_ngram_takes_the_most_recent_match() -> None:
    # "5 6" occurs twice before the tail; the later one is followed by 8 9.
    tokens = [5, 6, 7, 7, 1, 5, 6, 8, 9, 2, 5, 6]
    assert propose_ngram(tokens, num_draft=2) == [8, 9]


def test_ngram_prefers_a_longer_match_over_a_more_recent_one() -> None:
    # "4 5 6" (3-gram) at the start beats the more recent "5 6" (2-gram) before 9.
    tokens = [4, 5, 6, 1, 2, 0, 5, 6, 9, 4, 5, 6]
    assert propose_ngram(tokens, num_draft=2) == [1, 2]
    assert propose_ngram(tokens, num_draft=2, max_ngram=2) == [9, 4]


def test_ngram_respects_num_draft_and_the_end_of_the_sequence() -> None:
    tokens = [1, 2, 3, 4, 5, 6, 1, 2]
    assert propose_ngram(tokens, num_draft=3) == [3, 4, 5]
    assert propose_ngram(tokens, num_draft=1) == [3]
    assert propose_ngram(tokens, num_draft=0) == []
    assert propose_ngram(tokens, num_draft=-1) == []
    # The latest earlier "7" is one before the end: only one token follows it.
    assert propose_ngram([7, 7, 7], num_draft=5) == [7]


def test_ngram_window_limits_the_search() -> None:
    tokens = [5, 6, 0, 0, 0, 0, 0, 0, 5]
    assert propose_ngram(tokens, num_draft=2) == [6, 0]
    assert propose_ngram(tokens, num_draft=2, window=len(tokens) - 1) == []  # first 5 left out
    # A match must start inside the window: cutting the leading 1 leaves only the 1-gram "2".
    tokens = [1, 2, 3, 8, 8, 8, 8, 1, 2]
    assert propose_ngram(tokens, num_draft=2, min_ngram=2) == [3, 8]
    assert propose_ngram(tokens, num_draft=2, min_ngram=2, window=len(tokens) - 1) == []
    assert propose_ngram(tokens, num_draft=2, window=len(tokens) - 1) == [3, 8]


def test_ngram_returns_nothing_without_a_match() -> None:
    assert propose_ngram([1, 2, 3, 4], num_draft=3) == []
    assert propose_ngram([], num_draft=3) == []
    assert propose_ngram([1], num_draft=3) == []
    # Only a 1-gram matches, so min_ngram=2 rejects it.
    assert propose_ngram([3, 9, 1, 3], num_draft=2, min_ngram=2) == []
    assert propose_ngram([3, 9, 1, 3], num_draft=2) == [9, 1]


def test_ngram_proposes_the_continuation_of_repeated_code() -> None:
    line = [101, 7, 8, 9, 10, 102]  # e.g. "x = foo(a, b)\n" as tokens
    tokens = [1, 2] + line + [3, 4] + line + [5] + line[:3]
    assert propose_ngram(tokens, num_draft=4) == line[3:] + [5]


def test_ngram_matches_the_reference_on_random_sequences() -> None:
    rng = random.Random(0)
    for _ in range(500):
        vocab = rng.randint(2, 6)
        tokens = [rng.randrange(vocab) for _ in range(rng.randint(0, 40))]
        args = dict(
            num_draft=rng.randint(1, 6),
            max_ngram=rng.randint(1, 5),
            min_ngram=rng.randint(1, 3),
            window=rng.randint(1, 45),
        )
        assert propose_ngram(tokens, **args) == naive_ngram(tokens, **args), (tokens, args)


def test_ngram_is_cheap_on_a_long_repetitive_sequence() -> None:
    # Many partial matches (every other token equals the last one) is the worst case for a scan.
    tokens = [0, 1] * 2047 + [2, 0]
    start = time.perf_counter()
    for _ in range(200):
        out = propose_ngram(tokens, num_draft=5)
    elapsed = time.perf_counter() - start
    assert out == naive_ngram(tokens, num_draft=5)
    print(f"propose_ngram on 4096 tokens: {elapsed / 200 * 1e6:.0f} us/call")  # not asserted


# ---------------------------------------------------------------- greedy verification


def greedy(target: list[list[int]], drafts: list[list[int]], lens: list[int]) -> Verdict:
    return verify_greedy(torch.tensor(target), torch.tensor(drafts), torch.tensor(lens))


def test_greedy_all_accepted_appends_the_bonus_token() -> None:
    verdict = greedy([[5, 6, 7, 8]], [[5, 6, 7]], [3])
    assert verdict.accepted.tolist() == [3]
    assert verdict.tokens.tolist() == [[5, 6, 7, 8]]
    assert verdict.accepted.dtype == verdict.tokens.dtype == torch.int64


def test_greedy_none_accepted_emits_the_targets_first_token() -> None:
    verdict = greedy([[9, 6, 7, 8]], [[5, 6, 7]], [3])
    assert verdict.accepted.tolist() == [0]
    assert verdict.tokens.tolist() == [[9, -1, -1, -1]]


def test_greedy_partial_acceptance_emits_the_correction() -> None:
    verdict = greedy([[5, 6, 4, 8]], [[5, 6, 7]], [3])
    assert verdict.accepted.tolist() == [2]
    assert verdict.tokens.tolist() == [[5, 6, 4, -1]]


def test_greedy_mixed_batch_ignores_padding() -> None:
    verdict = greedy(
        target=[
            [5, 6, 7, 8],  # all 3 accepted
            [5, 0, 7, 8],  # 1 accepted, then a later match does not count
            [3, 4, 7, 8],  # no drafts: the target's own token, padding ignored
            [5, 6, 1, 2],  # 2 drafts, both accepted, then the target's 1
            [5, 6, 1, 2],  # 2 real drafts, then padding equal to the target's token
        ],
        drafts=[[5, 6, 7], [5, 6, 7], [-1, -1, -1], [5, 6, -1], [5, 6, 1]],
        lens=[3, 3, 0, 2, 2],
    )
    assert verdict.accepted.tolist() == [3, 1, 0, 2, 2]
    assert verdict.tokens.tolist() == [
        [5, 6, 7, 8],
        [5, 0, -1, -1],
        [3, -1, -1, -1],
        [5, 6, 1, -1],
        [5, 6, 1, -1],
    ]


def test_greedy_without_any_drafts() -> None:
    verdict = verify_greedy(
        torch.tensor([[4], [2]]),
        torch.empty(2, 0, dtype=torch.int64),
        torch.zeros(2, dtype=torch.int64),
    )
    assert verdict.accepted.tolist() == [0, 0]
    assert verdict.tokens.tolist() == [[4], [2]]


# ---------------------------------------------------------------- speculative sampling

VOCAB = 6
TRIALS = 40_000


def random_dist(gen: torch.Generator, *shape: int, sharpness: float) -> torch.Tensor:
    """Random distributions over VOCAB, floored so every token keeps enough mass to count."""
    probs = (torch.randn(*shape, VOCAB, generator=gen) * sharpness).softmax(-1)
    return 0.85 * probs + 0.15 / VOCAB


def chi2_critical(dof: int, z: float = 5.0) -> float:
    """Wilson-Hilferty upper quantile of chi-square(dof) at normal score z (z=5: p ~ 3e-7)."""
    h = 2.0 / (9.0 * dof)
    return dof * (1.0 - h + z * math.sqrt(h)) ** 3


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson statistic of observed counts [V] against a distribution [V]."""
    expected = counts.sum().double() * probs.double()
    return float(((counts.double() - expected) ** 2 / expected).sum())


def conditional_chi2(
    context: torch.Tensor, nxt: torch.Tensor, table: torch.Tensor, min_count: int = 300
) -> tuple[float, int]:
    """Sum over contexts c with enough samples of chi2(nxt | context = c vs table[c]), and its
    degrees of freedom."""
    # context, nxt: [N]; table: [C, V], the next token's distribution per context
    total, dof = 0.0, 0
    for c in range(table.shape[0]):
        picked = nxt[context == c]
        if picked.numel() >= min_count:
            total += chi2(torch.bincount(picked, minlength=VOCAB), table[c])
            dof += VOCAB - 1
    return total, dof


@dataclasses.dataclass
class Simulation:
    p0: torch.Tensor  # [V]
    p1: torch.Tensor  # [V, V]: target p(t1 | t0)
    p2: torch.Tensor  # [V, V, V]: target p(t2 | t0, t1)
    q0: torch.Tensor  # [V]
    drafts: torch.Tensor  # [N, 2]
    lens: torch.Tensor  # [N]
    verdict: Verdict


def simulate(seed: int, deterministic: bool) -> Simulation:
    """TRIALS independent steps of up to 2 drafts from a toy target p and drafter q, whose
    position-1 and -2 distributions depend on the earlier tokens (as a language model's do),
    verified in one batched call. Rows have 0, 1 or 2 real drafts."""
    gen = torch.Generator().manual_seed(seed)
    p0 = random_dist(gen, sharpness=1.0)
    p1 = random_dist(gen, VOCAB, sharpness=1.0)
    p2 = random_dist(gen, VOCAB, VOCAB, sharpness=1.0)
    q0 = random_dist(gen, sharpness=2.0)
    q1 = random_dist(gen, VOCAB, sharpness=2.0)
    if deterministic:  # n-gram style: the drafts follow no distribution the verifier knows
        d0 = torch.randint(VOCAB, (TRIALS,), generator=gen)
        d1 = (d0 + 1) % VOCAB
    else:
        d0 = torch.multinomial(q0, TRIALS, replacement=True, generator=gen)
        d1 = torch.multinomial(q1[d0], 1, generator=gen).squeeze(1)
    lens = torch.multinomial(torch.tensor([0.1, 0.1, 0.8]), TRIALS, True, generator=gen)
    drafts = torch.stack([d0, d1], dim=1)  # [N, 2]
    drafts = drafts.masked_fill(torch.arange(2) >= lens.unsqueeze(1), -1)
    target = torch.stack([p0.expand(TRIALS, -1), p1[d0], p2[d0, d1]], dim=1)  # [N, 3, V]
    draft_probs = None if deterministic else torch.stack([q0.expand(TRIALS, -1), q1[d0]], dim=1)
    torch.manual_seed(seed)
    verdict = verify_sampling(target, drafts, lens, draft_probs, [None] * TRIALS)
    return Simulation(p0, p1, p2, q0, drafts, lens, verdict)


@pytest.mark.parametrize("deterministic", [False, True], ids=["draft-probs", "one-hot"])
def test_sampling_is_lossless(deterministic: bool) -> None:
    sim = simulate(seed=1234, deterministic=deterministic)
    tokens, accepted = sim.verdict.tokens, sim.verdict.accepted
    emitted = accepted + 1  # [N]
    pos = torch.arange(3).unsqueeze(0)
    assert ((accepted >= 0) & (accepted <= sim.lens)).all()
    assert ((tokens >= 0) == (pos < emitted.unsqueeze(1))).all()  # -1 right after the emitted
    kept = pos[:, :2] < accepted.unsqueeze(1)
    assert (tokens[:, :2][kept] == sim.drafts[kept]).all()  # accepted tokens are the drafts
    assert 0 < (accepted == 2).sum() < (sim.lens == 2).sum()  # both outcomes are exercised

    # Every step emits a first token, which must follow p0 whatever was drafted.
    limit = chi2_critical(VOCAB - 1)
    assert chi2(torch.bincount(tokens[:, 0], minlength=VOCAB), sim.p0) < limit
    # Given the first token, the second (when emitted) follows p1(. | t0).
    two = emitted >= 2
    stat, dof = conditional_chi2(tokens[two, 0], tokens[two, 1], sim.p1)
    assert dof >= 3 * (VOCAB - 1) and stat < chi2_critical(dof)
    # Given both, the third (the bonus token after two accepted drafts) follows p2(. | t0, t1).
    three = emitted == 3
    context = tokens[three, 0] * VOCAB + tokens[three, 1]
    stat, dof = conditional_chi2(context, tokens[three, 2], sim.p2.reshape(-1, VOCAB))
    assert dof >= VOCAB - 1 and stat < chi2_critical(dof)  # one-hot drafts: 6 contexts


def test_the_lossless_check_catches_classic_mistakes() -> None:
    """The first-token check above has the power to fail: its expected statistic under two
    classic bugs (computed exactly, from the same p0 and q0) is far above its limit."""
    sim = simulate(seed=1234, deterministic=False)
    p, q = sim.p0.double(), sim.q0.double()
    n = TRIALS * 0.8  # rows with drafts

    def expected_chi2(wrong: torch.Tensor) -> float:
        return float(n * ((wrong - p) ** 2 / p).sum())

    limit = chi2_critical(VOCAB - 1)
    # Accepting every draft emits q.
    assert expected_chi2(q) > 10 * limit
    # Drawing the correction from p instead of norm(max(p - q, 0)).
    overlap = torch.minimum(p, q)
    assert expected_chi2(overlap + (1 - overlap.sum()) * p) > 10 * limit


def test_sampling_without_drafts_is_plain_sampling() -> None:
    gen = torch.Generator().manual_seed(0)
    probs = torch.randn(3, VOCAB, generator=gen).softmax(-1)  # [B, V]
    torch.manual_seed(0)
    verdict = verify_sampling(
        probs.unsqueeze(1).expand(-1, TRIALS // 4, -1).reshape(-1, 1, VOCAB),
        torch.empty(3 * (TRIALS // 4), 0, dtype=torch.int64),
        torch.zeros(3 * (TRIALS // 4), dtype=torch.int64),
        None,
        [None] * (3 * (TRIALS // 4)),
    )
    assert (verdict.accepted == 0).all()
    for row, tokens in enumerate(verdict.tokens[:, 0].view(3, -1)):
        assert chi2(torch.bincount(tokens, minlength=VOCAB), probs[row]) < chi2_critical(VOCAB - 1)


def test_seeded_rows_without_drafts_match_core_sampling() -> None:
    """A seeded request with nothing drafted draws the very token the plain sampler would."""
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(1)) * 3
    params = SamplingParams(temperature=0.7, top_p=0.9, seed=5)
    for seed in range(20):
        plain_gen, spec_gen = (torch.Generator().manual_seed(seed) for _ in range(2))
        batch = SamplingBatch.build([params], [[]], [[]], [plain_gen], 50, "cpu")
        expected = sample(logits, batch).token_ids
        verdict = verify_sampling(
            sampling_probs(logits, batch).unsqueeze(1).expand(1, 4, -1),
            torch.full((1, 3), -1),
            torch.zeros(1, dtype=torch.int64),
            None,
            [spec_gen],
        )
        assert verdict.tokens.tolist() == [[int(expected), -1, -1, -1]]


def test_seeded_row_is_reproducible_whatever_shares_the_batch() -> None:
    gen = torch.Generator().manual_seed(3)
    probs = random_dist(gen, 3, sharpness=1.0)  # [K + 1, V] for the seeded row
    drafts = [1, 4]
    q = random_dist(gen, 2, sharpness=2.0)  # [K, V]

    def run_seeded(seed: int, batch: int, width: int, row: int) -> list[list[int]]:
        """Two consecutive steps of the seeded row placed at `row` among random neighbours
        with `width` - 1 draft slots."""
        row_gen = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(2):
            target = random_dist(gen, batch, width, sharpness=1.0)
            draft_probs = random_dist(gen, batch, width - 1, sharpness=1.0)
            draft_ids = torch.randint(VOCAB, (batch, width - 1), generator=gen)
            lens = torch.randint(width, (batch,), generator=gen)
            target[row, :3], draft_probs[row, :2] = probs, q
            draft_ids[row, :2], draft_ids[row, 2:], lens[row] = torch.tensor(drafts), -1, 2
            gens: list[torch.Generator | None] = [None] * batch
            gens[row] = row_gen
            verdict = verify_sampling(target, draft_ids, lens, draft_probs, gens)
            out.append([int(verdict.accepted[row]), *verdict.tokens[row, :3].tolist()])
        return out

    for seed in range(10):
        alone = run_seeded(seed, batch=1, width=3, row=0)
        assert run_seeded(seed, batch=5, width=3, row=2) == alone
        assert run_seeded(seed, batch=7, width=6, row=6) == alone
    # The seed matters: different seeds give different outcomes.
    assert len({str(run_seeded(seed, 1, 3, 0)) for seed in range(10)}) > 1


def test_equal_distributions_accept_every_draft() -> None:
    gen = torch.Generator().manual_seed(4)
    target = random_dist(gen, 1000, 3, sharpness=1.0)  # [N, K + 1, V]
    drafts = torch.multinomial(target[:, :2].reshape(-1, VOCAB), 1, generator=gen).view(-1, 2)
    lens = torch.full((1000,), 2)
    verdict = verify_sampling(target, drafts, lens, target[:, :2], [None] * 1000)
    assert (verdict.accepted == 2).all()
    assert (verdict.tokens[:, :2] == drafts).all()


def test_impossible_draft_is_rejected_without_nan() -> None:
    """A draft q gave zero mass (so q could not have drawn it) with p == q: the residual
    max(p - q, 0) is all zero, and the verifier falls back to sampling p."""
    probs = torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0, 0.0]).expand(500, 2, -1).contiguous()
    drafts = torch.full((500, 1), 3)
    lens = torch.ones(500, dtype=torch.int64)
    for draft_probs in (probs[:, :1], None):
        verdict = verify_sampling(probs, drafts, lens, draft_probs, [None] * 500)
        assert (verdict.accepted == 0).all()
        first = verdict.tokens[:, 0]
        assert ((first == 0) | (first == 1)).all() and (first == 0).any() and (first == 1).any()
