"""The engine's speculative-decoding side: for a decode batch, reserve pages and propose drafts
with the configured proposer (n-gram lookup or a draft model); the runner's verify pass and the
engine's bookkeeping do the rest. One Speculator per runtime build; hot restarts make a new one
(and keep a draft model's weights while its path, dtype and device stay)."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError, EngineConfig
from ..kv_cache import KVPool
from ..model_loader import LoadedModel, gpu_memory_gb, load_model
from ..request import Request
from ..runner import ModelRunner, VerifyOutput
from ..scheduler import DraftKV, ScheduledBatch, Scheduler
from .chain_verify import verify_chain
from .draft import DraftModel
from .eagle import EagleDraft
from .eagle_head import EagleHead, load_head_weights, random_layout, read_layout
from .ngram import propose_ngram
from .tree import tree_depths
from .tree_verify import verify_tree

BUILT = ("ngram", "draft", "eagle", "eagle3")
EAGLE = ("eagle", "eagle3")

# (what was loaded: a key of the flags that chose it, the weights): a draft model, an EAGLE head
DraftCache = tuple[Hashable, LoadedModel | EagleHead]


def check_speculative(config: EngineConfig) -> None:
    """Speculative flags this build cannot run fail loudly instead of being ignored."""
    algorithm = config.speculative_algorithm
    if algorithm != "none" and algorithm not in BUILT:
        raise ConfigError(
            f"--speculative-algorithm {algorithm} is not available in this build yet; "
            f"use {', '.join(BUILT)} or none"
        )
    if algorithm == "draft" and not config.speculative_draft_model_path:
        raise ConfigError(
            "--speculative-algorithm draft needs --speculative-draft-model-path (a smaller "
            "model with the same tokenizer)"
        )
    if (
        algorithm in EAGLE
        and not config.speculative_draft_model_path
        and config.load_format != "dummy"
    ):
        raise ConfigError(
            f"--speculative-algorithm {algorithm} needs --speculative-draft-model-path (a folder "
            f"with an {'EAGLE-3' if algorithm == 'eagle3' else 'EAGLE'} head's config.json and "
            "weights); only --load-format dummy makes up a random head"
        )
    topk = config.speculative_eagle_topk or 1
    if algorithm not in ("none", *EAGLE) and topk > 1:
        raise ConfigError(
            f"tree drafting (--speculative-eagle-topk {topk}) works with eagle and eagle3; "
            f"{algorithm} drafts a chain: use --speculative-eagle-topk 1"
        )
    steps, draft_tokens = config.speculative_num_steps, config.speculative_num_draft_tokens
    if topk > 1 and steps and draft_tokens and not 2 <= draft_tokens <= topk * steps + 1:
        raise ConfigError(
            f"--speculative-num-draft-tokens {draft_tokens}: a tree of --speculative-eagle-topk "
            f"{topk} over --speculative-num-steps {steps} verifies 2 to {topk * steps + 1} "
            "tokens (the last token and its drafts)"
        )


def tree_scratch_rows(config: EngineConfig) -> int:
    """Slot-table scratch rows the target's runner needs for tree verify passes."""
    if (config.speculative_eagle_topk or 1) <= 1 or config.speculative_algorithm == "none":
        return 0
    return (config.max_running_requests or 1) * ((config.speculative_num_draft_tokens or 1) - 1)


@dataclass(frozen=True)
class Proposal:
    """One decode batch's drafts: per chunk a chain, or with `parents` a tree (tree.py)."""

    drafts: list[list[int]]
    draft_probs: dict[int, torch.Tensor] | None = None  # chain drafts of sampled requests
    parents: list[list[int]] | None = None

    @property
    def depth(self) -> int:
        """Draft positions a request could accept this step (a chain's length, a tree's
        depth)."""
        if self.parents is None:
            return max(map(len, self.drafts), default=0)
        return max((max(tree_depths(p)) for p in self.parents), default=0)


