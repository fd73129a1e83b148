"""EAGLE and EAGLE-3 heads in the engine: the target's hidden states they read, lossless output
with random heads (full and reduced draft vocabularies), drafts that line up with the target's
features across chunked prefill, verify passes and retractions, and clear errors for heads that
do not fit."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers
from eagle_utils import save_eagle_head
from engine_utils import wait_idle, wait_until
from safetensors.torch import load_file, save_file

from llmconsole.core import Engine, EngineConfig, SamplingParams
from llmconsole.core.attention.torch_backend import TorchAttention
from llmconsole.core.config import ConfigError
from llmconsole.core.kv_cache import KVPool, KVPoolSpec, pages_needed
from llmconsole.core.model_loader import load_model
from llmconsole.core.models.config import ModelConfig
from llmconsole.core.request import Request
from llmconsole.core.runner import ModelRunner
from llmconsole.core.spec.eagle_head import eagle3_layers
from llmconsole.core.spec.speculator import load_eagle_head
from llmconsole.core.telemetry import RequestRecord, StepRecord, of_type

PROMPTS = [
    "Count from one to twenty in words: one, two, three, four,",
    "What is the capital of France?",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n",
    "Repeat the letter a forever: a a a a a a a a a a a a",
]


def greedy(max_tokens: int = 32) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def heads(tmp_path_factory: pytest.TempPathFactory, engine: Engine) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("heads")
    mc = engine.loaded.model_config
    return {
        "eagle": save_eagle_head(root / "eagle", mc, 1),
        "eagle3": save_eagle_head(root / "eagle3", mc, 3),
        "eagle3-reduced": save_eagle_head(root / "eagle3-reduced", mc, 3, draft_vocab=4096),
    }


@pytest.fixture(scope="module")
def reference(engine: Engine) -> list[list[int]]:
    return [r.token_ids for r in engine.generate(PROMPTS, greedy())]


def _verify_steps(engine: Engine) -> list[StepRecord]:
    return [s for s in of_type(engine.telemetry.snapshot(), StepRecord) if s.kind == "verify"]


@pytest.mark.parametrize("head", ["eagle", "eagle3", "eagle3-reduced"])
def test_random_heads_are_lossless(
    head: str, heads: dict[str, Path], reference: list[list[int]]
) -> None:
    algorithm = head.split("-")[0]
    cfg = EngineConfig(
        speculative_algorithm=algorithm.upper(),  # SGLang's spelling works too
        speculative_draft_model_path=str(heads[head]),
        speculative_num_steps=3,
        chunked_prefill_size=16,  # features arrive over several prefill chunks
    )
    with Engine(cfg) as eng:
        got = [r.token_ids for r in eng.generate(PROMPTS, greedy())]
        assert got == reference
        steps = _verify_steps(eng)
        # The head drafted for every request on every pass with room for drafts.
        assert sum(s.drafted_tokens for s in steps) >= 3 * len(PROMPTS) * 20
        sampled = eng.generate(
            PROMPTS[:2], SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, seed=5)
        )
        assert all(len(r.token_ids) == 24 for r in sampled)
        wait_idle(eng)
        eng.check_integrity()  # every page back in the pool


def _echo_head(folder: Path, mc: ModelConfig) -> Path:
    """An EAGLE head that passes the target's final hidden state straight through (fc = [0 | I],
    attention and MLP outputs zero), so the target's LM head re-scores the position the
    features came from: its first draft is the target's own last token, and so are the rest.
    Any misalignment between features and positions shows up as another token."""
    save_eagle_head(folder, mc, 1)
    weights = load_file(folder / "model.safetensors")
    h = mc.hidden_size
    weights["fc.weight"] = torch.cat([torch.zeros(h, h), torch.eye(h)], dim=1)
    weights["layers.0.self_attn.o_proj.weight"].zero_()
    weights["layers.0.mlp.down_proj.weight"].zero_()
    save_file(weights, str(folder / "model.safetensors"))
    return folder


PENDING: list[int] = []  # feature rows waiting on a request at each proposal (spied)


def _spy_on_drafts(eng: Engine) -> list[tuple[list[int], list[list[int]]]]:
    """Record (each request's last token, its drafts: a chain, or a tree's tokens) of every
    proposal; the real proposer runs."""
    draft = eng.spec.draft  # type: ignore[union-attr]
    calls: list[tuple[list[int], list[list[int]]]] = []

    def spying(real):
        def spy(reqs: list[Request], *args):
            last = [r.token_ids(r.num_tokens - 1, r.num_tokens)[0] for r in reqs]
            waiting = [r.draft_features.shape[0] for r in reqs if r.draft_features is not None]
            PENDING.append(max(waiting, default=0))
            result = real(reqs, *args)
            calls.append((last, result[0]))
            return result

        return spy

    draft.propose = spying(draft.propose)
    if hasattr(draft, "propose_tree"):
        draft.propose_tree = spying(draft.propose_tree)
    return calls


def test_drafts_line_up_with_the_targets_features(
    tmp_path: Path, engine: Engine, reference: list[list[int]]
) -> None:
    cfg = EngineConfig(
        speculative_algorithm="eagle",
        speculative_draft_model_path=str(_echo_head(tmp_path / "echo", engine.loaded.model_config)),
        speculative_num_steps=4,
        chunked_prefill_size=16,
        max_total_tokens=112,  # four requests outgrow the pool: retractions, re-prefill
        page_size=4,
    )
    with Engine(cfg) as eng:
        calls = _spy_on_drafts(eng)
        got = [r.token_ids for r in eng.generate(PROMPTS, greedy())]
        assert got == reference
        pairs = [(t, d) for last, drafts in calls for t, d in zip(last, drafts, strict=True) if d]
        assert len(pairs) > 40
        # Prompts' features are absorbed after each prefill chunk: at most the last verify
        # pass's kept positions (num-draft-tokens) wait for a proposal.
        assert 0 < max(PENDING[-len(calls) :]) <= 5
        assert all(d == [t] * len(d) for t, d in pairs)
        records = of_type(eng.telemetry.snapshot(), RequestRecord)[-len(PROMPTS) :]
        assert sum(r.retractions for r in records) > 0, "the test wants retractions"
        # "a a a a": repeating the last token is right there, so drafts get accepted; a chat
        # answer rarely repeats, so one batch holds different accept lengths.
        steps = _verify_steps(eng)
        assert sum(s.accepted_tokens for s in steps) > 10
        assert any(0 < s.accepted_per_position[0] < s.batch_size for s in steps)
        wait_idle(eng)
        eng.check_integrity()


def test_captured_features_are_the_hidden_states_transformers_reports(tmp_path: Path) -> None:
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path)
    loaded = load_model(EngineConfig(model=str(tmp_path)).resolve("cpu", 0.0))
    model = loaded.model
    layers = eagle3_layers(8)
    assert layers == (2, 4, 5)
    model.capture_features((*layers, 8))  # EAGLE-3's low / mid / high and EAGLE's final state
    ids = [1, 17, 42, 99, 5, 250, 3, 77, 12]
    pool = KVPool(KVPoolSpec(8, 2, 16, 4, 8, torch.float32), torch.device("cpu"))
    runner = ModelRunner(model, pool, TorchAttention(pool), torch.device("cpu"), 2, 32)
    req = Request("r", ids, SamplingParams(), 1)
    req.pages = list(range(1, 1 + pages_needed(len(ids), 4)))
    features = torch.empty(len(ids), 4 * 64)
    runner.run_tokens([(req, ids, 0)], [len(ids) - 1], features=features)
    with torch.no_grad():
        states = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states
    for k, layer in enumerate((*layers, 8)):
        torch.testing.assert_close(features[:, k * 64 : (k + 1) * 64], states[layer][0])


@pytest.fixture(scope="module")
def tiny_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An EAGLE-3 head sized for a hidden size of 64 (not the default model's)."""
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=49152,
    )
    folder = tmp_path_factory.mktemp("tiny-head")
    yield save_eagle_head(folder, ModelConfig.from_hf(cfg), 3)


