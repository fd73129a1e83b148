"""EngineConfig: every engine flag, frozen and validated once.

Field names are SGLang's flags in snake_case (`--cuda-graph-max-bs` -> `cuda_graph_max_bs`).
`None` means "auto"; `resolve()` turns the autos into concrete values for one device, once, and
returns a new config (hot restart builds a new config the same way instead of mutating this one).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from typing import Any

ATTENTION_BACKENDS = ("auto", "torch", "triton", "flashinfer", "fa3")
DTYPES = ("auto", "float32", "bfloat16", "float16")
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
SPECULATIVE_ALGORITHMS = ("none", "ngram", "draft", "eagle", "eagle3")
OVERLAP_SCHEDULE = ("auto", "on", "off")
KV_CACHE_DTYPE_NAMES = ("auto", "fp8_e4m3", "fp8_e5m2")  # auto: the model's dtype
# SGLang spells some algorithms differently; accept its names too.
_SPEC_ALIASES = {"standalone": "draft", "": "none"}

# Draft steps per verify pass when --speculative-num-steps is unset (our defaults; SGLang picks
# per model). ngram proposals are free, a draft model's cost one forward pass each.
SPECULATIVE_DEFAULT_STEPS = {"ngram": 4, "draft": 3, "eagle": 5, "eagle3": 5}
EAGLE_AUTO = (5, 4, 8)  # SGLang's auto (steps, topk, draft tokens) for EAGLE on Llama models
CPU_DEFAULT_MAX_TOTAL_TOKENS = 32768
CPU_DEFAULT_CHUNKED_PREFILL = 2048
GPU_DEFAULT_CHUNKED_PREFILL = 8192


class ConfigError(ValueError):
    """An invalid flag value; the message names the flag as the CLI spells it."""


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def cuda_graph_max_bs_for_memory(gpu_memory_gb: float) -> int:
    """SGLang's default: the largest captured decode batch grows with GPU memory."""
    if gpu_memory_gb < 20:
        return 8
    if gpu_memory_gb < 35:
        return 24
    if gpu_memory_gb < 60:
        return 32
    if gpu_memory_gb < 80 * 0.95:  # an "80 GB" card reports ~79.2 GiB
        return 160
    return 256


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # None = the default model (SmolLM2-135M-Instruct GGUF)
    tokenizer_path: str | None = None
    load_format: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    # memory
    page_size: int = 1
    kv_cache_dtype: str = "auto"  # fp8_e4m3 / fp8_e5m2 halve the KV bytes (triton, torch)
    max_total_tokens: int | None = None  # KV pool size in tokens (CPU default; GPU derives it)
    mem_fraction_static: float | None = None
    context_length: int | None = None
    # scheduling
    max_running_requests: int | None = None
    chunked_prefill_size: int | None = None  # -1 disables chunking
    disable_radix_cache: bool = False  # SGLang's default: the radix prefix cache is on
    # GPU execution
    attention_backend: str = "auto"
    cuda_graph_max_bs: int | None = None
    disable_cuda_graph: bool = False
    # Decode step N+1 is launched before step N's tokens are read (SGLang's overlap schedule;
    # its --disable-overlap-schedule is "off"). auto: on for CUDA, off on CPU, where nothing
    # runs asynchronously and it would only deliver each token a step later.
    overlap_schedule: str = "auto"
    # speculative decoding
    speculative_algorithm: str = "none"
    speculative_draft_model_path: str | None = None
    speculative_num_steps: int | None = None
    speculative_eagle_topk: int | None = None
    speculative_num_draft_tokens: int | None = None
    # server
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    # telemetry
    telemetry_capacity: int = 65536
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def prefix_cache(self) -> bool:
        """Whether the radix prefix cache is used (SGLang's default, with or without
        speculative decoding: a drafter's own KV is cached with the target's)."""
        return not self.disable_radix_cache

    def __post_init__(self) -> None:
        alg = (self.speculative_algorithm or "none").lower()
        object.__setattr__(self, "speculative_algorithm", _SPEC_ALIASES.get(alg, alg))
        self._check_choice("attention_backend", ATTENTION_BACKENDS)
        self._check_choice("dtype", DTYPES)
        self._check_choice("load_format", LOAD_FORMATS)
        self._check_choice("speculative_algorithm", SPECULATIVE_ALGORITHMS)
        self._check_choice("overlap_schedule", OVERLAP_SCHEDULE)
        self._check_choice("kv_cache_dtype", KV_CACHE_DTYPE_NAMES)
        if self.kv_cache_dtype != "auto" and self.attention_backend in ("flashinfer", "fa3"):
            raise ConfigError(
                f"--kv-cache-dtype {self.kv_cache_dtype} needs --attention-backend triton (or "
                f"torch): the {self.attention_backend} kernels shipped here read bf16/fp16 KV only"
            )
        if self.device != "auto" and not (
            self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")
        ):
            raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        self._check_min("page_size", 1)
        self._check_min("max_total_tokens", 16)
        self._check_min("context_length", 2)
        self._check_min("max_running_requests", 1)
        self._check_min("cuda_graph_max_bs", 1)
        self._check_min("speculative_num_steps", 1)
        self._check_min("speculative_eagle_topk", 1)
        self._check_min("speculative_num_draft_tokens", 1)
        self._check_min("telemetry_capacity", 16)
        if self.chunked_prefill_size is not None and not (
            self.chunked_prefill_size == -1 or self.chunked_prefill_size >= 1
        ):
            raise ConfigError(
                f"--chunked-prefill-size must be -1 (off) or >= 1, got {self.chunked_prefill_size}"
            )
        if self.mem_fraction_static is not None and not 0.0 < self.mem_fraction_static < 1.0:
            raise ConfigError(
                f"--mem-fraction-static must be in (0, 1), got {self.mem_fraction_static}"
            )
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in 0..65535, got {self.port}")

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise ConfigError(
                f"{flag_name(name)} must be one of {', '.join(choices)}; got {value!r}"
            )

    def _check_min(self, name: str, minimum: int) -> None:
        value = getattr(self, name)
        if value is not None and value < minimum:
            raise ConfigError(f"{flag_name(name)} must be >= {minimum}, got {value}")

    def replace(self, **changes: Any) -> EngineConfig:
        """A new, re-validated config (configs are never mutated)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown engine setting(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def diff(self, other: EngineConfig) -> dict[str, tuple[Any, Any]]:
        """Fields whose value differs: name -> (self's, other's)."""
        return {
            f.name: (getattr(self, f.name), getattr(other, f.name))
            for f in dataclasses.fields(self)
            if f.compare and getattr(self, f.name) != getattr(other, f.name)
        }

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.compare}

    def resolve(self, device_type: str, gpu_memory_gb: float = 0.0) -> EngineConfig:
        """Fill every "auto" for one device; the engine only ever runs a resolved config."""
        on_gpu = device_type == "cuda"
        dtype = self.dtype if self.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
        chunk = self.chunked_prefill_size
        if chunk is None:
            chunk = GPU_DEFAULT_CHUNKED_PREFILL if on_gpu else CPU_DEFAULT_CHUNKED_PREFILL
        steps, topk, draft_tokens = self._speculative_defaults()
        graph_bs = self.cuda_graph_max_bs
        if graph_bs is None:
            graph_bs = cuda_graph_max_bs_for_memory(gpu_memory_gb) if on_gpu else 0
        return self.replace(
            device=device_type if self.device == "auto" else self.device,
            dtype=dtype,
            chunked_prefill_size=chunk,
            cuda_graph_max_bs=graph_bs or None,
            max_running_requests=self.max_running_requests or (256 if on_gpu else 64),
            mem_fraction_static=self.mem_fraction_static or (0.88 if on_gpu else None),
            max_total_tokens=self.max_total_tokens
            or (None if on_gpu else CPU_DEFAULT_MAX_TOTAL_TOKENS),
            attention_backend=self.attention_backend
            if self.attention_backend != "auto"
            else auto_attention_backend(device_type, dtype, self.kv_cache_dtype),
            speculative_num_steps=steps,
            speculative_eagle_topk=topk,
            speculative_num_draft_tokens=draft_tokens,
            overlap_schedule=self.overlap_schedule
            if self.overlap_schedule != "auto"
            else ("on" if on_gpu else "off"),
        )

    def _speculative_defaults(self) -> tuple[int | None, int | None, int | None]:
        """(num_steps, topk, num_draft_tokens) with the autos filled. A chain (topk 1) verifies
        the step's last token plus one draft per step, so num_draft_tokens = num_steps + 1, as
        SGLang adjusts it; whichever of the two was given decides. EAGLE with none of the three
        set takes SGLang's auto choice for Llama-family targets: 5 steps, topk 4, 8 tokens."""
        unset = (
            self.speculative_num_steps,
            self.speculative_eagle_topk,
            self.speculative_num_draft_tokens,
        ) == (None, None, None)
        if self.speculative_algorithm in ("eagle", "eagle3") and unset:
            return EAGLE_AUTO
        if self.speculative_algorithm == "none":
            return (
                self.speculative_num_steps,
                self.speculative_eagle_topk,
                self.speculative_num_draft_tokens,
            )
        topk = self.speculative_eagle_topk or 1
        steps = self.speculative_num_steps
        draft_tokens = self.speculative_num_draft_tokens
        if steps is None:
            default = SPECULATIVE_DEFAULT_STEPS[self.speculative_algorithm]
            steps = draft_tokens - 1 if topk == 1 and draft_tokens else default
        if topk == 1:
            draft_tokens = steps + 1
        elif draft_tokens is None:
            draft_tokens = min(topk * steps + 1, 64)
        return steps, topk, draft_tokens


def auto_attention_backend(
    device_type: str, dtype: str = "bfloat16", kv_cache_dtype: str = "auto"
) -> str:
    """FlashInfer on CUDA when it is installed (its kernels take bf16/fp16 only, and KV in the
    same dtype), else our Triton kernels, else the torch reference (CPU). find_spec looks
    without importing: importing flashinfer costs seconds and needs a GPU."""
    if device_type != "cuda":
        return "torch"
    half = dtype in ("bfloat16", "float16", "auto") and kv_cache_dtype == "auto"
    if half and importlib.util.find_spec("flashinfer"):
        return "flashinfer"
    if importlib.util.find_spec("triton") is not None:
        return "triton"
    return "torch"
