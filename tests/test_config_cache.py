"""Later starts read a folder's config and tokenizer class from llmconsole's cache, never from
transformers' slow Auto* machinery, and get exactly what transformers resolved the first time."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from engine_utils import save_random_llama

from llmconsole.core.models import config_cache
from llmconsole.core.models.config import ModelConfig
from llmconsole.core.models.source import resolve_model


@pytest.fixture(scope="session")
def default_tokenizer_folder() -> Path:
    """The default model's converted folder (the user cache the engine tests use as well)."""
    src = resolve_model(None)
    assert src.tokenizer_path is not None
    return src.tokenizer_path


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "lc-cache"
    monkeypatch.setenv("LLMCONSOLE_CACHE_DIR", str(root))
    return root


class Calls:
    """Counts calls to a transformers entry point while still running it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, owner: type, name: str) -> None:
        self.count = 0
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)


def _fields_without_hf(config: ModelConfig) -> dict:
    values = dataclasses.asdict(config)
    values.pop("hf_config")
    return values


def test_second_resolve_reads_the_cached_config_not_transformers(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "tiny"
    save_random_llama(folder, hidden_size=64)
    real = transformers.AutoConfig.from_pretrained(folder)
    calls = Calls(monkeypatch, transformers.AutoConfig, "from_pretrained")

    first = resolve_model(str(folder))
    assert calls.count == 1
    assert len(list((cache / "configs").glob("*.json"))) == 1
    second = resolve_model(str(folder))
    assert calls.count == 1, "a later start must not go through AutoConfig"

    assert first.config == second.config
    assert second.config.to_dict() == json.loads(real.to_json_string(use_diff=False))
    assert _fields_without_hf(ModelConfig.from_hf(second.config)) == _fields_without_hf(
        ModelConfig.from_hf(real)
    )
    # The transformers config itself is still there for whoever needs the class.
    assert isinstance(second.hf_config, transformers.LlamaConfig)
    assert second.hf_config.to_dict() == real.to_dict()


def test_an_edited_config_is_resolved_again_not_served_stale(tmp_path: Path) -> None:
    folder = tmp_path / "tiny"
    save_random_llama(folder, hidden_size=64)
    assert resolve_model(str(folder)).config.rms_norm_eps == pytest.approx(1e-6)
    raw = json.loads((folder / "config.json").read_text())
    raw["rms_norm_eps"] = 1e-5
    (folder / "config.json").write_text(json.dumps(raw))
    assert resolve_model(str(folder)).config.rms_norm_eps == pytest.approx(1e-5)


def test_a_damaged_cache_entry_is_rewritten(tmp_path: Path, cache: Path) -> None:
    folder = tmp_path / "tiny"
    save_random_llama(folder, hidden_size=64)
    resolve_model(str(folder))
    (entry,) = (cache / "configs").glob("*.json")
    entry.write_text('{"hidden_size": 6')  # a start killed mid-write on an old version
    assert resolve_model(str(folder)).config.hidden_size == 64
    assert json.loads(entry.read_text())["hidden_size"] == 64


def test_an_unwritable_cache_only_costs_the_speed_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "tiny"
    save_random_llama(folder, hidden_size=64)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("LLMCONSOLE_CACHE_DIR", str(blocker))
    for _ in range(2):
        assert resolve_model(str(folder)).config.num_hidden_layers == 2


def test_cached_llama3_rope_scaling_gives_transformers_frequencies(tmp_path: Path) -> None:
    folder = tmp_path / "llama31-shape"
    transformers.LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ).save_pretrained(folder)
    resolve_model(str(folder), load_format="dummy")
    cached = resolve_model(str(folder), load_format="dummy").config  # from the cache
    assert isinstance(cached, config_cache.ResolvedConfig)
    real = transformers.AutoConfig.from_pretrained(folder)
    ours, scale = ModelConfig.from_hf(cached).rope_inv_freq()
    want, want_scale = ModelConfig.from_hf(real).rope_inv_freq()
    assert torch.equal(ours, want) and scale == want_scale
    default = torch.tensor([1.0 / 500000.0 ** (i / 32) for i in range(0, 32, 2)])
    assert not torch.allclose(ours, default), "llama3 scaling must change the low frequencies"


def test_resolved_config_is_read_only_with_getattr_defaults() -> None:
    config = config_cache.ResolvedConfig({"model_type": "llama", "hidden_size": 64})
    assert config.hidden_size == 64 and getattr(config, "sliding_window", None) is None
    with pytest.raises(AttributeError):
        config.hidden_size = 32
    copy = config.to_dict()
    copy["hidden_size"] = 1
    assert config.hidden_size == 64


def test_later_tokenizer_loads_skip_auto_tokenizer_and_match_it(
    tmp_path: Path, default_tokenizer_folder: Path, monkeypatch: pytest.MonkeyPatch, cache: Path
) -> None:
    folder = tmp_path / "tok"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json"):
        if (default_tokenizer_folder / name).is_file():
            shutil.copy(default_tokenizer_folder / name, folder / name)
    calls = Calls(monkeypatch, transformers.AutoTokenizer, "from_pretrained")
    first = config_cache.load_tokenizer(folder)
    later = config_cache.load_tokenizer(folder)
    assert calls.count == 1, "the second load must use the class AutoTokenizer picked"
    assert type(later) is type(first)
    for text in ("Hello world, 2+2=", " leading space", "naïve café 😀", "<|im_start|>user"):
        assert later.encode(text) == first.encode(text)
        assert later.decode(later.encode(text)) == first.decode(first.encode(text))
    chat = [{"role": "user", "content": "Hi!"}]
    assert later.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == (
        first.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    )
    assert later.eos_token_id == first.eos_token_id
    # The added tokens came from the cache entry, not from parsing tokenizer.json again.
    entry = json.loads(next((cache / "tokenizers").glob("*.json")).read_text())
    assert [t["content"] for t in entry["added_tokens"]][:3] == [
        "<|endoftext|>", "<|im_start|>", "<|im_end|>"
    ]  # fmt: skip
    assert {i: str(t) for i, t in later.added_tokens_decoder.items()} == {
        i: str(t) for i, t in first.added_tokens_decoder.items()
    }
    assert [t.special for t in later.added_tokens_decoder.values()] == [
        t.special for t in first.added_tokens_decoder.values()
    ]

    # A damaged list of added tokens costs only the speed-up.
    path = next((cache / "tokenizers").glob("*.json"))
    path.write_text(json.dumps({**entry, "added_tokens": [{"content": 3}, "junk"]}))
    damaged = config_cache.load_tokenizer(folder)
    assert damaged.encode("<|im_start|>user") == first.encode("<|im_start|>user")
    path.write_text("[1, 2]")  # not an entry at all: AutoTokenizer decides again
    assert config_cache.load_tokenizer(folder).encode("<|im_start|>") == first.encode(
        "<|im_start|>"
    )
    assert calls.count == 2
    path.write_text(json.dumps(entry))

    # An edited tokenizer.json is a new entry, whose added tokens are read afresh.
    tokens = json.loads((folder / "tokenizer.json").read_text())
    tokens["added_tokens"].append(
        {"id": len(first), "content": "<|tool|>", "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False, "special": True}
    )  # fmt: skip
    (folder / "tokenizer.json").write_text(json.dumps(tokens))
    assert config_cache.load_tokenizer(folder).encode("<|tool|>") == [len(first)]
    assert config_cache.load_tokenizer(folder).encode("<|tool|>") == [len(first)]
    assert calls.count == 3

    # Different tokenizer settings are a different entry: AutoTokenizer decides again.
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings["model_max_length"] = 4096
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    assert config_cache.load_tokenizer(folder).model_max_length == 4096
    assert calls.count == 4
