"""The target's verify pass over draft trees (tree.py), without a tree attention mask.

Every tree node is a decode row of its own. Node j of request b sits at position
start + depth(j), writes its K/V to the slot of position start + j (the pages the speculator
reserved), and reads a slot-table row that holds exactly what it may see: the root reads the
request's own row; node j >= 1 reads a scratch row filled with the request's prefix and, at the
positions of its ancestors, their slots. So any backend's decode kernel applies the tree mask,
and a verify pass replays the decode CUDA graphs as a chain's does.

After the walk, the accepted nodes' K/V moves to the slots of the positions they now hold (a
node at depth d belongs at start + d) and the request's row maps those positions to them; the
rest of the tree is dropped with the pages the engine trims.
"""

from __future__ import annotations

import torch

from ..kv_cache import slots_for_positions
from ..runner import ModelRunner, VerifyOutput
from ..sampling import draw, sampling_probs, top_logprobs
from ..scheduler import ScheduledBatch
from ..transfer import int64_to_device
from .scoring import kept_features, position_scores, row_logprobs
from .tree import ancestors, tree_depths, walk_tree

Tree = tuple[list[int], list[int]]  # (tokens, parents) of nodes 1..n


@torch.inference_mode()
def verify_tree(runner: ModelRunner, batch: ScheduledBatch, trees: list[Tree]) -> VerifyOutput:
    """One target pass over every chunk's last token and its draft tree; picks are argmax for
    greedy requests, draws from the target's distribution for sampled ones. One host sync."""
    slots, page_size = runner.slots, runner.pool.page_size
    width = 1 + max(len(tokens) for tokens, _ in trees)
    ids: list[int] = []
    positions: list[int] = []
    writes: list[int] = []
    rows: list[int] = []
    copy_src: list[int] = []
    copy_dst: list[int] = []
    path_rows: list[int] = []
    path_pos: list[int] = []
    path_slots: list[int] = []
    linear: list[list[int]] = []
    for b, (chunk, (tokens, parents)) in enumerate(zip(batch.chunks, trees, strict=True)):
        req, start = chunk.req, chunk.start
        n = 1 + len(tokens)
        lin = slots_for_positions(req.pages, start, start + n, page_size)
        linear.append(lin)
        depth = tree_depths(parents)
        node_ids = [req.token_ids(start, start + 1)[0], *tokens]
        node_rows = [slots.row(req)]
        for j in range(1, n):
            row = slots.scratch(b * (width - 1) + j - 1)
            node_rows.append(row)
            copy_src.append(node_rows[0])
            copy_dst.append(row)
            for a in ancestors(parents, j):
                path_rows.append(row)
                path_pos.append(start + depth[a])
                path_slots.append(lin[a])
        for j in range(width):
            jj = min(j, n - 1)  # padding repeats the last node: same row, slot and K/V
            ids.append(node_ids[jj])
            positions.append(start + depth[jj])
            writes.append(lin[jj])
            rows.append(node_rows[jj])
    if copy_src:
        packed = int64_to_device(copy_src + copy_dst, runner.device)
        slots.copy_prefix(*packed.split(len(copy_src)), max(c.start for c in batch.chunks))
    if path_rows:
        packed = int64_to_device(path_rows + path_pos + path_slots, runner.device)
        slots.write(*packed.split(len(path_rows)))
    graphs = runner.graphs
    features = None
    if graphs is not None and graphs.padded_size(len(ids)) is not None:
        logits, padded = graphs.replay(ids, positions, writes, rows)  # [B * width, V]
        features, cuda_graph = graphs.buffers.features, True
    else:
        features = runner.features_buffer(len(ids))
        logits = runner.run_rows(ids, positions, writes, rows, features=features)
        padded, cuda_graph = len(ids), False
    return _walk(runner, batch, trees, logits, width, linear, features, cuda_graph, padded)


def _walk(
    runner: ModelRunner,
    batch: ScheduledBatch,
    trees: list[Tree],
    logits: torch.Tensor,  # [B * width, V]
    width: int,
    linear: list[list[int]],
    features: torch.Tensor | None,  # [>= B * width, F]
    cuda_graph: bool,
    padded_bs: int,
) -> VerifyOutput:
    reqs = [c.req for c in batch.chunks]
    sampling, scores = position_scores(runner, reqs, width, logits)  # [B * width, V]
    picks = scores.argmax(dim=-1)
    sampled = [b for b, r in enumerate(reqs) if not r.params.greedy]
    if sampled:
        idx = [b * width + j for b in sampled for j in range(width)]
        idx_d = int64_to_device(idx, runner.device)
        probs = sampling_probs(scores, sampling).index_select(0, idx_d)
        gens = tuple(reqs[b].generator for b in sampled for _ in range(width))
        picks = picks.index_copy(0, idx_d, draw(probs, gens))
    want = [r.params.logprobs for r in reqs if r.params.logprobs is not None]
    lp_host = None
    if want:
        lp_host = [t.tolist() for t in top_logprobs(scores.log_softmax(-1), picks, max(want))]
    picks_h = picks.tolist()  # the one sync
    out_tokens, out_accepted, out_lps, kept = [], [], [], []
    moves_src, moves_dst, map_rows, map_pos, map_slots = [], [], [], [], []
    for b, ((tokens, parents), req) in enumerate(zip(trees, reqs, strict=True)):
        n = 1 + len(tokens)
        path, _ = walk_tree(tokens, parents, picks_h[b * width : b * width + n])
        nodes = [0, *path]
        emitted = tuple(picks_h[b * width + j] for j in nodes)
        out_tokens.append(emitted)
        out_accepted.append(len(path))
        kept.append([b * width + j for j in nodes])
        start, lin = batch.chunks[b].start, linear[b]
        for d, node in enumerate(path, start=1):
            if node != d:
                moves_src.append(lin[node])
                moves_dst.append(lin[d])
            map_rows.append(runner.slots.row(req))
            map_pos.append(start + d)
            map_slots.append(lin[d])
        out_lps.append(row_logprobs(lp_host, kept[-1], emitted, req.params.logprobs))
    _move_kv(runner, moves_src, moves_dst)
    if map_rows:
        packed = int64_to_device(map_rows + map_pos + map_slots, runner.device)
        runner.slots.write(*packed.split(len(map_rows)))
    feats = kept_features(features, kept)
    return VerifyOutput(
        tuple(out_tokens), tuple(out_accepted), tuple(out_lps), cuda_graph, padded_bs, feats
    )


def _move_kv(runner: ModelRunner, src: list[int], dst: list[int]) -> None:
    """K/V of slots `src` -> slots `dst`, every layer (sources are read before any write)."""
    if not src:
        return
    packed = int64_to_device(src + dst, runner.device)
    src_d, dst_d = packed.split(len(src))
    runner.pool.copy_slots(src_d, dst_d)
