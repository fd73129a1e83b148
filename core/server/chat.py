"""POST /v1/chat/completions: messages through the model's chat template."""

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
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    TopLogprob,
    new_id,
)
from .streams import (
    Choice,
    collect,
    merged,
    raise_for_engine_error,
    sampling_params,
    sse,
    submit_choices,
)


def _logprobs(
    ctx: ServerContext, entries: tuple[TokenLogprob, ...] | list[TokenLogprob]
) -> ChatLogprobs:
    content = []
    for entry in entries:
        token = ctx.token_text(entry.token_id)
        top = [
            TopLogprob(token=ctx.token_text(t), logprob=lp, bytes=list(ctx.token_text(t).encode()))
            for t, lp in entry.top
        ]
        content.append(
            ChatTokenLogprob(
                token=token, logprob=entry.logprob, bytes=list(token.encode()), top_logprobs=top
            )
        )
    return ChatLogprobs(content=content)


async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, ctx: ServerContext
) -> Any:
    model = ctx.check_model(body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    prompt_ids = ctx.chat_ids(messages)
    max_tokens = (
        body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    )
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(body, max_tokens=max_tokens, logprobs=logprobs)
    choices = submit_choices(ctx.engine, [prompt_ids], params, body.n)
    rid = new_id("chatcmpl")
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _stream(ctx, rid, model, choices, include_usage, body.n),
            media_type="text/event-stream",
        )
    results = await collect(choices, request)
    raise_for_engine_error(results)
    out = [
        ChatChoice(
            index=choice.index,
            message=AssistantMessage(content=result.text),
            logprobs=_logprobs(ctx, result.logprobs) if body.logprobs else None,
            finish_reason=ctx.finish_reason(result.finish_reason, result.error),
        )
        for choice, result in zip(choices, results, strict=True)
    ]
    return ChatCompletionResponse(
        id=rid, model=model, choices=out, usage=ctx.usage(results, body.n)
    )


async def _stream(
    ctx: ServerContext,
    rid: str,
    model: str,
    choices: list[Choice],
    include_usage: bool,
    n: int,
) -> AsyncIterator[str]:
    def chunk(choice: ChatChunkChoice) -> str:
        return sse(ChatCompletionChunk(id=rid, model=model, choices=[choice]).model_dump())

    for c in choices:  # OpenAI opens every choice with the role
        yield chunk(ChatChunkChoice(index=c.index, delta=ChatDelta(role="assistant", content="")))
    results = [GenerationResult(c.stream.handle.rid) for c in choices]
    async for choice, delta in merged(choices):
        results[choice.index].add(delta)
        finish = ctx.finish_reason(delta.finish_reason, delta.error) if delta.finished else None
        if not delta.text and not delta.logprobs and finish is None:
            continue
        yield chunk(
            ChatChunkChoice(
                index=choice.index,
                delta=ChatDelta(content=delta.text or None),
                logprobs=_logprobs(ctx, delta.logprobs) if delta.logprobs else None,
                finish_reason=finish,
            )
        )
    if include_usage:
        usage = ChatCompletionChunk(id=rid, model=model, choices=[], usage=ctx.usage(results, n))
        yield sse(usage.model_dump())
    yield sse("[DONE]")