class Speculator:
    """Contract: `propose` reserves the pages of every draft it returns (the engine trims what
    the verify pass rejects) and gives requests with repetition / frequency / presence penalties
    no drafts: their target distribution at a later position would depend on the drafts."""

    def __init__(self, config: EngineConfig, draft: DraftModel | EagleDraft | None) -> None:
        self.max_drafts = (config.speculative_num_draft_tokens or 1) - 1
        self.topk = config.speculative_eagle_topk or 1
        self.num_steps = config.speculative_num_steps or 1
        self.draft = draft

    @property
    def draft_kv(self) -> DraftKV:
        """What the drafter keeps in the target's pages (see scheduler.DraftKV)."""
        if isinstance(self.draft, EagleDraft):
            return DraftKV.NEXT_TOKEN
        return DraftKV.TOKENS if self.draft is not None else DraftKV.NONE

    def adopt_cached(self, batch: ScheduledBatch) -> None:
        """Drafter slot-table rows for the prefixes this batch's new requests found in the
        prefix cache: their pages hold the drafter's KV too (up to `draft_computed`)."""
        if self.draft is None:
            return
        admitted = [c.req for c in batch.chunks if c.cached]
        if admitted:
            self.draft.adopt(admitted)

    def catch_up(self, batch: ScheduledBatch) -> None:
        """After a prefill pass: a draft model runs over the positions the target just
        computed, so that they enter the prefix cache with its KV and requests admitted while
        they run read them (Scheduler._share); it would otherwise catch up only at each
        request's first proposal. (An EAGLE head does this in `record`.)"""
        if isinstance(self.draft, DraftModel):
            self.draft.absorb([(c.req, c.end) for c in batch.chunks if not _penalised(c.req)])

    def capture_cuda_graphs(self, max_requests: int) -> None:
        """Decode graphs for an EAGLE head's draft steps (other proposers have none)."""
        if isinstance(self.draft, EagleDraft):
            self.draft.capture_cuda_graphs(max_requests, self.max_drafts + 1)

    def drop_cuda_graphs(self) -> None:
        if isinstance(self.draft, EagleDraft):
            self.draft.drop_cuda_graphs()

    def record(self, batch: ScheduledBatch, features: tuple[torch.Tensor, ...]) -> None:
        """Keep each chunk's target features (from the pass that just ran) for an EAGLE head;
        requests that never draft (penalties) keep none."""
        if not isinstance(self.draft, EagleDraft):
            return
        for chunk, rows in zip(batch.chunks, features, strict=True):
            if not _penalised(chunk.req):
                self.draft.record(chunk.req, chunk.start, rows)
        # Bounded memory: a long prefill chunk, or passes that could not draft (a short pool).
        self.draft.absorb([c.req for c in batch.chunks], self.max_drafts + 1)

    def release(self, keep_draft_pool: bool = False) -> None:
        if self.draft is not None:
            self.draft.release(keep_pool=keep_draft_pool)

    def adopt(self, running: list[Request]) -> None:
        """Rows in a kept drafter pool for the running requests (see keepable_draft_pool)."""
        if self.draft is not None:
            self.draft.adopt(running)

    def keepable_draft_pool(
        self, config: EngineConfig, target: LoadedModel, pool: KVPool
    ) -> KVPool | None:
        """The drafter's KV pool when `config` asks for the same drafter (the same draft model
        or EAGLE head) over the same target pool (a restart that keeps the KV): running
        requests then keep drafting, and cached prefixes keep their drafter KV. Else None."""
        draft = self.draft
        if draft is None or draft.target_pool is not pool:
            return None
        if draft.key != draft_key(config, target):
            return None
        return draft.pool

    def propose(self, batch: ScheduledBatch, scheduler: Scheduler) -> Proposal:
        """Drafts per decode chunk, within each request's remaining max_tokens, and (draft
        model, sampled requests) the draft distribution of each drafted token."""
        if self.topk > 1:
            return self._propose_tree(batch, scheduler)
        counts: list[int] = []
        for chunk in batch.chunks:
            req = chunk.req
            room = min(self.max_drafts, req.max_new_tokens - len(req.output_ids) - 1)
            if room <= 0 or _penalised(req) or not scheduler.reserve(req, req.num_tokens + room):
                room = 0  # nothing to draft, or the pool is short: verify the last token alone
            counts.append(room)
        reqs = [c.req for c in batch.chunks]
        if self.draft is not None:
            return Proposal(*self.draft.propose(reqs, counts))
        drafts = [
            propose_ngram(req.prompt_ids + req.output_ids, k) if k else []
            for req, k in zip(reqs, counts, strict=True)
        ]
        return Proposal(drafts)

    def _propose_tree(self, batch: ScheduledBatch, scheduler: Scheduler) -> Proposal:
        assert isinstance(self.draft, EagleDraft), "tree drafting is EAGLE's"
        k, steps = self.topk, self.num_steps
        budgets: list[int] = []
        depths: list[int] = []
        for chunk in batch.chunks:
            req = chunk.req
            depth = min(steps, req.max_new_tokens - len(req.output_ids) - 1)
            # Verify writes positions up to n - 1 + max_drafts, the head up to n - 2 + k(s - 1).
            need = req.num_tokens + max(self.max_drafts, k * (steps - 1) - 1)
            ok = depth > 0 and not _penalised(req) and scheduler.reserve(req, need)
            budgets.append(self.max_drafts if ok else 0)
            depths.append(depth)
        reqs = [c.req for c in batch.chunks]
        tokens, parents = self.draft.propose_tree(reqs, budgets, depths, k, steps)
        return Proposal(tokens, None, parents)

    def verify(
        self, runner: ModelRunner, batch: ScheduledBatch, proposal: Proposal
    ) -> VerifyOutput:
        """The target's verify pass over the proposal (chain or tree)."""
        if proposal.parents is None:
            return verify_chain(runner, batch, proposal.drafts, proposal.draft_probs)
        trees = list(zip(proposal.drafts, proposal.parents, strict=True))
        return verify_tree(runner, batch, trees)


