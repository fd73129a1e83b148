"""The one engine flag set, with SGLang's names, shared by every command that starts an engine.

`engine_flags` adds the options to a typer command's signature and hands the command a built
`EngineConfig` instead, so every command spells and validates the flags the same way.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import typer

from llmconsole.core.config import (
    ATTENTION_BACKENDS,
    DTYPES,
    LOAD_FORMATS,
    SPECULATIVE_ALGORITHMS,
    EngineConfig,
)

PANEL = "Engine flags (SGLang names)"


@dataclass(frozen=True)
class Flag:
    field: str
    type: type
    help: str
    default: Any = None

    @property
    def cli(self) -> str:
        return "--" + self.field.replace("_", "-")


FLAGS: tuple[Flag, ...] = (
    Flag("model", str, "HF folder, HF cache id, .gguf file or random shape; default SmolLM2-135M"),
    Flag("tokenizer_path", str, "tokenizer folder, when not the model's"),
    Flag("load_format", str, f"{'|'.join(LOAD_FORMATS)}; dummy = random weights", "auto"),
    Flag("device", str, "auto|cpu|cuda|cuda:N", "auto"),
    Flag("dtype", str, f"{'|'.join(DTYPES)}; auto = bfloat16 on GPU, float32 on CPU", "auto"),
    Flag("seed", int, "seed for random weights and unseeded sampling", 0),
    Flag("page_size", int, "tokens per KV page", 1),
    Flag(
        "kv_cache_dtype",
        str,
        "auto|fp8_e4m3|fp8_e5m2: KV pool element type (auto: the model's; fp8 halves KV bytes)",
        "auto",
    ),
    Flag("max_total_tokens", int, "KV pool size in tokens (auto: 32768 on CPU, memory on GPU)"),
    Flag("mem_fraction_static", float, "share of GPU memory for weights + KV (auto 0.88)"),
    Flag("context_length", int, "longest prompt + output (auto: the model's)"),
    Flag("max_running_requests", int, "most requests decoding at once (auto: 64 CPU / 256 GPU)"),
    Flag("chunked_prefill_size", int, "prefill tokens per step; -1 = off (auto 2048/8192)"),
    Flag("attention_backend", str, "|".join(ATTENTION_BACKENDS), "auto"),
    Flag("cuda_graph_max_bs", int, "largest captured decode batch (auto by GPU memory)"),
    Flag("disable_cuda_graph", bool, "run decode eagerly", False),
    Flag(
        "overlap_schedule",
        str,
        "auto|on|off: launch each decode step before reading the last one's tokens "
        "(auto: on with CUDA; off = SGLang's --disable-overlap-schedule)",
        "auto",
    ),
    Flag(
        "disable_radix_cache",
        bool,
        "no radix prefix cache (also off with draft/eagle speculation)",
        False,
    ),
    Flag("speculative_algorithm", str, "|".join(SPECULATIVE_ALGORITHMS), "none"),
    Flag("speculative_draft_model_path", str, "draft model (draft) or head folder (eagle/eagle3)"),
    Flag("speculative_num_steps", int, "draft steps per verify"),
    Flag("speculative_eagle_topk", int, "branching of the draft tree"),
    Flag("speculative_num_draft_tokens", int, "tokens verified per step"),
    Flag("host", str, "API bind address", "127.0.0.1"),
    Flag("port", int, "API port", 8000),
    Flag("api_key", str, "require 'Authorization: Bearer KEY' on /v1"),
)


def _parameter(flag: Flag) -> inspect.Parameter:
    if flag.type is bool:
        no = "--no-" + flag.cli[2:]
        option = typer.Option(
            flag.default, f"{flag.cli}/{no}", help=flag.help, rich_help_panel=PANEL
        )
        annotation: Any = bool
    else:
        option = typer.Option(flag.default, flag.cli, help=flag.help, rich_help_panel=PANEL)
        annotation = flag.type if flag.default is not None else (flag.type | None)
    return inspect.Parameter(
        flag.field, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation
    )


def engine_flags(command: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a command taking `config: EngineConfig`; the CLI shows every engine flag."""
    names = {f.field for f in FLAGS}

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        values = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        return command(config=EngineConfig(**values), **kwargs)

    sig = inspect.signature(command)
    own = [p for p in sig.parameters.values() if p.name != "config"]
    wrapper.__signature__ = sig.replace(parameters=[*own, *map(_parameter, FLAGS)])  # type: ignore[attr-defined]
    return wrapper
