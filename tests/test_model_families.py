"""Each supported family, as a tiny random model saved by transformers, runs through the whole
engine (folder loading, paged KV, batching) and gives transformers' own greedy tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from llmconsole.core import Engine, EngineConfig, SamplingParams

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=320,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
)

FAMILIES = {
    "llama-3.1-rope": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "qwen2-bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
    "qwen3-qknorm": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32)),
}


def save_tiny(folder: Path, family: str) -> transformers.PreTrainedModel:
    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**TINY, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    # Larger-than-default weights so greedy paths are decisive, not ties around zero.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_transformers(tmp_path: Path, family: str) -> None:
    hf = save_tiny(tmp_path, family)
    prompts = [[1, 5, 9, 33, 7, 100, 250], [1, 42], [1, *range(60, 100)]]
    cfg = EngineConfig(model=str(tmp_path), page_size=4, chunked_prefill_size=16)
    with Engine(cfg) as engine:
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        results = engine.generate(prompts, params)
    for prompt, result in zip(prompts, results, strict=True):
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([prompt]),
                max_new_tokens=12,
                min_new_tokens=12,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )[0, len(prompt) :]
        assert result.token_ids == ref.tolist(), family


def test_unsupported_architecture_names_itself(tmp_path: Path) -> None:
    from llmconsole.core.models.errors import UnsupportedModelError

    gpt2 = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100)
    transformers.GPT2LMHeadModel(gpt2).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        Engine(EngineConfig(model=str(tmp_path)))


def test_random_weights_of_a_named_shape_run() -> None:
    with Engine(EngineConfig(model="tiny-llama", load_format="dummy")) as engine:
        assert engine.tokenizer is None
        out = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=5, ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_a_broken_kv_invariant_is_reported_and_serving_goes_on() -> None:
    from llmconsole.core.telemetry import EngineEvent, of_type

    with Engine(EngineConfig(model="tiny-llama", load_format="dummy")) as engine:
        engine.allocator.alloc(1)  # a page nobody owns: the idle check must notice it
        params = SamplingParams(max_tokens=3, ignore_eos=True)
        first = engine.generate([[1, 2, 3]], params)[0]
        second = engine.generate([[4, 5]], params)[0]
        events = of_type(engine.telemetry.snapshot(), EngineEvent)
    assert len(first.token_ids) == 3 and len(second.token_ids) == 3
    assert any(e.kind == "error" and "integrity" in e.message for e in events)
