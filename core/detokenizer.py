"""Incremental detokenization and stop-string matching, per request.

Each new token decodes only a short window (from `prefix_offset`), never the whole output, and
text is held back while it ends in an incomplete UTF-8 sequence or could be the start of a stop
string, so a stop string is never emitted even when it straddles tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# A byte-level BPE token may end mid-character; the decoder then yields U+FFFD.
_INCOMPLETE = "\ufffd"
# How many earlier tokens to decode alongside new ones, so merges at the boundary decode right.
_CONTEXT_TOKENS = 6


@dataclass
class IncrementalDetokenizer:
    tokenizer: Any
    prompt_tail: list[int]  # last few prompt ids: the first output token decodes in context
    stop: tuple[str, ...] = ()
    skip_special_tokens: bool = True
    _ids: list[int] = field(default_factory=list)
    _prefix_offset: int = 0
    _read_offset: int = 0
    _text: str = ""  # all decoded text so far
    _emitted: int = 0  # chars of _text already handed out
    stopped_on: str | None = None

    def __post_init__(self) -> None:
        self._ids = list(self.prompt_tail[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._max_stop = max((len(s) for s in self.stop), default=0)

    @property
    def text(self) -> str:
        """Text handed out so far (never includes a stop string)."""
        return self._text[: self._emitted]

    def add(self, token_id: int) -> str:
        """Feed one token; returns the new text that is safe to emit (maybe "")."""
        self._ids.append(token_id)
        decode = self.tokenizer.decode
        kwargs = {"skip_special_tokens": self.skip_special_tokens}
        prefix = decode(self._ids[self._prefix_offset : self._read_offset], **kwargs)
        full = decode(self._ids[self._prefix_offset :], **kwargs)
        if len(full) > len(prefix) and not full.endswith(_INCOMPLETE):
            self._text += full[len(prefix) :]
            self._prefix_offset = max(self._read_offset, len(self._ids) - _CONTEXT_TOKENS)
            self._read_offset = len(self._ids)
        return self._release()

    def _release(self) -> str:
        if self.stop:
            # Search only where a stop string could newly end: the tail not yet emitted.
            window_start = max(0, self._emitted - self._max_stop + 1)
            hits = [(i, s) for s in self.stop if (i := self._text.find(s, window_start)) >= 0]
            if hits:
                index, stop = min(hits)
                self.stopped_on = stop
                self._text = self._text[:index]
                return self._take(len(self._text))
            # Hold back a tail that could still grow into a stop string.
            safe = len(self._text)
            for s in self.stop:
                for k in range(min(len(s) - 1, len(self._text)), 0, -1):
                    if self._text.endswith(s[:k]):
                        safe = min(safe, len(self._text) - k)
                        break
            return self._take(max(safe, self._emitted))
        return self._take(len(self._text))

    def _take(self, upto: int) -> str:
        out = self._text[self._emitted : upto]
        self._emitted = upto
        return out

    def flush(self) -> str:
        """At finish (not on a stop string): release whatever was held back."""
        if self.stopped_on is not None:
            return ""
        return self._take(len(self._text))
