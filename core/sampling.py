"""Batched token sampling with per-request parameters.

Every step works on the whole [B, V] logits tensor on its own device; the only Python loop is
over batch rows that own a seeded generator, because a seeded row must draw its noise from its
own stream to stay reproducible whatever else shares the batch.

Order (as in vLLM / SGLang): penalties -> logprobs -> greedy argmax | temperature -> top-k ->
top-p -> min-p -> exponential-race draw.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .sampling_params import SamplingParams
from .transfer import to_device

_PAD = -1


def _pad_ids(seqs: Sequence[Sequence[int]], device: torch.device | str) -> Tensor:
    """Right-pad token id lists with -1 into one [B, L] int64 tensor (one host->device copy)."""
    width = max((len(s) for s in seqs), default=0)
    rows = [list(s) + [_PAD] * (width - len(s)) for s in seqs]
    return to_device(torch.tensor(rows, dtype=torch.int64).reshape(len(seqs), width), device)


@dataclass(frozen=True, eq=False)
class SamplingBatch:
    """Per-row sampling parameters as tensors, built once per engine step by the caller."""

    size: int  # B, the number of rows
    # [6, B] float32 on the device: temperature (0 for greedy rows), top_p, min_p, repetition,
    # frequency and presence penalty. One queued copy, and none at all when every row is greedy
    # without penalties (the common decode step), as then nothing reads them: None.
    knobs: Tensor | None
    top_ks: Tensor | None  # [B] int64, vocab size where disabled; None unless need_top_k
    all_greedy: bool
    need_top_p: bool
    need_top_k: bool
    need_min_p: bool
    need_penalties: bool
    prompt_token_ids: Tensor | None  # [B, Lp] int64, -1 padded; None without penalties
    output_token_ids: Tensor | None  # [B, Lo] int64, -1 padded; None without penalties
    generators: tuple[torch.Generator | None, ...]  # per row; None = global RNG
    logprobs_top_n: int | None  # max top-N over rows; None when no row wants logprobs

    @staticmethod
    def build(
        params: Sequence[SamplingParams],
        prompt_ids: Sequence[Sequence[int]],
        output_ids: Sequence[Sequence[int]],
        generators: Sequence[torch.Generator | None],
        vocab_size: int,
        device: torch.device | str,
    ) -> SamplingBatch:
        """Pack the rows. Generators are owned by the caller: they must persist across steps
        (a fresh generator per step would repeat the same noise) and live on `device`."""
        n = len(params)
        if not (len(prompt_ids) == len(output_ids) == len(generators) == n):
            raise ValueError("params, prompt_ids, output_ids and generators must have equal length")

        device = torch.device(device)

        sampled = [p for p in params if not p.greedy]  # greedy rows ignore truncation
        need_penalties = any(p.penalized for p in params)
        need_top_k = any(p.top_k != -1 and p.top_k < vocab_size for p in sampled)
        wanted = [p.logprobs for p in params if p.logprobs is not None]
        knobs = None
        if sampled or need_penalties:  # queued copies: building a batch never syncs
            rows = [
                [0.0 if p.greedy else float(p.temperature) for p in params],
                [float(p.top_p) for p in params],
                [float(p.min_p) for p in params],
                [float(p.repetition_penalty) for p in params],
                [float(p.frequency_penalty) for p in params],
                [float(p.presence_penalty) for p in params],
            ]
            knobs = to_device(torch.tensor(rows, dtype=torch.float32).reshape(6, n), device)
        top_ks = None
        if need_top_k:
            ks = [vocab_size if p.top_k == -1 else min(p.top_k, vocab_size) for p in params]
            top_ks = to_device(torch.tensor(ks, dtype=torch.int64), device)
        return SamplingBatch(
            size=n,
            knobs=knobs,
            top_ks=top_ks,
            all_greedy=not sampled,
            need_top_p=any(p.top_p < 1.0 for p in sampled),
            need_top_k=need_top_k,
            need_min_p=any(p.min_p > 0.0 for p in sampled),
            need_penalties=need_penalties,
            prompt_token_ids=_pad_ids(prompt_ids, device) if need_penalties else None,
            output_token_ids=_pad_ids(output_ids, device) if need_penalties else None,
            generators=tuple(generators),
            logprobs_top_n=max(wanted) if wanted else None,
        )

    def _knob(self, i: int) -> Tensor:  # [B] float32
        if self.knobs is None:
            raise RuntimeError("an all-greedy batch without penalties holds no sampling knobs")
        return self.knobs[i]

    @property
    def temperatures(self) -> Tensor:  # [B] float32, 0 for greedy rows
        return self._knob(0)

    @property
    def top_ps(self) -> Tensor:  # [B] float32
        return self._knob(1)

    @property
    def min_ps(self) -> Tensor:  # [B] float32
        return self._knob(2)

    @property
    def repetition_penalties(self) -> Tensor:  # [B] float32
        return self._knob(3)

    @property
    def frequency_penalties(self) -> Tensor:  # [B] float32
        return self._knob(4)

    @property
    def presence_penalties(self) -> Tensor:  # [B] float32
        return self._knob(5)


@dataclass
class SampleOutput:
    token_ids: Tensor  # [B] int64
    logprobs: Tensor | None  # [B] logprob of the chosen token
    top_logprobs: Tensor | None  # [B, N], sorted descending
    top_token_ids: Tensor | None  # [B, N] int64


def _token_counts(ids: Tensor, vocab_size: int, dtype: torch.dtype) -> Tensor:
    """Count occurrences of each token id per row; -1 padding lands in a dropped extra column."""
    # ids: [B, L] -> counts: [B, V]
    index = torch.where(ids < 0, vocab_size, ids)
    counts = torch.zeros(ids.shape[0], vocab_size + 1, dtype=dtype, device=ids.device)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=dtype))
    return counts[:, :vocab_size]


def apply_penalties(
    logits: Tensor,
    prompt_ids: Tensor,
    output_ids: Tensor,
    repetition_penalties: Tensor,
    frequency_penalties: Tensor,
    presence_penalties: Tensor,
) -> Tensor:
    """Return penalised logits (input untouched).

    Repetition (HF style) covers prompt + output tokens: positive logits are divided by the
    penalty, negative ones multiplied. Frequency/presence (OpenAI style) cover output tokens only:
    subtract penalty * count and penalty * (count > 0).
    """
    # logits: [B, V]; prompt_ids: [B, Lp]; output_ids: [B, Lo]; penalties: [B]
    vocab_size = logits.shape[-1]
    out_counts = _token_counts(output_ids, vocab_size, logits.dtype)  # [B, V]
    seen = (_token_counts(prompt_ids, vocab_size, logits.dtype) > 0) | (out_counts > 0)
    rep = repetition_penalties.to(logits.dtype).unsqueeze(1)  # [B, 1]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    logits = logits - frequency_penalties.to(logits.dtype).unsqueeze(1) * out_counts
    return logits - presence_penalties.to(logits.dtype).unsqueeze(1) * (out_counts > 0)


def apply_top_k_top_p(logits: Tensor, top_ks: Tensor | None, top_ps: Tensor | None) -> Tensor:
    """Mask to -inf everything outside each row's top-k and top-p nucleus (one sort for both).

    Top-p keeps the smallest prefix whose cumulative probability reaches top_p: a token survives
    iff the mass strictly before it is < top_p, so the top token always survives. Rows with
    top_p >= 1 are left alone so float round-off in the cumsum cannot clip their tail.
    """
    # logits: [B, V]; top_ks: [B] int64; top_ps: [B] float
    if top_ks is None and top_ps is None:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
    vocab_size = logits.shape[-1]
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)  # [B, V], in sorted order
    if top_ks is not None:
        ranks = torch.arange(vocab_size, device=logits.device).unsqueeze(0)  # [1, V]
        drop = ranks >= top_ks.unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    if top_ps is not None:
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # [B, V]
        active = (top_ps < 1.0).unsqueeze(1)  # [B, 1]
        drop = drop | ((mass_before >= top_ps.unsqueeze(1).to(probs.dtype)) & active)
        drop[:, 0] = False
    drop = torch.zeros_like(drop).scatter(1, order, drop)  # back to vocab order
    return logits.masked_fill(drop, float("-inf"))


def apply_min_p(logits: Tensor, min_ps: Tensor) -> Tensor:
    """Mask tokens with prob < min_p * max prob, tested in log space to skip a softmax:
    p_i < min_p * p_max  <=>  logit_i - logit_max < log(min_p). min_p = 0 gives log 0 = -inf,
    which masks nothing."""
    # logits: [B, V]; min_ps: [B]
    max_logit = logits.max(dim=-1, keepdim=True).values  # [B, 1]
    threshold = torch.log(min_ps.to(logits.dtype)).unsqueeze(1)  # [B, 1]
    return logits.masked_fill(logits - max_logit < threshold, float("-inf"))


def _exponential_noise(like: Tensor, generators: tuple[torch.Generator | None, ...]) -> Tensor:
    """q ~ Exp(1), shape of `like`. Seeded rows draw a full row from their own generator so the
    row's noise depends only on its seed and step, never on its batch position or neighbours."""
    # like: [B, V] -> q: [B, V]
    seeded = [i for i, g in enumerate(generators) if g is not None]
    q = torch.empty_like(like)
    if len(seeded) < like.shape[0]:
        q.exponential_()  # one batched draw from the global RNG
    for i in seeded:  # the only per-row loop
        gen = generators[i]
        # Drawn where the generator lives (requests keep CPU generators), then moved.
        row = torch.empty(like.shape[1], dtype=like.dtype, device=gen.device)
        q[i] = row.exponential_(generator=gen).to(like.device, non_blocking=True)
    # exponential_ can in principle return 0; a 0 denominator would turn prob 0 into nan.
    return q.clamp_min_(torch.finfo(q.dtype).tiny)


