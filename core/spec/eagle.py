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

from ..kv_cache import KVPool, slots_for_positions
from ..request import Request
from ..transfer import int64_to_device
from .draft import pick_drafts, shadow_runner
from .eagle_head import EagleHead
from .tree import Candidate, select_tree


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
        topk: int = 1,
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
            scratch_rows=max_running_requests * topk if topk > 1 else 0,
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

    @torch.inference_mode()
    def propose_tree(
        self,
        reqs: list[Request],
        budgets: list[int],
        max_depths: list[int],
        topk: int,
        num_steps: int,
    ) -> tuple[list[list[int]], list[list[int]]]:
        """A draft tree per request (tree.py): (tokens, parents) of at most `budgets[b]` nodes no
        deeper than `max_depths[b]`. Step 1 is the catch-up pass, whose last row scores the
        root's children; each further step runs the `topk` best leaves, each on a scratch row
        of the head's slot table holding its request's prefix and its path. Leaf i of step s
        keeps its head KV at the request's position num_tokens - 1 + (s - 2) * topk + i (pages
        reserved by the caller); it is provisional, like a chain's."""
        tokens: list[list[int]] = [[] for _ in reqs]
        parents: list[list[int]] = [[] for _ in reqs]
        rows = [b for b, n in enumerate(budgets) if n > 0 and self.ready(reqs[b])]
        if not rows:
            return tokens, parents
        k = topk
        active = [reqs[b] for b in rows]
        items = [
            (r, r.token_ids(r.draft_computed + 1, r.num_tokens), r.draft_computed) for r in active
        ]
        hidden = torch.cat([r.draft_features for r in active])  # type: ignore[misc]
        logits, hidden = self.runner.run_tokens(
            items, [len(t) - 1 for _, t, _ in items], hidden=hidden
        )  # [A, V], [A, H]
        score, token = logits.log_softmax(dim=-1).topk(k, dim=-1)  # [A, k] each
        score_h, token_h = score.tolist(), token.tolist()
        cands = [
            [Candidate(score_h[a][i], token_h[a][i], -1, 1) for i in range(k)]
            for a in range(len(rows))
        ]
        leaf_cand = [list(range(k)) for _ in rows]  # candidate index of each leaf
        leaf_path: list[list[list[int]]] = [[[] for _ in range(k)] for _ in rows]  # head slots
        leaf_token = [t for row in token_h for t in row]  # [A * k]
        leaf_hidden = hidden.repeat_interleave(k, dim=0)  # [A * k, H]
        leaf_score = score  # [A, k]
        slots = self.runner.slots
        page_size = self.pool.page_size
        for step in range(2, num_steps + 1):
            scratch = [slots.scratch(a * k + i) for a in range(len(rows)) for i in range(k)]
            own = [slots.row(r) for r in active for _ in range(k)]
            src_dst = int64_to_device(own + scratch, self.runner.device).split(len(own))
            slots.copy_prefix(*src_dst, max(r.num_tokens - 1 for r in active))
            positions, writes, path_rows, path_pos, path_slots = [], [], [], [], []
            for a, req in enumerate(active):
                n = req.num_tokens
                first = n - 1 + (step - 2) * k
                lin = slots_for_positions(req.pages, first, first + k, page_size)
                for i in range(k):
                    row = scratch[a * k + i]
                    for d, slot in enumerate(leaf_path[a][i]):
                        path_rows.append(row)
                        path_pos.append(n - 1 + d)
                        path_slots.append(slot)
                    positions.append(n + step - 3)  # a depth step - 1 token, one behind
                    writes.append(lin[i])
            if path_rows:
                packed = int64_to_device(path_rows + path_pos + path_slots, self.runner.device)
                slots.write(*packed.split(len(path_rows)))
            logits, out = self.runner.run_rows(
                leaf_token, positions, writes, scratch, hidden=leaf_hidden
            )  # [A * k, V], [A * k, H]
            child_score, child_token = logits.log_softmax(dim=-1).topk(k, dim=-1)  # [A*k, k]
            total = (leaf_score.reshape(-1, 1) + child_score).view(len(rows), k * k)
            total_h, child_h = total.tolist(), child_token.view(len(rows), k * k).tolist()
            best = [_best(total_h[a], k) for a in range(len(rows))]
            for a in range(len(rows)):
                base = len(cands[a])
                for c in range(k * k):
                    parent = leaf_cand[a][c // k]
                    cands[a].append(Candidate(total_h[a][c], child_h[a][c], parent, step))
                # The best k children become the next step's leaves.
                leaf_path[a] = [leaf_path[a][c // k] + [writes[a * k + c // k]] for c in best[a]]
                leaf_cand[a] = [base + c for c in best[a]]
            if step < num_steps:
                pick = [a * k * k + c for a in range(len(rows)) for c in best[a]]
                pick_d = torch.tensor(pick, device=out.device)
                leaf_score = total.view(-1).index_select(0, pick_d).view(len(rows), k)
                leaf_token = child_token.view(-1).index_select(0, pick_d).tolist()
                parent_rows = torch.tensor([p // k for p in pick], device=out.device)
                leaf_hidden = out.index_select(0, parent_rows)  # [A * k, H]
        for a, b in enumerate(rows):
            tokens[b], parents[b] = select_tree(cands[a], budgets[b], max_depths[b])
            req = reqs[b]
            req.draft_computed = req.num_tokens - 1
            req.draft_features = None
        return tokens, parents


def _best(scores: list[float], k: int) -> list[int]:
    """Indices of the k highest scores, best first (ties: lower index)."""
    return sorted(range(len(scores)), key=lambda c: -scores[c])[:k]
