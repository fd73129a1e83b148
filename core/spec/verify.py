"""Verification of chain drafts: which draft tokens the target accepts, and the token it emits
after them.

The target scores, for every request, its last real token plus K draft tokens in one pass, giving
K + 1 predictions: position i checks draft i, and position K predicts the token after the last
draft (the "bonus" token). Everything here is [B, K]-shaped tensor maths on the device, with no
host reads; requests with fewer drafts are right-padded and `draft_lens` says how many are real.

Sampled rows use speculative (rejection) sampling (Leviathan et al. 2023, Chen et al. 2023):
accept draft d_i with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection draw from
norm(max(p_i - q_i, 0)); after all drafts draw the bonus from p_K. The emitted tokens are
distributed exactly as if the target had sampled them one at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

_PAD = -1


@dataclass(frozen=True)
class Verdict:
    """Per request: how many drafts were accepted, and the tokens to emit this step."""

    accepted: Tensor  # [B] int64, drafts accepted, 0..draft_lens[b]
    tokens: Tensor  # [B, K + 1] int64: accepted drafts, then one target token, then -1 padding


def _positions(width: int, like: Tensor) -> Tensor:
    return torch.arange(width, device=like.device).unsqueeze(0)  # [1, width]


def _accepted_prefix(ok: Tensor) -> Tensor:
    """Length of each row's leading run of True."""
    # ok: [B, K] bool -> [B] int64
    return ok.to(torch.int64).cumprod(dim=1).sum(dim=1)


def _emit(drafts: Tensor, accepted: Tensor, last: Tensor) -> Tensor:
    """Row b: drafts[b, :accepted[b]], then last[b], then -1."""
    # drafts: [B, K]; accepted: [B]; last: [B] -> tokens: [B, K + 1]
    pos = _positions(drafts.shape[1] + 1, drafts)  # [1, K + 1]
    acc = accepted.unsqueeze(1)  # [B, 1]
    padded = torch.nn.functional.pad(drafts, (0, 1), value=_PAD)  # [B, K + 1]
    tokens = torch.where(pos == acc, last.unsqueeze(1), padded)
    return tokens.masked_fill(pos > acc, _PAD)


def verify_greedy(target_ids: Tensor, drafts: Tensor, draft_lens: Tensor) -> Verdict:
    """Accept the longest prefix of drafts that equals the target's argmax, then emit the
    target's own token at the first mismatch (or the bonus token after a full match)."""
    # target_ids: [B, K + 1] int64; drafts: [B, K] int64, -1 padded; draft_lens: [B]
    num_draft = drafts.shape[1]
    lens = draft_lens.to(drafts.device).unsqueeze(1)  # [B, 1]
    real = _positions(num_draft, drafts) < lens  # [B, K]
    accepted = _accepted_prefix((drafts == target_ids[:, :num_draft]) & real)  # [B]
    # Accepted drafts equal the target's ids, so the emitted row is just target_ids cut after
    # position `accepted`.
    tokens = target_ids.masked_fill(_positions(num_draft + 1, drafts) > accepted.unsqueeze(1), _PAD)
    return Verdict(accepted=accepted, tokens=tokens.to(torch.int64))


def _noise(
    batch: int,
    num_draft: int,
    vocab_size: int,
    device: torch.device,
    generators: Sequence[torch.Generator | None],
) -> tuple[Tensor, Tensor]:
    """Acceptance uniforms u ~ U[0, 1) [B, K] and race noise e ~ Exp(1) [B, V].

    A seeded row must consume its generator the same way whatever shares the batch, but K is the
    batch's longest draft. So the row draws its V exponentials first (exactly as
    core/sampling.py does, hence with no drafts it picks the very token plain sampling would),
    then one seed for a throwaway generator that supplies its K uniforms: the row's own stream
    always advances by V + 1 draws, and the uniforms its real drafts read do not depend on K
    because CPU uniforms are drawn serially (rand(K)[:n] == rand(n)).
    """
    # Unseeded rows: one batched draw of each from the global RNG.
    uniforms = torch.rand(batch, num_draft, dtype=torch.float32, device=device)
    expo = torch.empty(batch, vocab_size, dtype=torch.float32, device=device).exponential_()
    for row, gen in enumerate(generators):  # the only per-row loop: seeded rows
        if gen is None:
            continue
        # Drawn where the generator lives (requests keep CPU generators), then moved.
        row_expo = torch.empty(vocab_size, dtype=torch.float32, device=gen.device)
        row_expo.exponential_(generator=gen)
        seed = torch.randint(0, 2**62, (1,), generator=gen, device=gen.device)
        sub = torch.Generator(device=gen.device).manual_seed(int(seed))  # host read: CPU gens
        row_u = torch.rand(num_draft, generator=sub, dtype=torch.float32, device=gen.device)
        expo[row] = row_expo.to(device, non_blocking=True)
        uniforms[row] = row_u.to(device, non_blocking=True)
    # exponential_ can in principle return 0; a 0 denominator would turn prob 0 into nan.
    return uniforms, expo.clamp_min_(torch.finfo(expo.dtype).tiny)


