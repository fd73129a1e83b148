"""The target's verify pass over draft chains (topk 1: n-gram, draft model, EAGLE chains).

Each request's last token and its k drafts are scored in one pass: eager through
`ModelRunner.run_tokens`, or replayed from the decode CUDA graphs with one decode row per
verified token (each reads its request's slot-table row, so it sees the prefix and the drafts
before it). Acceptance is `verify.py`'s: exact match for greedy requests, rejection sampling
for sampled ones. Trees have their own pass (tree_verify.py).
"""

from __future__ import annotations

import dataclasses
import itertools

import torch

from ..cuda_graph import DecodeGraphRunner
from ..kv_cache import slots_for_positions
from ..runner import ModelRunner, VerifyOutput
from ..sampling import sampling_probs, top_logprobs
from ..scheduler import ScheduledBatch
from ..transfer import int64_to_device
from .scoring import kept_features, position_scores, row_logprobs
from .verify import verify_greedy, verify_sampling


@torch.inference_mode()
def verify_chain(
    runner: ModelRunner,
    batch: ScheduledBatch,
    drafts: list[list[int]],
    draft_probs: dict[int, torch.Tensor] | None = None,
) -> VerifyOutput:
    """One target pass over every decode chunk's last token plus its draft tokens (their
    pages must already cover them), then greedy or rejection-sampling acceptance. KV is
    written for every verified position; the caller keeps the accepted ones (num_computed)
    and later writes overwrite the rest. `draft_probs` ({chunk: [k, V]}) is the proposer's
    distribution for sampled requests (none: a deterministic proposer). One host sync."""
    width = 1 + max(len(d) for d in drafts)  # K + 1
    graphs = runner.graphs
    if graphs is not None and graphs.padded_size(len(drafts) * width) is not None:
        return _verify_graph(runner, batch, drafts, width, graphs, draft_probs)
    items = [
        (c.req, c.req.token_ids(c.start, c.end) + d, c.start)
        for c, d in zip(batch.chunks, drafts, strict=True)
    ]
    # Padded positions repeat the last real one; the verdict never reads them.
    gather = [min(j, len(tokens) - 1) for _, tokens, _ in items for j in range(width)]
    features = runner.features_buffer(sum(len(t) for _, t, _ in items))
    logits = runner.run_tokens(items, gather, features=features)  # [B * (K + 1), V]
    out = _accept(runner, batch, drafts, logits, width, False, len(drafts), draft_probs)
    firsts = list(itertools.accumulate((len(t) for _, t, _ in items), initial=0))[:-1]
    return _keep_features(out, features, firsts)


def _verify_graph(
    runner: ModelRunner,
    batch: ScheduledBatch,
    drafts: list[list[int]],
    width: int,
    graphs: DecodeGraphRunner,
    draft_probs: dict[int, torch.Tensor] | None,
) -> VerifyOutput:
    """A verify pass replayed from a decode graph: token j of request b is a decode row of
    its own, reading b's slot-table row with KV length position + 1, so it attends to its
    request's prefix and the drafts before it (all K/V are written before any attention).
    Each request fills `width` rows; padding repeats its last real token (same slot, same
    K/V), so row b * width + j holds the logits of (b, j)."""
    page_size = runner.pool.page_size
    ids: list[int] = []
    positions: list[int] = []
    write_slots: list[int] = []
    rows: list[int] = []
    for chunk, draft in zip(batch.chunks, drafts, strict=True):
        req = chunk.req
        n = 1 + len(draft)
        tokens = req.token_ids(chunk.start, chunk.end) + draft
        slots = slots_for_positions(req.pages, chunk.start, chunk.start + n, page_size)
        row = runner.slots.row(req)
        for j in range(width):
            k = min(j, n - 1)
            ids.append(tokens[k])
            positions.append(chunk.start + k)
            write_slots.append(slots[k])
            rows.append(row)
    logits, padded = graphs.replay(ids, positions, write_slots, rows)  # [B * (K + 1), V]
    out = _accept(runner, batch, drafts, logits, width, True, padded, draft_probs)
    firsts = [b * width for b in range(len(drafts))]
    return _keep_features(out, graphs.buffers.features, firsts)


def _accept(
    runner: ModelRunner,
    batch: ScheduledBatch,
    drafts: list[list[int]],
    logits: torch.Tensor,  # [B * (K + 1), V]
    width: int,  # K + 1
    cuda_graph: bool = False,
    padded_bs: int | None = None,
    draft_probs: dict[int, torch.Tensor] | None = None,
) -> VerifyOutput:
    reqs = [c.req for c in batch.chunks]
    bsz = len(reqs)
    sampling, scores = position_scores(runner, reqs, width, logits)  # [B * (K + 1), V]
    lens = [len(d) for d in drafts]
    padded = [d + [-1] * (width - 1 - len(d)) for d in drafts]
    table = int64_to_device([x for row in padded for x in row] + lens, runner.device)
    drafts_d = table[: bsz * (width - 1)].view(bsz, width - 1)  # [B, K]
    lens_d = table[bsz * (width - 1) :]  # [B]
    target_ids = scores.argmax(dim=-1).view(bsz, width)  # [B, K + 1]
    verdict = verify_greedy(target_ids, drafts_d, lens_d)
    accepted, tokens = verdict.accepted, verdict.tokens
    sampled = [i for i, r in enumerate(reqs) if not r.params.greedy]
    if sampled:
        probs = sampling_probs(scores, sampling).view(bsz, width, -1)  # [B, K + 1, V]
        pick = int64_to_device(sampled, runner.device)
        q = None  # a deterministic proposer (n-gram): one-hot on its drafts
        if draft_probs:
            q = probs.new_zeros(len(sampled), width - 1, probs.shape[-1])  # [S, K, V]
            for row, b in enumerate(sampled):
                if b in draft_probs:
                    q[row, : draft_probs[b].shape[0]] = draft_probs[b]
        drawn = verify_sampling(
            probs[pick],
            drafts_d[pick],
            lens_d[pick],
            q,
            [reqs[i].generator for i in sampled],
        )
        accepted = accepted.index_copy(0, pick, drawn.accepted)
        tokens = tokens.index_copy(0, pick, drawn.tokens)
    want_lp = [r.params.logprobs for r in reqs if r.params.logprobs is not None]
    lp_host = None
    if want_lp:
        flat = tokens.clamp_min(0).view(-1)  # [B * (K + 1)]
        lp_host = [t.tolist() for t in top_logprobs(scores.log_softmax(-1), flat, max(want_lp))]
    host = torch.cat([accepted.view(bsz, 1), tokens], dim=1).tolist()  # the one sync
    out_tokens, out_lps = [], []
    for b, (n_acc, *row) in enumerate(host):
        emitted = tuple(row[: n_acc + 1])
        out_tokens.append(emitted)
        rows = [b * width + j for j in range(len(emitted))]
        out_lps.append(row_logprobs(lp_host, rows, emitted, reqs[b].params.logprobs))
    return VerifyOutput(
        tuple(out_tokens),
        tuple(h[0] for h in host),
        tuple(out_lps),
        cuda_graph,
        padded_bs or bsz * width,
    )


def _keep_features(
    out: VerifyOutput, features: torch.Tensor | None, firsts: list[int]
) -> VerifyOutput:
    """Attach the features of each chunk's kept positions (its token and accepted drafts),
    whose rows start at firsts[chunk]."""
    rows = [list(range(f, f + len(t))) for f, t in zip(firsts, out.tokens, strict=True)]
    return dataclasses.replace(out, features=kept_features(features, rows))