def test_heads_that_do_not_fit_are_refused_clearly(
    engine: Engine, heads: dict[str, Path], tiny_head: Path, tmp_path: Path
) -> None:
    def load(algorithm: str, path: str | None) -> None:
        cfg = EngineConfig(speculative_algorithm=algorithm, speculative_draft_model_path=path)
        load_eagle_head(cfg.resolve("cpu", 0.0), engine.loaded)

    with pytest.raises(ConfigError, match="use --speculative-algorithm eagle3"):
        load("eagle", str(heads["eagle3"]))
    with pytest.raises(ConfigError, match="use --speculative-algorithm eagle$"):
        load("eagle3", str(heads["eagle"]))
    with pytest.raises(ConfigError, match="does not fit the target"):
        load("eagle3", str(tiny_head))
    with pytest.raises(ConfigError, match="no such folder"):
        load("eagle", str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        load("eagle", str(tmp_path / "empty"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((heads["eagle3"] / "config.json").read_text())
    weights = load_file(heads["eagle3"] / "model.safetensors")
    del weights["midlayer.mlp.down_proj.weight"]
    save_file(weights, str(broken / "model.safetensors"))
    with pytest.raises(ConfigError, match="missing 1 tensors"):
        load("eagle3", str(broken))
    with pytest.raises(ConfigError, match="needs --speculative-draft-model-path"):
        Engine(EngineConfig(speculative_algorithm="eagle3"))
    # The engine that served all along still serves.
    assert engine.generate(["Hi"], greedy(4))[0].token_ids


def test_restart_switches_between_eagle_and_plain_decoding(
    heads: dict[str, Path], reference: list[list[int]]
) -> None:
    with Engine(EngineConfig()) as eng:
        result = eng.restart(
            {
                "speculative_algorithm": "eagle3",
                "speculative_draft_model_path": str(heads["eagle3-reduced"]),
            }
        )
        assert result.mode == "rebuild"
        assert [r.token_ids for r in eng.generate(PROMPTS, greedy())] == reference
        assert sum(s.drafted_tokens for s in _verify_steps(eng)) > 0
        eng.restart({"speculative_algorithm": "none"})
        assert eng.loaded.model.feature_layers == ()  # the target stops capturing features
        assert [r.token_ids for r in eng.generate(PROMPTS, greedy())] == reference
        wait_idle(eng)
        eng.check_integrity()


def gpu_reference(
    tmp_path: Path, base: EngineConfig, prompts: list[list[int]], params: SamplingParams
) -> tuple[list[list[int]], Path]:
    """Plain decoding's tokens for `prompts` on `base` (a random model on the GPU), and an echo
    head for that model."""
    with Engine(base) as plain:
        expected = [r.token_ids for r in plain.generate(prompts, params)]
        mc = plain.loaded.model_config
    return expected, _echo_head(tmp_path / "echo", mc)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_eagle_verify_passes_read_features_from_decode_graphs(tmp_path: Path) -> None:
    prompts = [[1, *range(100 + 7 * i, 140 + 7 * i)] for i in range(6)]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    base = EngineConfig(
        model="smollm2-135m", load_format="dummy", dtype="float32", cuda_graph_max_bs=8
    )
    expected, echo = gpu_reference(tmp_path, base, prompts, params)
    cfg = base.replace(
        speculative_algorithm="eagle",
        speculative_draft_model_path=str(echo),
        speculative_eagle_topk=1,  # a chain: every draft repeats the last token
        speculative_num_steps=3,
    )
    with Engine(cfg) as eng:
        calls = _spy_on_drafts(eng)
        got = [r.token_ids for r in eng.generate(prompts, params)]
        steps = _verify_steps(eng)
        wait_idle(eng)
        eng.check_integrity()
    # fp32, the same kernels; a near-tie may still flip between bucket shapes.
    assert sum(g == e for g, e in zip(got, expected, strict=True)) >= 5
    assert all(s.cuda_graph for s in steps)
    pairs = [(t, d) for last, drafts in calls for t, d in zip(last, drafts, strict=True) if d]
    # Features read back from the graphs' buffer line up: the echo head redrafts the last token.
    assert len(pairs) > 50
    assert sum(d == [t] * len(d) for t, d in pairs) >= 0.95 * len(pairs)
    with Engine(base.replace(speculative_algorithm="eagle3", cuda_graph_max_bs=4)) as eng:
        got3 = [r.token_ids for r in eng.generate(prompts, params)]  # a random EAGLE-3 head
        steps = _verify_steps(eng)
        wait_idle(eng)
        eng.check_integrity()
    assert sum(g == e for g, e in zip(got3, expected, strict=True)) >= 5
    assert sum(s.drafted_tokens for s in steps) > 0
    assert any(s.cuda_graph for s in steps) and any(not s.cuda_graph for s in steps)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("topk", [1, 3])
def test_gpu_head_graphs_draft_what_eager_steps_draft(topk: int) -> None:
    """The head's draft steps replayed from its decode graphs propose the drafts its eager
    steps propose (a random EAGLE-3 head, fp32, the same target run both ways)."""
    prompts = [[1, *range(300 + 9 * i, 330 + 9 * i)] for i in range(5)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    cfg = EngineConfig(
        model="smollm2-135m",
        load_format="dummy",
        dtype="float32",
        cuda_graph_max_bs=8,
        speculative_algorithm="eagle3",
        speculative_num_steps=3,
        speculative_eagle_topk=topk,
        speculative_num_draft_tokens=4 if topk == 1 else 6,
    )
    drafted = []
    for disable in (False, True):
        with Engine(cfg.replace(disable_cuda_graph=disable)) as eng:
            assert (eng.spec.draft.graphs is None) == disable  # type: ignore[union-attr]
            calls = _spy_on_drafts(eng)
            eng.generate(prompts, params)
            drafted.append([d for _, drafts in calls for d in drafts])
    graph, eager = drafted
    assert len(graph) > 20
    same = sum(a == b for a, b in zip(graph, eager, strict=False))
    assert same >= 0.9 * min(len(graph), len(eager))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("topk", [1, 3])
def test_gpu_heads_draft_from_cached_prefixes_as_from_computed_ones(
    topk: int, tmp_path: Path
) -> None:
    """The CPU test above, on the GPU path: Triton kernels, the head's decode graphs. Requests
    that read a 60-token prefix from the radix cache (the head's KV included) draft what they
    draft when they compute it, and stay lossless."""
    shared = [1, *range(500, 559)]
    prompts = [[*shared, *range(900 + 11 * i, 910 + 11 * i)] for i in range(4)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    base = EngineConfig(
        model="smollm2-135m",
        load_format="dummy",
        dtype="float32",
        attention_backend="triton",
        cuda_graph_max_bs=8,
    )
    with Engine(base.replace(disable_radix_cache=True)) as plain:
        expected = [r.token_ids for r in plain.generate(prompts, params)]
        mc = plain.loaded.model_config
    # Large random weights: the head's attention, so its KV, weighs in every draft.
    head = save_eagle_head(tmp_path / "head", mc, 1, std=0.3)
    drafts: dict[bool, list[list[int]]] = {}
    for cached in (True, False):
        cfg = base.replace(**_eagle_over_cache(head, topk, cached))
        with Engine(cfg) as eng:
            got = [eng.generate([prompts[0]], params)[0]]  # computes (and caches) the prefix
            calls = _spy_on_drafts(eng)
            got += eng.generate(prompts[1:], params)
            # fp32 and the same kernels; a near-tie may still flip between batch shapes.
            assert sum(r.token_ids == e for r, e in zip(got, expected, strict=True)) >= 3
            # EAGLE computes the prefix's last page (one token) again.
            want_cached = len(shared) - 1 if cached else 0
            assert all(r.usage is not None for r in got)
            assert [r.usage.cached_tokens for r in got[1:]] == [want_cached] * 3  # type: ignore[union-attr]
            drafts[cached] = [d for _, ds in calls for d in ds]
            wait_idle(eng)
            eng.check_integrity()
    with_cache, without = drafts[True], drafts[False]
    assert len(with_cache) > 20
    same = sum(a == b for a, b in zip(with_cache, without, strict=False))
    assert same >= 0.9 * min(len(with_cache), len(without))


def test_a_heads_short_stated_context_does_not_limit_drafting(
    engine: Engine, heads: dict[str, Path], tmp_path: Path
) -> None:
    """EAGLE-3's published Llama-3.1 head states max_position_embeddings 2048: it drafts at the
    target's positions all the same (on a GPU its rope table must reach them)."""
    import json

    folder = tmp_path / "short"
    folder.mkdir()
    config = json.loads((heads["eagle3"] / "config.json").read_text())
    config["max_position_embeddings"] = 64
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes((heads["eagle3"] / "model.safetensors").read_bytes())
    cfg = EngineConfig(speculative_algorithm="eagle3", speculative_draft_model_path=str(folder))
    head = load_eagle_head(cfg.resolve("cpu", 0.0), engine.loaded)
    target = engine.loaded.model_config.max_position_embeddings
    assert head.config.max_position_embeddings == target > 64


def test_heads_load_from_pytorch_model_bin(
    engine: Engine, heads: dict[str, Path], tmp_path: Path
) -> None:
    """SafeAILab publishes its heads as pytorch_model.bin: the same tensors load the same."""
    for name in ("eagle", "eagle3-reduced"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text((heads[name] / "config.json").read_text())
        torch.save(load_file(heads[name] / "model.safetensors"), folder / "pytorch_model.bin")
        algorithm = name.split("-")[0]

        def load(path: Path, algorithm: str = algorithm):
            cfg = EngineConfig(
                speculative_algorithm=algorithm, speculative_draft_model_path=str(path)
            )
            return load_eagle_head(cfg.resolve("cpu", 0.0), engine.loaded)

        a, b = load(heads[name]), load(folder)
        for (key, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert torch.equal(x, y), key
        if a.hot_ids is not None:
            assert torch.equal(a.hot_ids, b.hot_ids)  # type: ignore[arg-type]
    # An EAGLE-3 head saved with `layers.0.` names and a `model.` prefix (other trainers).
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    (renamed / "config.json").write_text((heads["eagle3"] / "config.json").read_text())
    weights = load_file(heads["eagle3"] / "model.safetensors")
    save_file(
        {"model." + k.replace("midlayer.", "layers.0."): v for k, v in weights.items()},
        str(renamed / "model.safetensors"),
    )
    cfg = EngineConfig(speculative_algorithm="eagle3", speculative_draft_model_path=str(renamed))
    head = load_eagle_head(cfg.resolve("cpu", 0.0), engine.loaded)
    assert torch.equal(
        head.self_attn.qkv_proj.weight, load(heads["eagle3"], "eagle3").self_attn.qkv_proj.weight
    )


def test_running_requests_keep_drafting_across_a_restart_that_keeps_the_head(
    tmp_path: Path, engine: Engine
) -> None:
    """Retuning the draft shape under load (what the console's flags editor does) keeps the
    head's KV and each request's waiting features: requests in flight draft on, aligned."""
    prompts = PROMPTS[:2]
    long = SamplingParams(max_tokens=96, temperature=0, ignore_eos=True)
    expected = [r.token_ids for r in engine.generate(prompts, long)]
    cfg = EngineConfig(
        speculative_algorithm="eagle",
        speculative_draft_model_path=str(_echo_head(tmp_path / "echo", engine.loaded.model_config)),
        speculative_num_steps=4,
    )
    with Engine(cfg) as eng:
        handles = [eng.submit(p, long) for p in prompts]
        assert wait_until(lambda: eng.stats()["running"] == 2 and min(
            len(r.output_ids) for r in eng._requests.values()) >= 8)  # fmt: skip
        result = eng.restart({"speculative_num_steps": 2, "speculative_eagle_topk": 2})
        assert result.kv_kept
        calls = _spy_on_drafts(eng)
        got = [[t for d in h for t in d.token_ids] for h in handles]
        wait_idle(eng)
        eng.check_integrity()
    assert got == expected
    in_flight = [d for _, drafts in calls for d in drafts if d]
    assert len(in_flight) > 10, "the requests in flight stopped drafting after the restart"
    # A tree now (topk 2): its first token is the best candidate, the last token again.
    assert all(d[0] == t for last, drafts in calls for t, d in zip(last, drafts, strict=True) if d)


SYSTEM = {
    "role": "system",
    "content": "You are a careful assistant at a workshop on serving language models. "
    "Answer briefly, plainly and without lists.",
}


def _eagle_over_cache(head: Path, topk: int, cached: bool) -> dict[str, object]:
    """EAGLE settings for the cached-prefix tests: a chain (topk 1) or a tree, cache on or off."""
    return {
        "speculative_algorithm": "eagle",
        "speculative_draft_model_path": str(head),
        "speculative_num_steps": 3,
        "speculative_eagle_topk": topk,
        "speculative_num_draft_tokens": 4 if topk == 1 else 6,
        "disable_radix_cache": not cached,
    }


@pytest.mark.parametrize("topk", [1, 2])
def test_heads_draft_from_cached_prefixes_as_from_computed_ones(
    topk: int, tmp_path: Path, engine: Engine
) -> None:
    """The radix cache stays on under EAGLE (SGLang's default): the head's KV sits in the
    target's pages, so a request whose prompt starts with a cached prefix reads the head's KV
    there too, and computes the prefix's last page again (the head's KV at a position also saw
    the token after it). Its drafts are then the ones it drafts with nothing cached, and the
    output stays the target's."""
    first, second = (
        engine.apply_chat_template([SYSTEM, {"role": "user", "content": q}])
        for q in ("What is the capital of France?", "Name three colors of the rainbow.")
    )
    expected = [r.token_ids for r in engine.generate([first, second], greedy(24))]
    # Large random weights: the head's attention, so its KV, weighs in every draft.
    head = save_eagle_head(tmp_path / "head", engine.loaded.model_config, 1, std=0.3)
    drafts: dict[bool, list[tuple[list[int], list[list[int]]]]] = {}
    for cached in (True, False):
        cfg = EngineConfig(**_eagle_over_cache(head, topk, cached))
        with Engine(cfg) as eng:
            assert eng.config.prefix_cache is cached
            a = eng.generate([first], greedy(24))[0]
            calls = _spy_on_drafts(eng)
            b = eng.generate([second], greedy(24))[0]
            assert [a.token_ids, b.token_ids] == expected
            assert b.usage is not None
            if cached:  # the template's system turn, less the page (one token) computed again
                common = next(i for i in range(len(first)) if first[i] != second[i])
                assert common > 20 and b.usage.cached_tokens == common - 1
            drafts[cached] = calls
            wait_idle(eng)
            eng.check_integrity()
    assert sum(len(d) for _, ds in drafts[True] for d in ds) >= 20  # it kept drafting
    assert drafts[True] == drafts[False]
