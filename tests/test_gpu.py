"""GPU checks (run on the device machine: `pytest -m gpu`); skipped where CUDA is absent."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_utils import save_random_llama

from llmconsole.core import Engine, EngineConfig, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_engine_on_cuda_matches_transformers_on_cpu(tmp_path: Path) -> None:
    hf = save_random_llama(tmp_path, hidden_size=128, num_kv_heads=2, max_positions=512)
    prompts = [[1, 5, 9, 33, 7], [1, *range(40, 90)]]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    cfg = EngineConfig(model=str(tmp_path), device="cuda", dtype="float32", max_total_tokens=4096)
    with Engine(cfg) as engine:
        results = engine.generate(prompts, params)
        seeded = SamplingParams(max_tokens=6, temperature=1.0, seed=3, ignore_eos=True)
        a = engine.generate([prompts[0]], seeded)[0].token_ids
        b = engine.generate([prompts[0]], seeded)[0].token_ids
    for prompt, result in zip(prompts, results, strict=True):
        ref = hf.generate(
            torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None
        )[0, len(prompt) :]
        assert result.token_ids == ref.tolist()
    assert a == b  # seeded sampling on the GPU is reproducible


def test_random_llama_8b_shape_serves_on_cuda() -> None:
    with Engine(EngineConfig(model="llama-3-8b", load_format="dummy")) as engine:
        assert engine.config.dtype == "bfloat16"
        out = engine.generate([[1] * 300, [2] * 20], SamplingParams(max_tokens=8, ignore_eos=True))
        assert [len(r.token_ids) for r in out] == [8, 8]
        engine.check_integrity()
    assert engine.pool.k == []  # shutdown gave the KV memory back
