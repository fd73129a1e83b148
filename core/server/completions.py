"""POST /v1/completions: prompt(s) as text or token ids, echo, logprobs, n, streaming."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..outputs import GenerationResult
from ..runner import TokenLogprob
from .context import ServerContext
from .errors import APIError
from .schemas import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    new_id,
)
from .streams import (
    collect,
    merged,
    raise_for_engine_error,
    sampling_params,
    sse,
    submit_choices,
)


def _prompts(ctx: ServerContext, prompt: Any) -> tuple[list[list[int]], list[str | None]]:
    """Token ids per prompt, and the text to echo (None when ids were sent)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if all(isinstance(t, int) for t in prompt):
        prompt = [prompt]
    ids: list[list[int]] = []
    texts: list[str | None] = []
    for item in prompt:
        if isinstance(item, str):
            ids.append(ctx.tokenize(item))
            texts.append(item)
        else:
            vocab = ctx.engine.loaded.model_config.vocab_size
            bad = [t for t in item if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"token id {bad[0]} is outside the vocabulary", param="prompt")
            ids.append(list(item))
            texts.append(None)
    return ids, texts


def _logprobs(
    ctx: ServerContext, entries: list[TokenLogprob | None], offset: int
) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for entry in entries:
        out.text_offset.append(offset)
        if entry is None:  # the first prompt token has no context to be scored in
            out.tokens.append("")
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        token = ctx.token_text(entry.token_id)
        out.tokens.append(token)
        out.token_logprobs.append(entry.logprob)
        out.top_logprobs.append({ctx.token_text(t): lp for t, lp in entry.top})
        offset += len(token)
    return out


def _echo_entries(result: GenerationResult) -> list[TokenLogprob | None]:
    # OpenAI reports null for the first prompt token, then each later token's logprob.
    return [None, *(result.prompt_logprobs or [])]


async def create_completion(body: CompletionRequest, request: Request, ctx: ServerContext) -> Any:
    model = ctx.check_model(body.model)
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, "best_of must equal n (or be omitted)", param="best_of")
    prompt_ids, prompt_texts = _prompts(ctx, body.prompt)
    want_prompt_lp = body.echo and body.logprobs is not None
    params = sampling_params(
        body,
        max_tokens=body.max_tokens,
        logprobs=body.logprobs,
        prompt_logprobs=body.logprobs if want_prompt_lp else None,
    )
    choices = submit_choices(ctx.engine, prompt_ids, params, body.n)
    echo_texts = [
        (text if text is not None else ctx.detokenize(ids)) if body.echo else ""
        for ids, text in zip(prompt_ids, prompt_texts, strict=True)
        for _ in range(body.n)
    ]
    rid = new_id("cmpl")
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _stream(ctx, rid, model, choices, echo_texts, include_usage, body.n),
            media_type="text/event-stream",
        )
    results = await collect(choices, request)
    raise_for_engine_error(results)
    out: list[CompletionChoice] = []
    for choice, result, echo in zip(choices, results, echo_texts, strict=True):
        logprobs = None
        if body.logprobs is not None:
            entries: list[TokenLogprob | None] = []
            if want_prompt_lp:
                entries.extend(_echo_entries(result))
            entries.extend(result.logprobs)
            logprobs = _logprobs(ctx, entries, 0)
        out.append(
            CompletionChoice(
                index=choice.index,
                text=echo + result.text,
                logprobs=logprobs,
                finish_reason=ctx.finish_reason(result.finish_reason, result.error),
            )
        )
    return CompletionResponse(id=rid, model=model, choices=out, usage=ctx.usage(results, body.n))


async def _stream(
    ctx: ServerContext,
    rid: str,
    model: str,
    choices: list,
    echo_texts: list[str],
    include_usage: bool,
    n: int,
) -> AsyncIterator[str]:
    results = [GenerationResult(c.stream.handle.rid) for c in choices]
    offsets = [0] * len(choices)
    echoed = [not text for text in echo_texts]
    async for choice, delta in merged(choices):
        i = choice.index
        results[i].add(delta)
        text = delta.text
        if not echoed[i]:
            text = echo_texts[i] + text
            echoed[i] = True
        logprobs = None
        if delta.logprobs:
            logprobs = _logprobs(ctx, list(delta.logprobs), offsets[i])
            offsets[i] += sum(len(t) for t in logprobs.tokens)
        finish = ctx.finish_reason(delta.finish_reason, delta.error) if delta.finished else None
        if not text and not logprobs and finish is None:
            continue
        chunk = CompletionResponse(
            id=rid,
            model=model,
            choices=[CompletionChoice(index=i, text=text, logprobs=logprobs, finish_reason=finish)],
        )
        yield sse(chunk.model_dump())
    if include_usage:
        usage = CompletionResponse(id=rid, model=model, choices=[], usage=ctx.usage(results, n))
        yield sse(usage.model_dump())
    yield sse("[DONE]")
