"""EAGLE / EAGLE-3 proposer: chain drafting (topk 1) with a head that reads the target's hidden
states.

Draft position i holds (token i + 1, target features of position i), so the head trails the
target by one token. Every target pass hands the engine the features of the positions it
computed and kept; they wait on the request (`Request.draft_features`, covering positions
[draft_computed, draft_computed + rows)) until the next proposal. A proposal first catches the
head up over those positions (its KV there is then final: it was computed from the target's own
states), whose last row drafts token 1; each further step feeds the head's own output back for
one more token. The drafted positions' head KV is provisional and recomputed next time, so
`draft_computed` ends at the last position with target features.
"""

from __future__ import annotations

import torch

from ..kv_cache import KVPool
from ..request import Request
from .draft import pick_drafts, shadow_runner
from .eagle_head import EagleHead


class EagleDraft:
    """Contract: a request drafts only while its waiting features reach exactly from
    `draft_computed` to `num_tokens - 1` (they are lost on a retraction, or when the head was
    rebuilt under a running request: such a request is verified without drafts)."""

    def __init__(
        self,
        head: EagleHead,
        target_pool: KVPool,
        attention_backend: str,
        max_running_requests: int,
        max_request_tokens: int,
    ) -> None:
        self.head = head
        self.pool, self.runner = shadow_runner(
            head,
            head.config,
            head.fc.weight.dtype,
            target_pool,
            attention_backend,
            max_running_requests,
            max_request_tokens,
        )

    def release(self) -> None:
        self.runner.release()
        self.pool.release()

    @staticmethod
    def ready(req: Request) -> bool:
        feats = req.draft_features
        return feats is not None and req.draft_computed + feats.shape[0] == req.num_tokens - 1

    @staticmethod
    def record(req: Request, start: int, features: torch.Tensor) -> None:
        """Keep the target's features [n, F] of positions [start, start + n) for the head."""
        have = req.draft_features
        if req.draft_computed + (0 if have is None else have.shape[0]) != start:
            req.draft_features = None  # a gap: this request cannot draft any more
            return
        # A copy: graph replays reuse the buffer the features were read from.
        req.draft_features = features.clone() if have is None else torch.cat([have, features])

    @torch.inference_mode()
    def propose(
        self, reqs: list[Request], counts: list[int]
    ) -> tuple[list[list[int]], dict[int, torch.Tensor]]:
        """`counts[b]` draft tokens for request b (pages reserved); as DraftModel.propose."""
        drafts: list[list[int]] = [[] for _ in reqs]
        q_rows: dict[int, list[torch.Tensor]] = {}
        rows = [b for b, k in enumerate(counts) if k > 0 and self.ready(reqs[b])]
        if not rows:
            return drafts, {}
        items = [
            (reqs[b], reqs[b].token_ids(reqs[b].draft_computed + 1, reqs[b].num_tokens),
             reqs[b].draft_computed)
            for b in rows
        ]  # fmt: skip
        hidden = torch.cat([reqs[b].draft_features for b in rows])  # type: ignore[misc]
        logits, hidden = self.runner.run_tokens(
            items, [len(t) - 1 for _, t, _ in items], hidden=hidden
        )  # [A, V], [A, H]
        step = 0
        while True:
            tokens = pick_drafts(logits, [reqs[b] for b in rows], rows, q_rows)
            for b, token in zip(rows, tokens, strict=True):
                drafts[b].append(token)
            step += 1
            more = [(i, b) for i, b in enumerate(rows) if counts[b] > step]
            if not more:
                break
            # Draft token `step` sits at position num_tokens - 1 + step of the target, so the
            # head reads it at one position less.
            items = [(reqs[b], [tokens[i]], reqs[b].num_tokens + step - 2) for i, b in more]
            picked = torch.tensor([i for i, _ in more], device=hidden.device)
            logits, hidden = self.runner.run_tokens(
                items, [0] * len(items), hidden=hidden.index_select(0, picked)
            )
            rows = [b for _, b in more]
        for b in range(len(reqs)):
            if drafts[b]:
                req = reqs[b]
                req.draft_computed = req.num_tokens - 1
                req.draft_features = None
        return drafts, {b: torch.stack(q) for b, q in q_rows.items()}
