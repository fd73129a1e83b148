"""Draft-model proposer (SGLang's STANDALONE): a smaller model with the target's tokenizer drafts
k tokens per request by running k forward passes of its own.

Its KV lives in a pool of its own shape that is indexed by the target's slots: a request's
target pages hold its draft KV too, so the draft needs no allocator, and the pages the engine
reserves for a verify pass cover the draft's writes. `Request.draft_computed` counts the
positions whose draft KV is valid; each proposal first catches up on the tokens the draft has
not seen (the prompt at first, then the target's last emitted token), then drafts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..attention import make_backend
from ..kv_cache import KVPool, KVPoolSpec
from ..model_loader import LoadedModel
from ..models.config import ModelConfig
from ..request import Request
from ..runner import ModelRunner
from ..sampling import SamplingBatch, draw, sampling_probs
from ..transfer import int64_to_device


def shadow_runner(
    model: torch.nn.Module,
    config: ModelConfig,
    dtype: torch.dtype,
    target_pool: KVPool,
    attention_backend: str,
    max_running_requests: int,
    max_request_tokens: int,
    scratch_rows: int = 0,
    pool: KVPool | None = None,
) -> tuple[KVPool, ModelRunner]:
    """A drafter's KV pool (its own shape, as many pages as the target's, so the target's page
    ids index it; `pool` reuses one) and a runner over it."""
    spec = KVPoolSpec(
        config.num_layers,
        config.num_kv_heads,
        config.head_dim,
        target_pool.page_size,
        target_pool.spec.num_pages,
        dtype,
    )
    if pool is None or pool.spec != spec:
        pool = KVPool(spec, target_pool.device)
    runner = ModelRunner(
        model,  # type: ignore[arg-type]
        pool,
        make_backend(attention_backend, pool),
        target_pool.device,
        max_running_requests,
        max_request_tokens,
        scratch_rows,
    )
    return pool, runner


class DraftModel:
    """Contract: `propose` leaves `draft_computed` of each drafting request at the position of
    its last draft token (whose KV is not computed); the engine lowers it to what the target
    accepted, and to 0 whenever the request's pages were given back."""

    def __init__(
        self,
        loaded: LoadedModel,
        target_pool: KVPool,
        attention_backend: str,
        max_running_requests: int,
        max_request_tokens: int,
        pool: KVPool | None = None,
    ) -> None:
        """`pool`: the KV of a DraftModel this one replaces (same weights, same target pool);
        its requests keep their draft KV, and `adopt` gives them their rows."""
        self.loaded = loaded
        self.key: object = None  # what chose the weights (speculator.draft_key), set on build
        self.target_pool = target_pool
        self.pool, self.runner = shadow_runner(
            loaded.model,
            loaded.model_config,
            loaded.dtype,
            target_pool,
            attention_backend,
            max_running_requests,
            max_request_tokens,
            pool=pool,
        )

    def release(self, keep_pool: bool = False) -> None:
        self.runner.release()
        if not keep_pool:
            self.pool.release()

    def adopt(self, reqs: list[Request]) -> None:
        """Slot-table rows for requests whose draft KV [0, draft_computed) is in the pool."""
        self.runner.adopt(reqs, [r.draft_computed for r in reqs])

    @torch.inference_mode()
    def absorb(self, spans: list[tuple[Request, int]]) -> None:
        """Catch each (request, end) up to `end`: the draft's KV of positions
        [draft_computed, end), whose tokens the target has just computed."""
        items = [(r, r.token_ids(r.draft_computed, end), r.draft_computed) for r, end in spans]
        items = [item for item in items if item[1]]
        if not items:
            return
        self.runner.run_tokens(items, [len(tokens) - 1 for _, tokens, _ in items])
        for req, tokens, start in items:
            req.draft_computed = start + len(tokens)

    @torch.inference_mode()
    def propose(
        self, reqs: list[Request], counts: list[int]
    ) -> tuple[list[list[int]], dict[int, torch.Tensor]]:
        """`counts[b]` draft tokens for request b (their pages reserved). Returns the drafts and,
        for sampled requests, the draft distribution q of each drafted token ({b: [k_b, V]})."""
        rows = [b for b, k in enumerate(counts) if k > 0]
        if not rows:
            return [[] for _ in reqs], {}
        items = [
            (reqs[b], reqs[b].token_ids(reqs[b].draft_computed, reqs[b].num_tokens),
             reqs[b].draft_computed)
            for b in rows
        ]  # fmt: skip
        logits = self.runner.run_tokens(items, [len(t) - 1 for _, t, _ in items])  # [A, V]

        def advance(more: list[tuple[int, int]], tokens: list[int], step: int) -> torch.Tensor:
            items = [(reqs[b], [tokens[i]], reqs[b].num_tokens + step - 1) for i, b in more]
            return self.runner.run_tokens(items, [0] * len(items))

        drafts, q = draft_chain(logits, reqs, rows, counts, advance)
        for b, k in enumerate(counts):
            if k > 0:
                reqs[b].draft_computed = reqs[b].num_tokens + k - 1
        return drafts, q


def draft_chain(
    logits: torch.Tensor,  # [A, V]: the next token's logits for each request in `rows`
    reqs: list[Request],
    rows: list[int],
    counts: list[int],
    advance: Callable[[list[tuple[int, int]], list[int], int], torch.Tensor],
) -> tuple[list[list[int]], dict[int, torch.Tensor]]:
    """Chain drafting's loop, for any drafter: pick a token per request, then (while a request
    wants more than `step` tokens) `advance(more, tokens, step)` runs the drafter one token
    further for the (row index, request) pairs in `more` and returns their logits. Returns
    the drafts and, for sampled requests, the draft distribution of each token ({b: [k, V]})."""
    drafts: list[list[int]] = [[] for _ in reqs]
    q_rows: dict[int, list[torch.Tensor]] = {}
    step = 0
    while True:
        tokens = pick_drafts(logits, [reqs[b] for b in rows], rows, q_rows)
        for b, token in zip(rows, tokens, strict=True):
            drafts[b].append(token)
        step += 1
        more = [(i, b) for i, b in enumerate(rows) if counts[b] > step]
        if not more:
            return drafts, {b: torch.stack(q) for b, q in q_rows.items()}
        logits = advance(more, tokens, step)
        rows = [b for _, b in more]


def pick_drafts(
    logits: torch.Tensor,  # [A, V]
    reqs: list[Request],
    rows: list[int],
    q_rows: dict[int, list[torch.Tensor]],
) -> list[int]:
    """One draft token per row: greedy requests draft the argmax; sampled ones draw from the
    draft's distribution under their own sampling parameters and keep it (in q_rows, by
    `rows[i]`) for rejection sampling."""
    chosen = logits.argmax(dim=-1)  # [A]
    sampled = [i for i, r in enumerate(reqs) if not r.params.greedy]
    if sampled:
        batch = SamplingBatch.build(
            [reqs[i].params for i in sampled],
            [[] for _ in sampled],
            [[] for _ in sampled],
            [reqs[i].generator for i in sampled],
            logits.shape[-1],
            logits.device,
        )
        probs = sampling_probs(logits[sampled].float(), batch)  # [S, V]
        index = int64_to_device(sampled, logits.device)
        chosen = chosen.index_copy(0, index, draw(probs, batch.generators))
        for j, i in enumerate(sampled):
            q_rows.setdefault(rows[i], []).append(probs[j])
    return chosen.tolist()
