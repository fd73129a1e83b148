"""Incremental detokenization against the real tokenizer: same text as a full decode."""

from __future__ import annotations

import pytest

from llmconsole.core.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(engine):
    return engine.tokenizer


TEXTS = [
    "Hello, world! Ünïcödé façade — naïve café.",
    "emoji: 🤖🚀 and CJK: 你好，世界。 and math: ∑ x² ≤ ∞",
    "def f(x):\n    return x  # tabs\tand  spaces",
]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_text_equals_full_decode(tokenizer, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tokenizer, [1, 2, 3])
    pieces = [detok.add(t) for t in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces), "never emit half a UTF-8 character"


def test_stop_string_is_cut_and_never_emitted(tokenizer) -> None:
    text = "The answer is 42. The end."
    ids = tokenizer(text, add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tokenizer, [1], stop=("42. The",))
    emitted = ""
    for t in ids:
        emitted += detok.add(t)
        if detok.stopped_on:
            break
    assert detok.stopped_on == "42. The"
    assert emitted == "The answer is "
    assert detok.flush() == ""


def test_held_back_prefix_is_released_when_it_is_not_a_stop(tokenizer) -> None:
    text = "abc STOX and more"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tokenizer, [1], stop=("STOP",))
    out = "".join(detok.add(t) for t in ids) + detok.flush()
    assert out == text and detok.stopped_on is None
