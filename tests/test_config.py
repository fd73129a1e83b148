from __future__ import annotations

import pytest

from llmconsole.core.config import (
    ConfigError,
    EngineConfig,
    auto_attention_backend,
    cuda_graph_max_bs_for_memory,
)


@pytest.mark.parametrize(
    ("changes", "flag"),
    [
        ({"page_size": 0}, "--page-size"),
        ({"attention_backend": "magic"}, "--attention-backend"),
        ({"dtype": "int3"}, "--dtype"),
        ({"chunked_prefill_size": 0}, "--chunked-prefill-size"),
        ({"mem_fraction_static": 1.5}, "--mem-fraction-static"),
        ({"max_running_requests": 0}, "--max-running-requests"),
        ({"speculative_algorithm": "guess"}, "--speculative-algorithm"),
        ({"device": "tpu"}, "--device"),
        ({"port": 70000}, "--port"),
    ],
)
def test_bad_values_name_the_flag(changes: dict, flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        EngineConfig(**changes)


def test_configs_are_frozen_and_replace_revalidates() -> None:
    cfg = EngineConfig()
    with pytest.raises(AttributeError):
        cfg.page_size = 4  # type: ignore[misc]
    assert cfg.replace(page_size=4).page_size == 4
    with pytest.raises(ConfigError):
        cfg.replace(page_size=-1)
    with pytest.raises(ConfigError, match="unknown"):
        cfg.replace(cuda_graphs=True)
    assert cfg.diff(cfg.replace(port=9000)) == {"port": (8000, 9000)}


def test_sglang_spellings_of_speculative_algorithms() -> None:
    assert EngineConfig(speculative_algorithm="EAGLE3").speculative_algorithm == "eagle3"
    assert EngineConfig(speculative_algorithm="STANDALONE").speculative_algorithm == "draft"
    assert EngineConfig(speculative_algorithm="NGRAM").speculative_algorithm == "ngram"


def test_auto_values_resolve_per_device() -> None:
    cpu = EngineConfig().resolve("cpu")
    assert (cpu.device, cpu.dtype, cpu.attention_backend) == ("cpu", "float32", "torch")
    assert cpu.max_total_tokens and cpu.chunked_prefill_size and cpu.max_running_requests
    gpu = EngineConfig().resolve("cuda", gpu_memory_gb=79.2)
    assert (gpu.dtype, gpu.cuda_graph_max_bs) == ("bfloat16", 256)
    assert gpu.attention_backend == auto_attention_backend("cuda")
    assert EngineConfig(cuda_graph_max_bs=32).resolve("cuda", 79.2).cuda_graph_max_bs == 32
    assert [cuda_graph_max_bs_for_memory(g) for g in (16, 24, 40, 79.2)] == [8, 24, 32, 256]


def test_auto_attention_backend_is_triton_on_cuda_torch_on_cpu(monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    assert EngineConfig().resolve("cpu").attention_backend == "torch"
    if real("triton") is not None and real("flashinfer") is None:  # else: flashinfer
        assert EngineConfig().resolve("cuda", 79.2).attention_backend == "triton"
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("triton", "flashinfer") else real(name, *a),
    )
    assert EngineConfig().resolve("cuda", 79.2).attention_backend == "torch"  # no triton
    explicit = EngineConfig(attention_backend="torch").resolve("cuda", 79.2)
    assert explicit.attention_backend == "torch"


def test_speculative_autos_follow_sglang() -> None:
    def resolved(**kw) -> tuple:
        c = EngineConfig(**kw).resolve("cpu")
        return c.speculative_num_steps, c.speculative_eagle_topk, c.speculative_num_draft_tokens

    assert resolved(speculative_algorithm="eagle3") == (5, 4, 8)  # SGLang's Llama auto
    assert resolved(speculative_algorithm="eagle", speculative_eagle_topk=1) == (5, 1, 6)
    assert resolved(speculative_algorithm="eagle", speculative_num_draft_tokens=4) == (3, 1, 4)
    assert resolved(speculative_algorithm="eagle", speculative_eagle_topk=2) == (5, 2, 11)
    assert resolved(speculative_algorithm="ngram") == (4, 1, 5)  # a chain: steps + 1