def penalised(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """float32 logits with the rows' repetition / frequency / presence penalties applied."""
    # logits: [B, V]
    logits = logits.float()  # may alias the caller's tensor: only out-of-place ops below
    if not batch.need_penalties:
        return logits
    assert batch.prompt_token_ids is not None and batch.output_token_ids is not None
    return apply_penalties(
        logits,
        batch.prompt_token_ids,
        batch.output_token_ids,
        batch.repetition_penalties,
        batch.frequency_penalties,
        batch.presence_penalties,
    )


def sampling_probs(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """The distribution a sampled row draws from: temperature, then top-k / top-p / min-p, then
    softmax, over already penalised logits. Greedy rows come out as a softmax at temperature 1
    (callers take their argmax instead)."""
    # logits: [B, V] (penalised) -> probs: [B, V] float32
    temps = batch.temperatures.to(logits.dtype)
    is_greedy = temps == 0  # [B]
    scaled = logits / torch.where(is_greedy, 1.0, temps).unsqueeze(1)  # [B, V]
    scaled = apply_top_k_top_p(
        scaled,
        batch.top_ks if batch.need_top_k else None,
        batch.top_ps if batch.need_top_p else None,
    )
    if batch.need_min_p:
        scaled = apply_min_p(scaled, batch.min_ps)
    return scaled.softmax(dim=-1)


def draw(probs: Tensor, generators: tuple[torch.Generator | None, ...]) -> Tensor:
    """One token per row from `probs` [B, V] -> [B]: the exponential race, argmax(p_i / q_i)
    with q_i ~ Exp(1), is an exact draw from p (seeded rows use their own generator)."""
    return (probs / _exponential_noise(probs, generators)).argmax(dim=-1)


def sample(logits: Tensor, batch: SamplingBatch) -> SampleOutput:
    """Pick one token per row.

    Logprobs are log_softmax of the logits after penalties but before temperature and
    truncation: they describe the (penalised) model distribution itself, so they are comparable
    across requests with different sampler knobs and finite for every token, including ones
    top-k/top-p would have cut.
    """
    # logits: [B, V]
    if logits.dim() != 2 or logits.shape[0] != batch.size:
        raise ValueError(f"logits must be [B, V] with B={batch.size}")
    if batch.all_greedy and not batch.need_penalties and batch.logprobs_top_n is None:
        return SampleOutput(greedy_ids(logits), None, None, None)
    logits = penalised(logits, batch)
    logprobs_all = logits.log_softmax(dim=-1) if batch.logprobs_top_n is not None else None

    token_ids = logits.argmax(dim=-1)  # [B]
    if not batch.all_greedy:
        sampled = draw(sampling_probs(logits, batch), batch.generators)
        token_ids = torch.where(batch.temperatures == 0, token_ids, sampled)

    if logprobs_all is None:
        return SampleOutput(token_ids, None, None, None)
    return SampleOutput(token_ids, *top_logprobs(logprobs_all, token_ids, batch.logprobs_top_n))


def greedy_ids(logits: Tensor) -> Tensor:
    """argmax per row [B, V] -> [B] int64, in the logits' own dtype (an upcast changes no
    argmax). On CUDA two Triton passes (kernels/argmax.py; on an H100 2.2 us at batch 1 and
    26 us at 256, where torch's upcast + argmax took 30 and 161 us); Triton is imported only
    there."""
    if logits.is_cuda and logits.stride(-1) == 1:
        from ..kernels.argmax import greedy_ids as triton_greedy_ids

        return triton_greedy_ids(logits)
    return logits.argmax(dim=-1)


def top_logprobs(
    logprobs_all: Tensor, token_ids: Tensor, top_n: int | None
) -> tuple[Tensor, Tensor, Tensor]:
    """(chosen token's logprob [B], top-N logprobs [B, N] descending, their ids [B, N])."""
    # logprobs_all: [B, V]; token_ids: [B]
    chosen = logprobs_all.gather(1, token_ids.unsqueeze(1)).squeeze(1)  # [B]
    n = min(top_n or 0, logprobs_all.shape[-1])
    top_lp, top_ids = logprobs_all.topk(n, dim=-1, sorted=True)  # [B, N]
    return chosen, top_lp, top_ids
