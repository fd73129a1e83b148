"""The built-in prompt set shipped with the package (core/data/prompts.json)."""

from __future__ import annotations

import json
from importlib.resources import files


def builtin_prompts() -> list[str]:
    path = files("llmconsole.core") / "data" / "prompts.json"
    return list(json.loads(path.read_text(encoding="utf-8")))
