"""The radix prefix cache (SGLang's RadixAttention): finished requests leave their KV pages in a
tree keyed by token ids, and a new request whose prompt starts with a cached sequence reuses
those pages instead of computing them again (a shared system prompt, a chat's earlier turns).

Pure bookkeeping over page ids and a `PageAllocator`: no tensors. Granularity is the page: an
edge holds a whole number of pages, so a match, a split and an eviction never cut one.

Ownership: every allocated page belongs to exactly one of the tree or one request. A request
that matched a prefix reads the tree's pages (listed first in its page table) and holds a lock
on the node the match ended in; locked nodes (and their ancestors) are never evicted. Pages
past the match are the request's own, and become the tree's when the request is cached.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from .kv_cache import PageAllocator


@dataclass(eq=False)
class Node:
    key: tuple[int, ...]  # the edge's tokens: len(pages) * page_size of them
    pages: list[int]
    parent: Node | None
    children: dict[tuple[int, ...], Node] = field(default_factory=dict)  # by first page's tokens
    lock: int = 0  # requests reading through this node
    last_used: int = 0  # logical clock, for LRU eviction


class PrefixCache:
    """Contract: `match` returns pages the caller may read only while it holds `lock(node)`;
    `insert(tokens, pages)` takes ownership of the caller's pages for the positions it caches and
    frees the caller's copies of positions the tree already holds; `evict(n)` frees at least
    `n` pages when `evictable_pages >= n`, least recently used leaves first."""

    def __init__(self, allocator: PageAllocator, page_size: int) -> None:
        self.allocator = allocator
        self.page_size = page_size
        self.root = Node((), [], None, lock=1)  # never evicted
        self.num_pages = 0  # pages the tree owns
        self._locked_pages = 0  # of those, pages in locked nodes
        self._clock = itertools.count(1)

    @property
    def evictable_pages(self) -> int:
        return self.num_pages - self._locked_pages

    def match(self, tokens: Sequence[int]) -> tuple[list[int], Node]:
        """The pages of the longest cached prefix of `tokens` (whole pages) and the node where
        it ends (the root when nothing matched)."""
        p = self.page_size
        node, pages, i = self.root, [], 0
        now = next(self._clock)
        while i + p <= len(tokens):
            child = node.children.get(tuple(tokens[i : i + p]))
            if child is None:
                break
            n = self._common(child.key, tokens, i)
            partial = n < len(child.key)
            if partial:
                child = self._split(child, n)
            child.last_used = now
            pages.extend(child.pages)
            node, i = child, i + n
            if partial:
                break
        return pages, node

    def insert(self, tokens: Sequence[int], pages: Sequence[int]) -> Node:
        """Cache the KV of `tokens[: len(pages) * page_size]`, held in `pages`; returns the node
        where that sequence ends."""
        p = self.page_size
        end = len(pages) * p
        if len(tokens) < end:
            raise ValueError(f"{len(pages)} pages need {end} tokens, got {len(tokens)}")
        node, i = self.root, 0
        now = next(self._clock)
        while i < end:
            child = node.children.get(tuple(tokens[i : i + p]))
            if child is None:
                leaf = Node(tuple(tokens[i:end]), list(pages[i // p :]), node, last_used=now)
                node.children[leaf.key[:p]] = leaf
                self.num_pages += len(leaf.pages)
                return leaf
            n = self._common(child.key, tokens[:end], i)
            if n < len(child.key):
                child = self._split(child, n)
            # The tree holds these positions already: the caller's own copies go back.
            mine = pages[i // p : (i + n) // p]
            self.allocator.free([a for a, b in zip(mine, child.pages, strict=True) if a != b])
            child.last_used = now
            node, i = child, i + n
        return node

    def lock(self, node: Node) -> None:
        for n in self._path(node):
            if n.lock == 0:
                self._locked_pages += len(n.pages)
            n.lock += 1

    def unlock(self, node: Node) -> None:
        for n in self._path(node):
            if n.lock <= 0:
                raise RuntimeError("prefix cache node unlocked more often than locked")
            n.lock -= 1
            if n.lock == 0:
                self._locked_pages -= len(n.pages)

    def evict(self, num_pages: int) -> int:
        """Free at least `num_pages` pages (fewer only when not that many are evictable):
        unlocked leaves, least recently used first. Returns the pages freed."""
        heap = [(n.last_used, id(n), n) for n in self._nodes() if not n.children and n.lock == 0]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < num_pages:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            assert parent is not None
            del parent.children[leaf.key[: self.page_size]]
            self.allocator.free(leaf.pages)
            self.num_pages -= len(leaf.pages)
            freed += len(leaf.pages)
            if not parent.children and parent.lock == 0:
                heapq.heappush(heap, (parent.last_used, id(parent), parent))
        return freed

    def flush(self) -> int:
        """Evict everything that no running request reads; returns the pages freed."""
        return self.evict(self.evictable_pages)

    def owned_pages(self) -> Iterator[list[int]]:
        """Each node's pages (for the allocator's integrity check)."""
        for n in self._nodes():
            yield n.pages

    def pages_to(self, node: Node) -> list[int]:
        """The pages of the prefix that ends in `node`."""
        parts = [n.pages for n in self._path(node)]
        return [page for part in reversed(parts) for page in part]

    def check_integrity(self) -> None:
        total = locked = 0
        for n in self._nodes():
            assert len(n.key) == len(n.pages) * self.page_size, "a node's tokens and pages differ"
            assert n.pages, "an empty node below the root"
            assert n.parent is not None and n.parent.children.get(n.key[: self.page_size]) is n
            assert 0 <= n.lock and (n.parent is self.root or n.lock <= n.parent.lock)
            total += len(n.pages)
            locked += len(n.pages) if n.lock else 0
        assert total == self.num_pages, f"tree holds {total} pages, counted {self.num_pages}"
        assert locked == self._locked_pages, "locked page count drifted"

    # ---- internals -------------------------------------------------------------------------

    def _common(self, key: tuple[int, ...], tokens: Sequence[int], start: int) -> int:
        """How many tokens of `key` equal tokens[start:], in whole pages."""
        n = 0
        limit = min(len(key), len(tokens) - start)
        while n < limit and key[n] == tokens[start + n]:
            n += 1
        return n - n % self.page_size

    def _split(self, node: Node, n: int) -> Node:
        """Cut `node`'s edge after n tokens; returns the new upper part (same lock count)."""
        p = self.page_size
        parent = node.parent
        assert parent is not None and 0 < n < len(node.key)
        upper = Node(node.key[:n], node.pages[: n // p], parent, lock=node.lock)
        upper.last_used = node.last_used
        node.key, node.pages, node.parent = node.key[n:], node.pages[n // p :], upper
        upper.children[node.key[:p]] = node
        parent.children[upper.key[:p]] = upper
        return upper

    def _path(self, node: Node) -> Iterator[Node]:
        n: Node | None = node
        while n is not None and n is not self.root:
            yield n
            n = n.parent

    def _nodes(self) -> Iterator[Node]:
        stack = list(self.root.children.values())
        while stack:
            n = stack.pop()
            stack.extend(n.children.values())
            yield n