def load_draft(
    config: EngineConfig, target: LoadedModel, cache: DraftCache | None
) -> DraftCache | None:
    """The drafter's weights for `config` (a draft model or an EAGLE head; None for n-gram or
    no speculation), reusing `cache` when the same one is asked for again. Loaded before the
    target's KV pool is sized, so GPU pool sizing sees the memory they take."""
    key = draft_key(config, target)
    if key is None:
        return None
    if cache is not None and cache[0] == key:
        return cache
    if isinstance(key, EngineConfig):
        loaded = load_model(key)
        _check_draft_matches(target, loaded)
        return key, loaded
    head = load_eagle_head(config, target)
    head.key = key
    return key, head


def draft_key(config: EngineConfig, target: LoadedModel) -> Hashable | None:
    """What decides the drafter's weights (None: no drafter with weights): the same key, the
    same weights. A draft model's is its own resolved config."""
    algorithm = config.speculative_algorithm
    if algorithm in EAGLE:
        return eagle_key(config, target)
    if algorithm != "draft":
        return None
    return EngineConfig(
        model=config.speculative_draft_model_path,
        load_format="dummy" if config.load_format == "dummy" else "auto",
        device=config.device,
        dtype=config.dtype,
        seed=config.seed,
    ).resolve(target.device.type, gpu_memory_gb(target.device))


def eagle_key(config: EngineConfig, target: LoadedModel) -> Hashable:
    """What decides an EAGLE head's weights: the same key, the same head."""
    return (
        config.speculative_algorithm,
        config.speculative_draft_model_path,
        id(target.model),
        config.seed,
    )


def load_eagle_head(config: EngineConfig, target: LoadedModel) -> EagleHead:
    """The EAGLE head in --speculative-draft-model-path, or a random one of the target's shape
    (dummy weights and no path), on the target's device and dtype."""
    version = 3 if config.speculative_algorithm == "eagle3" else 1
    path = config.speculative_draft_model_path
    folder = Path(path).expanduser() if path else None
    if folder is not None and not folder.is_dir():
        raise ConfigError(
            f"--speculative-draft-model-path {path}: no such folder (an EAGLE head is a folder "
            "with config.json and weights; nothing is downloaded)"
        )
    mc = target.model_config
    layout = read_layout(folder, version, mc) if folder else random_layout(version, mc)
    with target.device:
        head = EagleHead(layout, target.model, target.dtype)
    if folder is None:
        head.init_random(config.seed)
    else:
        load_head_weights(head, folder)
    return head.eval()


def draft_bytes_per_page(cache: DraftCache | None, page_size: int) -> int:
    """KV bytes the drafter needs per page of the target's pool (its pool has as many)."""
    if cache is None:
        return 0
    weights = cache[1]
    if isinstance(weights, EagleHead):
        mc, dtype = weights.config, weights.fc.weight.dtype
    else:
        mc, dtype = weights.model_config, weights.dtype
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * mc.num_layers * page_size * mc.num_kv_heads * mc.head_dim * elem


def build_speculator(
    config: EngineConfig,
    target: LoadedModel,
    pool: KVPool,
    max_request_tokens: int,
    cache: DraftCache | None,
    draft_pool: KVPool | None = None,
) -> Speculator | None:
    """The speculator for `config` (None when speculation is off); `cache` holds the drafter's
    weights (`load_draft`). Sets which features the target's passes capture (EAGLE's).
    `draft_pool`: the drafter's KV pool to keep (the same drafter over the same target pool)."""
    algorithm = config.speculative_algorithm
    weights = None if cache is None else cache[1]
    target.model.capture_features(
        weights.layout.target_layers if isinstance(weights, EagleHead) else ()
    )
    if algorithm == "none":
        return None
    if algorithm == "ngram":
        return Speculator(config, None)
    assert weights is not None, "load_draft first"
    device = target.device
    backend = config.attention_backend if device.type == "cuda" else "torch"
    slots = config.max_running_requests or 1
    if isinstance(weights, EagleHead):
        topk = config.speculative_eagle_topk or 1
        eagle = EagleDraft(weights, pool, backend, slots, max_request_tokens, topk, draft_pool)
        return Speculator(config, eagle)
    draft = DraftModel(weights, pool, backend, slots, max_request_tokens, draft_pool)
    draft.key = cache[0]  # type: ignore[index]
    return Speculator(config, draft)


def _check_draft_matches(target: LoadedModel, draft: LoadedModel) -> None:
    """A draft model proposes token ids the target must read the same way."""
    if draft.model_config.vocab_size != target.model_config.vocab_size or (
        target.tokenizer is not None
        and draft.tokenizer is not None
        and target.tokenizer.get_vocab() != draft.tokenizer.get_vocab()
    ):
        raise ConfigError(
            f"--speculative-draft-model-path {draft.source.name} has another vocabulary than "
            f"{target.source.name}; a draft model must share the target's tokenizer"
        )


def _penalised(req: Request) -> bool:
    """Repetition / frequency / presence penalties: the target's distribution at a later
    position would depend on the drafts, so such requests never draft."""
    p = req.params
    return p.repetition_penalty != 1.0 or bool(p.frequency_penalty) or bool(p.presence_penalty)
