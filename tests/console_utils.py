"""Driving the console from tests: async waits and OpenAI clients aimed at its in-process API."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import openai
from textual.pilot import Pilot

from llmconsole.console.app import ConsoleApp


async def until(pilot: Pilot[Any], predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await pilot.pause(0.05)


def client_for(app: ConsoleApp) -> openai.OpenAI:
    assert app.session is not None
    return openai.OpenAI(
        base_url=app.session.server.url + "/v1", api_key="unused", max_retries=0, timeout=120
    )


def stream_completion(client: openai.OpenAI, prompt: str, max_tokens: int) -> tuple[str, str]:
    """Stream one greedy completion; returns (text, finish_reason)."""
    text, reason = [], ""
    stream = client.completions.create(
        model=client.models.list().data[0].id,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        choice = chunk.choices[0] if chunk.choices else None
        if choice is not None:
            text.append(choice.text)
            reason = choice.finish_reason or reason
    return "".join(text), reason


def fire(
    pool: ThreadPoolExecutor, client: openai.OpenAI, prompts: list[str], max_tokens: int
) -> list[Future[tuple[str, str]]]:
    return [pool.submit(stream_completion, client, p, max_tokens) for p in prompts]
