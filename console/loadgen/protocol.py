"""The OpenAI streaming protocol as a client sees it: request bodies and SSE chunks."""

from __future__ import annotations

import json
from typing import Any

from .datasets import PromptSpec

DONE = "[DONE]"


def parse_sse_line(line: str) -> dict[str, Any] | str | None:
    """One SSE line: a JSON chunk (dict), DONE, or None for comments, other fields, blanks.
    Malformed JSON raises ValueError: the request then fails with that message."""
    if not line.startswith("data:"):
        return None
    data = line[len("data:") :].strip()
    if not data:
        return None
    if data == DONE:
        return DONE
    chunk = json.loads(data)
    if not isinstance(chunk, dict):
        raise ValueError(f"SSE data is not a JSON object: {data[:80]}")
    return chunk


def chunk_text(chunk: dict[str, Any]) -> str:
    """The generated text in a completions or chat chunk (reasoning text counts as output)."""
    choices = chunk.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        return ""
    choice = choices[0]
    if isinstance(choice.get("delta"), dict):
        delta = choice["delta"]
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return choice.get("text") or ""


def chunk_error(chunk: dict[str, Any]) -> str | None:
    """An error sent inside the stream (OpenAI `{"error": ...}` or vLLM `object: error`)."""
    if "error" in chunk and chunk["error"]:
        error = chunk["error"]
        return str(error.get("message", error) if isinstance(error, dict) else error)
    if chunk.get("object") == "error":
        return str(chunk.get("message", "error"))
    return None


def build_payload(spec: PromptSpec, model: str, endpoint: str, ignore_eos: bool) -> dict[str, Any]:
    """Greedy and streamed with usage, like SGLang's client; ignore_eos makes budgets exact."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": spec.max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    if ignore_eos:
        body["ignore_eos"] = True
    return body
