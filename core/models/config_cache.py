"""What transformers resolves for a model folder (its config, its tokenizer class), cached as
JSON for later starts.

`AutoConfig.from_pretrained` is cheap itself, but in transformers 5 importing any config class
drags in its model-loading stack (torch.distributed.tensor among it): ~2 s of imports on a small
CPU, most of a later start. So the first load of a config.json asks transformers once and keeps
its JSON (every attribute, defaults filled in) under `<cache>/configs/`, keyed by the file's
bytes and the transformers version; later starts read that dict back. Either way the engine sees
the same `ResolvedConfig`, and `to_transformers()` rebuilds the real config class on demand.
`AutoTokenizer` likewise costs ~1 s more than the class it picks: later starts load that class
directly, from the same files.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import tempfile
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .gguf_import import cache_root


class ResolvedConfig:
    """Read-only attribute view of `PretrainedConfig.to_dict()`: `config.hidden_size`, and
    `getattr(config, "sliding_window", None)` for attributes the model type does not have."""

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_values", MappingProxyType(dict(values)))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a resolved config is read-only")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ResolvedConfig) and self._values == other._values

    def __hash__(self) -> int:
        return hash(json.dumps(self._values, sort_keys=True, default=str))

    def __repr__(self) -> str:
        return f"ResolvedConfig({self._values.get('model_type')!r}, {len(self._values)} keys)"

    def __reduce__(self) -> tuple[type, tuple[dict[str, Any]]]:  # pickle / copy
        return ResolvedConfig, (self.to_dict(),)

    def __deepcopy__(self, memo: dict[int, Any]) -> ResolvedConfig:
        return self  # immutable

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dict(self._values)))  # a deep copy the caller may change

    def to_transformers(self) -> Any:  # transformers.PretrainedConfig
        """The transformers config class for this model type, built from these values."""
        from transformers import AutoConfig

        values = self.to_dict()
        return AutoConfig.for_model(values.pop("model_type"), **values)


def load_config(folder: Path) -> ResolvedConfig:
    """`folder`'s config.json as transformers resolves it (from the cache when seen before).
    Errors in config.json surface from transformers, on first load, as they always did."""
    raw = (folder / "config.json").read_bytes()
    path = _cache_path(raw)
    try:
        return ResolvedConfig(json.loads(path.read_text()))
    except (OSError, ValueError):
        pass  # not cached yet (or a damaged entry): resolve and (re)write it
    from transformers import AutoConfig

    # Through JSON now, so this start sees exactly what later starts will read back.
    text = AutoConfig.from_pretrained(folder).to_json_string(use_diff=False)
    _write_atomically(path, text)
    return ResolvedConfig(json.loads(text))


def load_tokenizer(folder: Path) -> Any:  # a transformers tokenizer
    """`AutoTokenizer.from_pretrained(folder)`, or, when the class it picked for these
    tokenizer files is known, that class's `from_pretrained(folder)`. The known entry also keeps
    tokenizer.json's added tokens: given them, transformers skips parsing that file in Python
    (~60-100 ms of a later start) when tokenizer_config.json does not list them itself."""
    path = _cache_path(_tokenizer_key(folder), "tokenizers")
    try:
        entry = json.loads(path.read_text())
        module, name = entry["class"]
        cls = getattr(importlib.import_module(module), name)
    except (OSError, ValueError, KeyError, TypeError, ImportError, AttributeError):
        cls = None  # not cached yet, or a damaged entry: AutoTokenizer decides again
    if cls is not None:
        kwargs = {}
        try:
            if entry.get("added_tokens") is not None:
                kwargs["added_tokens_decoder"] = _added_tokens_decoder(entry["added_tokens"])
        except (TypeError, ValueError, KeyError, AttributeError):
            pass  # a damaged entry: transformers reads tokenizer.json itself, as without one
        return cls.from_pretrained(str(folder), **kwargs)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    picked = type(tokenizer)
    entry = {"class": [picked.__module__, picked.__qualname__]}
    entry["added_tokens"] = _file_added_tokens(folder)
    _write_atomically(path, json.dumps(entry))
    return tokenizer


def _file_added_tokens(folder: Path) -> list[dict[str, Any]] | None:
    """tokenizer.json's added tokens, where transformers would read them from that file: only
    when tokenizer_config.json has no `added_tokens_decoder` of its own and there is no legacy
    added_tokens.json (both take other paths in transformers)."""
    try:
        settings = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        settings = {}
    if "added_tokens_decoder" in settings or (folder / "added_tokens.json").exists():
        return None
    try:
        added = json.loads((folder / "tokenizer.json").read_text())["added_tokens"]
    except (OSError, ValueError, KeyError):
        return None
    return added if isinstance(added, list) else None


def _added_tokens_decoder(added: list[dict[str, Any]]) -> dict[int, Any]:
    """{id: AddedToken} as transformers builds it from tokenizer.json's `added_tokens`."""
    from tokenizers import AddedToken

    decoder = {}
    for token in added:
        fields = dict(token)
        index = int(fields.pop("id"))
        decoder[index] = AddedToken(**fields)
    return decoder


def _tokenizer_key(folder: Path) -> bytes:
    """The files AutoTokenizer reads to pick a class (absent ones count as empty)."""
    parts = []
    for name in ("tokenizer_config.json", "config.json", "tokenizer.json", "tokenizer.model"):
        file = folder / name
        stat = file.stat() if file.is_file() else None
        if name.startswith("tokenizer_config") or name == "config.json":
            parts.append(file.read_bytes() if stat else b"")
        else:  # large files: their size and time stand for their bytes (added tokens kept)
            sig = f"{stat.st_size}:{stat.st_mtime_ns}" if stat else "-1"
            parts.append(f"{name}:{sig}".encode())
    return b"\0".join(parts)


def _cache_path(key: bytes, kind: str = "configs") -> Path:
    version = metadata.version("transformers")
    digest = hashlib.sha256(key + b"\0transformers " + version.encode()).hexdigest()[:24]
    return cache_root() / kind / f"{digest}.json"


def _write_atomically(path: Path, text: str) -> None:
    """Best effort: a read-only or full cache disk only costs later starts their speed-up."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError:
        pass