def verify_sampling(
    target_probs: Tensor,
    drafts: Tensor,
    draft_lens: Tensor,
    draft_probs: Tensor | None,
    generators: Sequence[torch.Generator | None],
) -> Verdict:
    """Speculative (rejection) sampling over a batch of chain drafts; lossless w.r.t. sampling
    from `target_probs` one token at a time.

    target_probs are the target's final sampling distributions (after temperature / top-k /
    top-p). draft_probs are the proposer's distributions q the drafts were drawn from, or None
    for a deterministic proposer (n-gram), whose q is one-hot on the drafted token: a draft is
    then accepted with probability p_i(d_i) and a rejection redraws from p_i without d_i.
    Seeded rows draw only from their own generator (see `_noise`); other rows use the global RNG.
    """
    # target_probs: [B, K + 1, V]; drafts: [B, K] int64, -1 padded; draft_lens: [B];
    # draft_probs: [B, K, V] | None; generators: B entries
    batch, num_draft = drafts.shape
    vocab_size = target_probs.shape[-1]
    if target_probs.shape[:2] != (batch, num_draft + 1) or len(generators) != batch:
        raise ValueError("target_probs must be [B, K + 1, V] and generators have B entries")
    device = target_probs.device
    probs = target_probs.float()
    lens = draft_lens.to(device)  # [B]
    real = _positions(num_draft, drafts) < lens.unsqueeze(1)  # [B, K]
    draft_ids = drafts.clamp_min(0).unsqueeze(2)  # [B, K, 1], padding -> token 0, masked later
    uniforms, expo = _noise(batch, num_draft, vocab_size, device, generators)

    # Accept d_i iff u_i < p_i(d_i) / q_i(d_i), tested as u_i * q < p: no division, so q = 0
    # cannot make nan, and p >= q always accepts because u < 1.
    p_draft = probs[:, :num_draft].gather(2, draft_ids).squeeze(2)  # [B, K]
    if draft_probs is None:
        q_draft = torch.ones_like(p_draft)
    else:
        q_draft = draft_probs.float().gather(2, draft_ids).squeeze(2)  # [B, K]
    accepted = _accepted_prefix((uniforms * q_draft < p_draft) & real)  # [B]

    # The distribution at the stop position: residual after a rejection, p itself after all
    # drafts were accepted (the bonus token).
    stop = accepted.view(batch, 1, 1)
    p_stop = probs.gather(1, stop.expand(batch, 1, vocab_size)).squeeze(1)  # [B, V]
    rejected = (accepted < lens).unsqueeze(1)  # [B, 1]
    if num_draft == 0:
        weights = p_stop
    else:
        stop_q = stop.clamp_max(num_draft - 1)  # a rejection stops at a draft position < K
        if draft_probs is None:
            # max(p - onehot(d), 0) is p with d's entry zeroed (p <= 1).
            d_stop = drafts.clamp_min(0).gather(1, stop_q.view(batch, 1))  # [B, 1]
            residual = p_stop.scatter(1, d_stop, 0.0)
        else:
            q_stop = draft_probs.float().gather(1, stop_q.expand(batch, 1, vocab_size))
            residual = (p_stop - q_stop.squeeze(1)).clamp_min(0.0)  # [B, V]
        # An all-zero residual only arises when p == q, where rejection is impossible; fall back
        # to p so a malformed input (a draft q could not have drawn) still yields a real token.
        has_mass = residual.sum(dim=1, keepdim=True) > 0  # [B, 1]
        weights = torch.where(rejected & has_mass, residual, p_stop)  # [B, V]
    # Exponential race: argmax(w / e) with e ~ Exp(1) draws from w / sum(w), unnormalised.
    last = (weights / expo).argmax(dim=1)  # [B]
    return Verdict(accepted=accepted, tokens=_emit(drafts.to(torch.int64), accepted, last))
