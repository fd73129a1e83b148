"""What every route needs: the engine, the names it answers to, and token/text helpers."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from ..engine import Engine, RequestError
from ..outputs import GenerationResult
from .errors import APIError
from .schemas import PromptTokensDetails, UsageInfo


class ServerContext:
    def __init__(self, engine: Engine, api_key: str | None = None) -> None:
        self.engine = engine
        self.api_key = api_key
        # Keyed by the tokenizer too: a hot restart may load a model with another vocabulary.
        self._token_text_cached = lru_cache(maxsize=65536)(self._token_text)

    def token_text(self, token_id: int) -> str:
        return self._token_text_cached(id(self.engine.tokenizer), token_id)

    @property
    def model_name(self) -> str:
        return self.engine.model_name  # a hot restart may load another model

    @property
    def aliases(self) -> set[str]:
        """Clients may name the model by its served name or by what --model said."""
        return {self.engine.model_name} | ({self.engine.config.model} - {None})

    def check_model(self, requested: str | None) -> str:
        if requested and requested not in self.aliases:
            raise APIError(
                404,
                f"the model '{requested}' does not exist; this server serves '{self.model_name}'",
                "not_found_error",
                param="model",
                code="model_not_found",
            )
        return self.model_name

    def tokenize(self, text: str) -> list[int]:
        try:
            return self.engine.tokenize(text)
        except RequestError as exc:
            raise APIError(400, str(exc), param="prompt") from None

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        try:
            return self.engine.apply_chat_template(messages)
        except RequestError as exc:
            raise APIError(400, str(exc), param="messages") from None
        except Exception as exc:  # a template that rejects this conversation (e.g. roles)
            raise APIError(400, f"chat template failed: {exc}", param="messages") from None

    def detokenize(self, ids: Sequence[int]) -> str:
        tokenizer = self.engine.tokenizer
        return "" if tokenizer is None else tokenizer.decode(list(ids))

    def _token_text(self, _tokenizer_id: int, token_id: int) -> str:
        tokenizer = self.engine.tokenizer
        return str(token_id) if tokenizer is None else tokenizer.decode([token_id])

    @staticmethod
    def finish_reason(reason: str | None, error: str | None) -> str | None:
        """OpenAI's reasons; an engine-side failure (or shutdown) reads "error"."""
        if error or reason in ("abort", "error"):
            return "error"
        return reason

    @staticmethod
    def usage(results: Sequence[GenerationResult], n: int = 1) -> UsageInfo:
        # The n choices of one prompt share it: its tokens count once, as OpenAI counts them.
        prompt = sum(r.usage.prompt_tokens for r in results[::n] if r.usage)
        cached = sum(r.usage.cached_tokens for r in results[::n] if r.usage)
        completion = sum(r.usage.completion_tokens for r in results if r.usage)
        return UsageInfo(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )
