"""The engine's speculative-decoding side: for a decode batch, reserve pages and propose drafts
with the configured proposer (n-gram lookup or a draft model); the runner's verify pass and the
engine's bookkeeping do the rest. One Speculator per runtime build; hot restarts make a new one
(and keep a draft model's weights while its path, dtype and device stay)."""

from __future__ import annotations

import torch

from ..config import ConfigError, EngineConfig
from ..kv_cache import KVPool
from ..model_loader import LoadedModel, gpu_memory_gb, load_model
from ..scheduler import ScheduledBatch, Scheduler
from .draft import DraftModel
from .ngram import propose_ngram

BUILT = ("ngram", "draft")

DraftCache = tuple[EngineConfig, LoadedModel]  # a draft model's resolved config and weights


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
    if algorithm != "none" and (config.speculative_eagle_topk or 1) > 1:
        raise ConfigError(
            "tree drafting (--speculative-eagle-topk > 1) is not available in this build yet; "
            "use --speculative-eagle-topk 1"
        )


class Speculator:
    """Contract: `propose` reserves the pages of every draft it returns (the engine trims what
    the verify pass rejects) and gives requests with repetition / frequency / presence penalties
    no drafts: their target distribution at a later position would depend on the drafts."""

    def __init__(self, config: EngineConfig, draft: DraftModel | None) -> None:
        self.max_drafts = (config.speculative_num_draft_tokens or 1) - 1
        self.draft = draft

    def release(self) -> None:
        if self.draft is not None:
            self.draft.release()

    def propose(
        self, batch: ScheduledBatch, scheduler: Scheduler
    ) -> tuple[list[list[int]], dict[int, torch.Tensor] | None]:
        """Drafts per decode chunk, within each request's remaining max_tokens, and (draft
        model, sampled requests) the draft distribution of each drafted token."""
        counts: list[int] = []
        for chunk in batch.chunks:
            req, p = chunk.req, chunk.req.params
            room = min(self.max_drafts, req.max_new_tokens - len(req.output_ids) - 1)
            penalties = p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty
            if room <= 0 or penalties or not scheduler.reserve(req, req.num_tokens + room):
                room = 0  # nothing to draft, or the pool is short: verify the last token alone
            counts.append(room)
        reqs = [c.req for c in batch.chunks]
        if self.draft is not None:
            return self.draft.propose(reqs, counts)
        drafts = [
            propose_ngram(req.prompt_ids + req.output_ids, k) if k else []
            for req, k in zip(reqs, counts, strict=True)
        ]
        return drafts, None


def load_draft(
    config: EngineConfig, target: LoadedModel, cache: DraftCache | None
) -> DraftCache | None:
    """The draft model's weights for `config` (None unless the algorithm is draft), reusing
    `cache` when the same draft model is asked for again. Loaded before the target's KV pool is
    sized, so GPU pool sizing sees the memory they take."""
    if config.speculative_algorithm != "draft":
        return None
    draft_cfg = EngineConfig(
        model=config.speculative_draft_model_path,
        load_format="dummy" if config.load_format == "dummy" else "auto",
        device=config.device,
        dtype=config.dtype,
        seed=config.seed,
    ).resolve(target.device.type, gpu_memory_gb(target.device))
    if cache is not None and cache[0] == draft_cfg:
        return cache
    loaded = load_model(draft_cfg)
    _check_draft_matches(target, loaded)
    return draft_cfg, loaded


def draft_bytes_per_page(cache: DraftCache | None, page_size: int) -> int:
    """KV bytes the draft model needs per page of the target's pool (its pool has as many)."""
    if cache is None:
        return 0
    mc, dtype = cache[1].model_config, cache[1].dtype
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * mc.num_layers * page_size * mc.num_kv_heads * mc.head_dim * elem


def build_speculator(
    config: EngineConfig, pool: KVPool, max_request_tokens: int, cache: DraftCache | None
) -> Speculator | None:
    """The speculator for `config` (None when speculation is off); `cache` holds the draft
    model's weights (`load_draft`) for the draft algorithm."""
    if config.speculative_algorithm == "none":
        return None
    if config.speculative_algorithm != "draft":
        return Speculator(config, None)
    assert cache is not None, "load_draft first"
    loaded = cache[1]
    backend = config.attention_backend if loaded.device.type == "cuda" else "torch"
    draft = DraftModel(loaded, pool, backend, config.max_running_requests or 1, max_request_tokens)
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
