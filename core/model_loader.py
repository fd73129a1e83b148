"""From a config to loaded parts: device, model weights, tokenizer, EOS ids.

Kept apart from the engine loop so hot restart can reuse loaded weights and only rebuild the
KV pool, graphs and plans.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import EngineConfig
from .models import config_cache, gguf_blocks
from .models.config import ModelConfig
from .models.llama import LlamaForCausalLM
from .models.source import ModelSource, resolve_model
from .models.weights import iter_weights

Progress = Callable[[str, float], None]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LoadedModel:
    source: ModelSource
    model_config: ModelConfig
    model: LlamaForCausalLM
    tokenizer: Any | None
    eos_token_ids: frozenset[int]
    device: torch.device
    dtype: torch.dtype
    load_seconds: float
    # What decode products read: the weights' dtype, plus the GGUF blocks they took, if any
    weight_format: str = ""


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    return device


def gpu_memory_gb(device: torch.device) -> float:
    if device.type != "cuda":
        return 0.0
    return torch.cuda.get_device_properties(device).total_memory / 2**30


def load_model(config: EngineConfig, progress: Progress | None = None) -> LoadedModel:
    """Resolve `config.model`, build our model on the device and load (or randomise) weights.
    `config` must be resolved (no "auto" dtype)."""
    started = time.perf_counter()
    report = progress or (lambda stage, fraction: None)
    device = torch.device(config.device)
    dtype = DTYPES[config.dtype]
    if device.type == "cpu" and dtype == torch.float32 and _may_be_gguf(config.model):
        # Compile the blocks kernel (first start only, a few seconds in a subprocess) while the
        # GGUF converts and loads; attach_gguf_blocks waits for it.
        threading.Thread(target=gguf_blocks.kernel, name="cpu-blocks-build", daemon=True).start()
    source = resolve_model(config.model, config.load_format, progress=report)
    model_config = ModelConfig.from_hf(source.config)
    tokenizer_path = config.tokenizer_path or source.tokenizer_path
    if device.type == "cpu":
        # Serially: on a small CPU the tokenizer's imports (Python, GIL-bound) and the weight
        # copies (one GIL hand-off per tensor) slow each other down more than they overlap:
        # on 2 cores the engine build took a median 1.22 s in turn, 1.41 s at once.
        model = _build_model(config, source, model_config, device, dtype, report)
        blocks = attach_gguf_blocks(model, source, dtype)
        report("loading tokenizer", 0.9)
        tokenizer = load_tokenizer(tokenizer_path)
    else:
        blocks = {}
        # Host-to-device weight copies run long without the GIL: the tokenizer loads meanwhile.
        with ThreadPoolExecutor(1, thread_name_prefix="tokenizer") as pool:
            tokenizer_future = pool.submit(load_tokenizer, tokenizer_path)
            model = _build_model(config, source, model_config, device, dtype, report)
            report("loading tokenizer", 0.9)
            tokenizer = tokenizer_future.result()
    eos = set(model_config.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    eos.update(_generation_config_eos(source))
    report("ready", 1.0)
    return LoadedModel(
        source=source,
        model_config=model_config,
        model=model,
        tokenizer=tokenizer,
        eos_token_ids=frozenset(eos),
        device=device,
        dtype=dtype,
        load_seconds=time.perf_counter() - started,
        weight_format=describe_weights(dtype, blocks),
    )


def attach_gguf_blocks(
    model: LlamaForCausalLM, source: ModelSource, dtype: torch.dtype
) -> dict[str, int]:
    """fp32 CPU weights of a converted GGUF take its blocks for decode (gguf_blocks); returns
    the count by kind."""
    if dtype != torch.float32 or source.path is None:
        return {}
    return gguf_blocks.attach(model, source.path)


def _may_be_gguf(model: str | None) -> bool:
    return model is None or model.lower().endswith(".gguf")


def describe_weights(dtype: torch.dtype, blocks: dict[str, int]) -> str:
    name = str(dtype).removeprefix("torch.")
    if not blocks:
        return name
    kinds = ", ".join(f"{n} {k.upper()}" for k, n in sorted(blocks.items()))
    return f"{name}; decode reads GGUF blocks ({kinds})"


def _build_model(
    config: EngineConfig,
    source: ModelSource,
    model_config: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    report: Progress,
) -> LlamaForCausalLM:
    report("building model", 0.0)
    with device:  # parameters are born in their final dtype and place
        model = LlamaForCausalLM(model_config, dtype)
    if source.kind == "dummy":
        report("random weights", 0.5)
        model.init_random(seed=config.seed)
    else:
        report("loading weights", 0.5)
        model.load_weights(iter_weights(source))
    return model.eval()


def load_tokenizer(path: Any) -> Any | None:
    if path is None:
        return None
    return config_cache.load_tokenizer(Path(path))


def _generation_config_eos(source: ModelSource) -> set[int]:
    # Instruct models list their end-of-turn ids here (Llama 3: 128001 and 128009).
    if source.path is None:
        return set()
    path = source.path / "generation_config.json"
    if not path.is_file():
        return set()
    eos = json.loads(path.read_text()).get("eos_token_id")
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, list) else [eos])}
