"""Draft trees (EAGLE-2 style, `--speculative-eagle-topk` > 1) as pure functions.

A tree is node 0, the request's last token (verified, never drafted), and nodes 1..n: drafts
with the index of their parent (every parent comes before its children). Drafting expands the
best `topk` leaves by `topk` children per step; the tree keeps the `num_draft_tokens - 1`
candidates of highest path score (sum of draft log-probabilities), which always includes each
kept node's parent since a child never scores above it. Verification walks from the root: at each
node the target picks its token (argmax, or a draw from its distribution); a child with that
token is accepted and the walk moves on, otherwise the pick is emitted and the walk stops.

The walk is lossless for sampled requests too: each emitted token is a draw from the target's
distribution at its node, whichever children exist (the tree's tokens are a deterministic
function of the draft, which the target's draw does not look at).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    score: float  # sum of draft log-probs along the path
    token: int
    parent: int  # index of the parent candidate; -1 = the root
    depth: int  # 1 for the root's children


def select_tree(
    candidates: list[Candidate], budget: int, max_depth: int
) -> tuple[list[int], list[int]]:
    """The `budget` best candidates no deeper than `max_depth` whose ancestors are all kept, as
    (tokens, parents) of tree nodes 1..n (parent 0 = the root). Best = highest score, then
    shallower; a candidate whose parent was not kept is skipped."""
    order = sorted(
        range(len(candidates)), key=lambda i: (-candidates[i].score, candidates[i].depth)
    )
    node_of: dict[int, int] = {-1: 0}  # candidate index -> tree node
    tokens: list[int] = []
    parents: list[int] = []
    for i in order:
        if len(tokens) >= budget:
            break
        c = candidates[i]
        if c.depth > max_depth or c.parent not in node_of:
            continue
        parents.append(node_of[c.parent])
        tokens.append(c.token)
        node_of[i] = len(tokens)
    return tokens, parents


def tree_depths(parents: list[int]) -> list[int]:
    """Depth of nodes 0..n (the root is 0) from the parents of nodes 1..n."""
    depth = [0]
    for p in parents:
        depth.append(depth[p] + 1)
    return depth


def ancestors(parents: list[int], node: int) -> list[int]:
    """Nodes from the root down to `node`'s parent (root first; empty for the root)."""
    path: list[int] = []
    while node:
        node = parents[node - 1]
        path.append(node)
    return path[::-1]


def walk_tree(tokens: list[int], parents: list[int], picks: list[int]) -> tuple[list[int], int]:
    """(accepted nodes, root to leaf; the token emitted after them). `picks[j]` is the target's
    token at node j (0 = root); the emitted tokens are the accepted nodes' tokens, then the
    pick at the last accepted node (or the root)."""
    children: dict[int, dict[int, int]] = {}
    for node, (token, parent) in enumerate(zip(tokens, parents, strict=True), start=1):
        children.setdefault(parent, {}).setdefault(token, node)
    path: list[int] = []
    node = 0
    while (child := children.get(node, {}).get(picks[node])) is not None:
        path.append(child)
        node = child
    return path, picks[node]
