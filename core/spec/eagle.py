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

from ..attention import make_backend
from ..kv_cache import KVPool, slots_for_positions
from ..request import Request
from ..transfer import int64_to_device
from .draft import draft_chain, shadow_runner
from .eagle_head import EagleHead
from .head_graphs import HeadGraphRunner
from .tree import Candidate, select_tree

# Head graphs hold at most this many requests' rows (larger decode batches draft eagerly): the
# catch-up graphs' rows are requests x num-draft-tokens, each with a vocabulary-wide logits row.
HEAD_GRAPH_REQUESTS = 32


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
        pool: KVPool | None = None,
    ) -> None:
        """`pool`: the head KV of an EagleDraft this one replaces (same head, same target
        pool); its requests keep their draft state, and `adopt` gives them their rows."""
        self.head = head
        self.key = head.key
        self.topk = topk
        self.target_pool = target_pool
        self.pool, self.runner = shadow_runner(
            head,
            head.config,
            head.fc.weight.dtype,
            target_pool,
            attention_backend,
            max_running_requests,
            max_request_tokens,
            scratch_rows=max_running_requests * topk if topk > 1 else 0,
            pool=pool,
        )
        self.attention_backend = attention_backend
        self.graphs: HeadGraphRunner | None = None  # draft steps
        self.catch_up_graphs: HeadGraphRunner | None = None

    def capture_cuda_graphs(self, max_requests: int, max_catch_up: int) -> None:
        """Graphs for the draft steps of up to `max_requests` requests (times topk tree rows,
        at most HEAD_GRAPH_REQUESTS requests) and for catch-up passes of up to `max_catch_up`
        tokens per request (after a verify pass: the accepted drafts and the bonus token)."""
        self.graphs = self.catch_up_graphs = None
        requests = min(max_requests, HEAD_GRAPH_REQUESTS)
        if self.runner.cuda_graph_unsupported() is not None or requests < 1:
            return
        head, slots = self.head, self.runner.slots
        steps = HeadGraphRunner(
            head, self.runner.attention, slots, requests * self.topk, head.config.hidden_size
        )
        steps.capture()
        # Its own backend object: capturing sets up a backend's graph workspaces.
        backend = make_backend(self.attention_backend, self.pool)
        catch_up = HeadGraphRunner(
            head, backend, slots, requests * max_catch_up, head.layout.feature_width
        )
        catch_up.capture()
        self.graphs, self.catch_up_graphs = steps, catch_up

    def drop_cuda_graphs(self) -> None:
        self.graphs = self.catch_up_graphs = None
        self.runner.drop_cuda_graphs()

    def release(self, keep_pool: bool = False) -> None:
        self.graphs = self.catch_up_graphs = None
        self.runner.release()
        if not keep_pool:
            self.pool.release()

    def adopt(self, reqs: list[Request]) -> None:
        """Slot-table rows for requests whose head KV [0, draft_computed) is in the pool."""
        self.runner.adopt(reqs, [r.draft_computed for r in reqs])

    def _catch_up(self, reqs: list[Request]) -> tuple[torch.Tensor, torch.Tensor]:
        """The head over each request's positions [draft_computed, num_tokens - 1) with the
        target's features: (logits, hidden) of each request's last position ([A, V], [A, H]).
        From the catch-up graphs when they hold every request's tokens as decode rows (a
        request's rows read its own slot-table row; all K/V is written before attention)."""
        tokens = [r.token_ids(r.draft_computed + 1, r.num_tokens) for r in reqs]
        features = torch.cat([r.draft_features for r in reqs])  # type: ignore[misc]
        width = max(map(len, tokens))
        graphs = self.catch_up_graphs
        if graphs is None or graphs.padded_size(len(reqs) * width) is None:
            items = [(r, t, r.draft_computed) for r, t in zip(reqs, tokens, strict=True)]
            return self.runner.run_tokens(items, [len(t) - 1 for t in tokens], hidden=features)
        ids, positions, writes, rows, feature_rows, last = [], [], [], [], [], []
        first = 0
        for r, toks in zip(reqs, tokens, strict=True):
            n, start = len(toks), r.draft_computed
            lin = slots_for_positions(r.pages, start, start + n, self.pool.page_size)
            row = self.runner.slots.row(r)
            last.append(len(ids) + n - 1)
            for j in range(width):
                jj = min(j, n - 1)  # padding repeats the last token: same slot, same K/V
                ids.append(toks[jj])
                positions.append(start + jj)
                writes.append(lin[jj])
                rows.append(row)
                feature_rows.append(first + jj)
            first += n
        index = int64_to_device(feature_rows + last, features.device)
        feature_index, last_index = index.split([len(feature_rows), len(last)])
        logits, hidden = graphs.run(
            ids, positions, writes, rows, features.index_select(0, feature_index)
        )
        return logits.index_select(0, last_index), hidden.index_select(0, last_index)

    def _run_rows(
        self,
        ids: list[int],
        positions: list[int],
        writes: list[int],
        rows: list[int],
        hidden: torch.Tensor,  # [n, H]
    ) -> tuple[torch.Tensor, torch.Tensor]:  # logits [n, V], hidden [n, H]
        """One decode-shaped draft step: from a graph when one holds the rows, else eager."""
        graphs = self.graphs
        if graphs is not None and graphs.padded_size(len(ids)) is not None:
            return graphs.run(ids, positions, writes, rows, hidden)
        return self.runner.run_rows(ids, positions, writes, rows, hidden=hidden)

    @staticmethod
    def ready(req: Request) -> bool:
        feats = req.draft_features
        return feats is not None and req.draft_computed + feats.shape[0] == req.num_tokens - 1

    @staticmethod
    def record(req: Request, start: int, features: torch.Tensor) -> None:
        """Keep the target's features [n, F] of positions [start, start + n) for the head. They
        must be the caller's to keep (not a view of a CUDA graph's reused buffer)."""
        have = req.draft_features
        if req.draft_computed + (0 if have is None else have.shape[0]) != start:
            req.draft_features = None  # a gap: this request cannot draft any more
            return
        req.draft_features = features if have is None else torch.cat([have, features])

    @torch.inference_mode()
    def absorb(self, reqs: list[Request], keep: int) -> None:
        """Run the head over all but the last of each request's waiting positions when more
        than `keep` wait (after a prefill chunk, or passes without drafts: the features would
        otherwise pile up in memory, rows x F each, until the next proposal). Their head KV is
        final; the last row stays for the proposal's catch-up, whose output drafts token 1."""
        heavy = [
            r for r in reqs if r.draft_features is not None and r.draft_features.shape[0] > keep
        ]
        if not heavy:
            return
        items, rows = [], []
        for r in heavy:
            n = r.draft_features.shape[0] - 1  # type: ignore[union-attr]
            start = r.draft_computed
            items.append((r, r.token_ids(start + 1, start + n + 1), start))
            rows.append(r.draft_features[:n])  # type: ignore[index]
        self.runner.run_tokens(items, [0] * len(items), hidden=torch.cat(rows))
        for r, (_, tokens, start) in zip(heavy, items, strict=True):
            r.draft_computed = start + len(tokens)
            r.draft_features = r.draft_features[-1:].clone()  # type: ignore[index]

    @torch.inference_mode()
    def propose(
        self, reqs: list[Request], counts: list[int]
    ) -> tuple[list[list[int]], dict[int, torch.Tensor]]:
        """`counts[b]` draft tokens for request b (pages reserved); as DraftModel.propose."""
        rows = [b for b, k in enumerate(counts) if k > 0 and self.ready(reqs[b])]
        if not rows:
            return [[] for _ in reqs], {}
        logits, hidden = self._catch_up([reqs[b] for b in rows])  # [A, V], [A, H]

        def advance(more: list[tuple[int, int]], tokens: list[int], step: int) -> torch.Tensor:
            nonlocal hidden
            # Draft token `step` sits at position num_tokens - 1 + step of the target, so the
            # head reads it at one position less.
            positions = [reqs[b].num_tokens + step - 2 for _, b in more]
            writes = [
                slots_for_positions(reqs[b].pages, p, p + 1, self.pool.page_size)[0]
                for (_, b), p in zip(more, positions, strict=True)
            ]
            slot_rows = [self.runner.slots.row(reqs[b]) for _, b in more]
            picked = int64_to_device([i for i, _ in more], hidden.device)
            logits, hidden = self._run_rows(
                [tokens[i] for i, _ in more],
                positions,
                writes,
                slot_rows,
                hidden.index_select(0, picked),
            )
            return logits

        drafts, q = draft_chain(logits, reqs, rows, counts, advance)
        for b in rows:
            reqs[b].draft_computed = reqs[b].num_tokens - 1
            reqs[b].draft_features = None
        return drafts, q

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
        logits, hidden = self._catch_up(active)  # [A, V], [A, H]
        score, token = logits.float().log_softmax(dim=-1).topk(k, dim=-1)  # [A, k] each
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
            logits, out = self._run_rows(leaf_token, positions, writes, scratch, leaf_hidden)
            child_score, child_token = (
                logits.float().log_softmax(dim=-1).topk(k, dim=-1)
            )  # [A*k, k]
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
                pick_d = int64_to_device(pick, out.device)
                leaf_score = total.view(-1).index_select(0, pick_d).view(len(rows), k)
                leaf_token = child_token.view(-1).index_select(0, pick_d).tolist()
                parent_rows = int64_to_device([p // k for p in pick], out.device)
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
