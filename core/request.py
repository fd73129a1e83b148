"""A request's state inside the engine: its tokens, its pages, how far its KV is computed."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .sampling_params import SamplingParams


class RequestState(enum.Enum):
    WAITING = "queued"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context ran out
    ABORT = "abort"
    ERROR = "error"


@dataclass(eq=False)
class Request:
    """Invariant: `num_computed <= num_tokens`; the tokens [num_computed, num_tokens) are the
    ones the next forward passes must process; `pages` cover at least `num_computed` slots."""

    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    arrival_time: float = field(default_factory=time.time)
    output_ids: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0
    state: RequestState = RequestState.WAITING
    finish_reason: FinishReason | None = None
    error: str | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    num_retractions: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (first admission)
    # The prefix cache's pages this request reads (the first `num_shared_pages` of `pages`) and
    # the locked node they end in; the rest of `pages` are its own.
    num_shared_pages: int = 0
    prefix_node: Any = None  # prefix_cache.Node while it holds a lock
    accepted_draft_tokens: int = 0  # speculative drafts the target accepted
    draft_computed: int = 0  # positions whose drafter KV is valid (draft model, EAGLE head)
    # EAGLE: the target's features of positions [draft_computed, draft_computed + rows)
    draft_features: torch.Tensor | None = None
    generator: torch.Generator | None = None
    detokenizer: Any = None  # IncrementalDetokenizer, attached by the engine
    prompt_logprobs: list[Any] = field(default_factory=list)  # TokenLogprob of prompt[1:]

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("the prompt is empty")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.params.seed is not None:
            self.generator = torch.Generator(device="cpu").manual_seed(self.params.seed)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def in_prefill(self) -> bool:
        """True until the prompt (plus, after a retraction, the output so far) is in the cache;
        a decode-phase request has exactly its last sampled token pending."""
        return self.num_pending > 1 or not self.output_ids

    @property
    def finished(self) -> bool:
        return self.state is RequestState.FINISHED

    def token_ids(self, start: int, end: int) -> list[int]:
        prompt_len = len(self.prompt_ids)
        if end <= prompt_len:
            return self.prompt_ids[start:end]
        if start >= prompt_len:
            return self.output_ids[start - prompt_len : end - prompt_len]
        return self.prompt_ids[start:] + self.output_ids[: end - prompt_len]
