"""Tree drafting (--speculative-eagle-topk > 1): the pure tree functions, the walk's
losslessness for sampled requests, and EAGLE trees in the engine (greedy output unchanged,
accepted side branches whose KV moves into place, pages, CUDA graphs)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from eagle_utils import count_kv_moves
from engine_utils import wait_idle
from test_spec_eagle import PROMPTS, _echo_head, _verify_steps, gpu_reference, greedy

from llmconsole.core import Engine, EngineConfig, SamplingParams
from llmconsole.core.config import ConfigError
from llmconsole.core.spec.tree import Candidate, ancestors, select_tree, tree_depths, walk_tree


def test_select_tree_keeps_the_best_paths_within_budget_and_depth() -> None:
    c = [
        Candidate(-0.1, 10, -1, 1),  # 0
        Candidate(-0.5, 11, -1, 1),  # 1
        Candidate(-0.2, 20, 0, 2),  # 2: child of 0
        Candidate(-0.3, 21, 1, 2),  # 3: child of 1, but scored above its parent (a tie-breaker)
        Candidate(-0.25, 30, 2, 3),  # 4: grandchild of 0
    ]
    tokens, parents = select_tree(c, budget=4, max_depth=3)
    # 3 is skipped while 1 is not in; 1 then comes in after 4.
    assert tokens == [10, 20, 30, 11]
    assert parents == [0, 1, 2, 0]
    assert tree_depths(parents) == [0, 1, 2, 3, 1]
    assert ancestors(parents, 3) == [0, 1, 2]
    assert ancestors(parents, 4) == [0]
    assert select_tree(c, budget=2, max_depth=3) == ([10, 20], [0, 1])
    assert select_tree(c, budget=5, max_depth=1) == ([10, 11], [0, 0])


def test_walk_tree_follows_the_targets_picks() -> None:
    #        root
    #       /    \
    #     5(1)   7(2)
    #     |      |
    #     6(3)   8(4)
    tokens, parents = [5, 7, 6, 8], [0, 0, 1, 2]
    assert walk_tree(tokens, parents, [7, 0, 8, 0, 9]) == ([2, 4], 9)
    assert walk_tree(tokens, parents, [5, 6, 0, 1, 0]) == ([1, 3], 1)
    assert walk_tree(tokens, parents, [5, 2, 0, 0, 0]) == ([1], 2)
    assert walk_tree(tokens, parents, [3, 0, 0, 0, 0]) == ([], 3)
    assert walk_tree([], [], [4]) == ([], 4)


def test_walking_a_tree_with_target_draws_is_lossless() -> None:
    """Two tokens from a toy target (p1, then p2 given the first) through a fixed tree, picks
    drawn from the target at every node, and the next step's draw when the walk stops after one
    token: the pairs follow p1 x p2 whatever the tree holds."""
    gen = torch.Generator().manual_seed(0)
    vocab = 4
    p1 = torch.tensor([0.5, 0.3, 0.15, 0.05])
    p2 = torch.softmax(torch.randn(vocab, vocab, generator=gen), dim=-1)  # [first, second]
    tokens, parents = [1, 0, 2, 3], [0, 0, 1, 2]  # root -> 1 -> 2, root -> 0 -> 3
    n = 40000
    firsts = torch.multinomial(p1, n, replacement=True, generator=gen).tolist()
    counts: Counter[tuple[int, int]] = Counter()
    for first in firsts:
        picks = [first]
        for node_token in tokens:  # node j's pick: a draw given the path to it
            picks.append(int(torch.multinomial(p2[node_token], 1, generator=gen)))
        path, bonus = walk_tree(tokens, parents, picks)
        emitted = [tokens[j - 1] for j in path] + [bonus]
        if len(emitted) == 1:  # the next step draws the second token
            emitted.append(int(torch.multinomial(p2[emitted[0]], 1, generator=gen)))
        counts[(emitted[0], emitted[1])] += 1
    expected = p1[:, None] * p2  # [first, second]
    for a in range(vocab):
        for b in range(vocab):
            p = float(expected[a, b])
            sd = (p * (1 - p) / n) ** 0.5
            assert abs(counts[(a, b)] / n - p) < 5 * sd + 1e-4, (a, b)


def test_tree_flags_are_checked() -> None:
    with pytest.raises(ConfigError, match="works with eagle and eagle3"):
        Engine(EngineConfig(speculative_algorithm="ngram", speculative_eagle_topk=2))
    with pytest.raises(ConfigError, match="verifies 2 to 7 tokens"):
        Engine(
            EngineConfig(
                speculative_algorithm="eagle",
                load_format="dummy",
                model="smollm2-135m",
                speculative_eagle_topk=2,
                speculative_num_steps=3,
                speculative_num_draft_tokens=9,
            )
        )


@pytest.fixture(scope="module")
def reference(engine: Engine) -> list[list[int]]:
    return [r.token_ids for r in engine.generate(PROMPTS, greedy())]


def test_trees_are_lossless_and_accept_side_branches(
    tmp_path: Path, engine: Engine, reference: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    moved = count_kv_moves(monkeypatch)
    cfg = EngineConfig(
        speculative_algorithm="eagle",
        # The echo head's children of every node are the target's top 3 at the position
        # before: the repeat of the last token and its runners-up, so a side branch sometimes
        # holds the target's next token.
        speculative_draft_model_path=str(_echo_head(tmp_path / "echo", engine.loaded.model_config)),
        speculative_eagle_topk=3,
        speculative_num_steps=3,
        speculative_num_draft_tokens=6,
        chunked_prefill_size=16,
        max_total_tokens=144,  # retractions mid-tree
        page_size=4,
    )
    with Engine(cfg) as eng:
        got = [r.token_ids for r in eng.generate(PROMPTS, greedy())]
        steps = _verify_steps(eng)
        with_lp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=2)
        plain_lp = engine.generate([PROMPTS[3]], with_lp)[0]
        tree_lp = eng.generate([PROMPTS[3]], with_lp)[0]
        wait_idle(eng)
        eng.check_integrity()
    assert got == reference
    assert all(s.drafted_tokens <= 5 * s.batch_size for s in steps)
    # Acceptance per draft position goes as deep as the tree (3 levels), not as wide.
    assert max(len(s.accepted_per_position) for s in steps) == 3
    assert sum(s.accepted_tokens for s in steps) > 10
    assert sum(moved) > 0, "no side branch was accepted: the KV move went untested"
    assert tree_lp.token_ids == plain_lp.token_ids
    for a, b in zip(tree_lp.logprobs, plain_lp.logprobs, strict=True):
        assert a.token_id == b.token_id
        assert a.logprob == pytest.approx(b.logprob, abs=1e-3)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_random_eagle3_trees_are_lossless_for_greedy_and_run_sampled(
    engine: Engine, reference: list[list[int]], tmp_path: Path
) -> None:
    from eagle_utils import save_eagle_head

    head = save_eagle_head(tmp_path / "h3", engine.loaded.model_config, 3, draft_vocab=4096)
    cfg = EngineConfig(
        speculative_algorithm="eagle3",
        speculative_draft_model_path=str(head),
        speculative_eagle_topk=2,
        speculative_num_steps=4,  # num_draft_tokens auto: min(topk * steps + 1, 64) = 9
    )
    with Engine(cfg) as eng:
        assert eng.config.speculative_num_draft_tokens == 9
        assert [r.token_ids for r in eng.generate(PROMPTS, greedy())] == reference
        drawn = eng.generate(
            PROMPTS, SamplingParams(max_tokens=20, temperature=0.9, seed=7, ignore_eos=True)
        )
        again = eng.generate(
            PROMPTS, SamplingParams(max_tokens=20, temperature=0.9, seed=7, ignore_eos=True)
        )
        assert [r.token_ids for r in drawn] == [r.token_ids for r in again]  # seeded
        wait_idle(eng)
        eng.check_integrity()


def test_bench_spec_sweeps_topk_and_draft_tokens(tmp_path: Path, engine: Engine) -> None:
    import json

    from typer.testing import CliRunner

    from llmconsole.console import cli

    if not any(c.name == "spec" for c in cli.bench_app.registered_commands):
        cli._register_bench()
    head = _echo_head(tmp_path / "echo", engine.loaded.model_config)
    out = tmp_path / "sweep.jsonl"
    args = ["bench", "spec", "--algorithm", "eagle", "--speculative-draft-model-path", str(head)]
    args += ["--num-prompts", "2", "--batch-size", "2", "--num-steps", "2", "--max-tokens", "8"]
    args += ["--topk", "1", "--topk", "2", "--num-draft-tokens", "4", "--num-draft-tokens", "9"]
    args += ["--output-file", str(out)]
    result = CliRunner().invoke(cli.app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # 9 draft tokens do not fit a topk-2, 2-step tree (at most 5): skipped.
    got = [(r["num_steps"], r["topk"], r["num_draft_tokens"]) for r in rows]
    assert got == [(0, 0, 0), (2, 1, 3), (2, 2, 4)]
    assert all(r["output_tokens"] == 2 * 8 for r in rows)
    assert rows[2]["algorithm"] == "eagle" and rows[2]["accept_length"] >= 1.0
    bad = CliRunner().invoke(cli.app, ["bench", "spec", "--algorithm", "ngram", "--topk", "2"])
    assert bad.exit_code != 0 and "drafts chains" in str(bad.exception or bad.output)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    ("dtype", "backend", "topk", "draft_tokens", "must_match"),
    [
        # fp32 and the same kernels: a near-tie may still flip between bucket shapes.
        ("float32", "triton", 4, 8, 5),
        # bf16: near-ties flip more often between batch shapes.
        ("bfloat16", "flashinfer", 2, 6, 4),
    ],
)
def test_gpu_tree_verify_replays_decode_graphs(
    tmp_path: Path, dtype: str, backend: str, topk: int, draft_tokens: int, must_match: int
) -> None:
    if backend == "flashinfer":
        pytest.importorskip("flashinfer")
    prompts = [[1, *range(100 + 7 * i, 140 + 7 * i)] for i in range(6)]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    base = EngineConfig(
        model="smollm2-135m",
        load_format="dummy",
        dtype=dtype,
        attention_backend=backend,
        cuda_graph_max_bs=8,
    )
    expected, echo = gpu_reference(tmp_path, base, prompts, params)
    cfg = base.replace(
        speculative_algorithm="eagle",
        speculative_draft_model_path=str(echo),
        speculative_eagle_topk=topk,
        speculative_num_steps=3,
        speculative_num_draft_tokens=draft_tokens,
    )
    with Engine(cfg) as eng:
        got = [r.token_ids for r in eng.generate(prompts, params)]
        steps = _verify_steps(eng)
        wait_idle(eng)
        eng.check_integrity()
    assert sum(g == e for g, e in zip(got, expected, strict=True)) >= must_match
    # 6 requests x at most draft_tokens rows fit the graphs' 8 x draft_tokens rows.
    assert all(s.cuda_graph for s in steps)
    assert sum(s.drafted_tokens for s in steps) > 0


def test_console_speculative_panel_names_the_draft_shape() -> None:
    from llmconsole.console.state import SpecStats
    from llmconsole.console.widgets.spec_panel import spec_shape, spec_text

    tree = {
        "speculative_num_steps": 5,
        "speculative_eagle_topk": 4,
        "speculative_num_draft_tokens": 8,
    }
    chain = {
        "speculative_num_steps": 3,
        "speculative_eagle_topk": 1,
        "speculative_num_draft_tokens": 4,
    }
    assert spec_shape(tree) == "tree 5 steps x topk 4, 8 tokens"
    assert spec_shape(chain) == "chain of 3 drafts"
    stats = SpecStats(
        verify_steps=2, forward_passes=4, drafted=28, accepted=6, per_position=[3, 2, 1]
    )
    text = spec_text("eagle3", stats, spec_shape(tree)).plain
    assert "eagle3 (tree 5 steps x topk 4, 8 tokens)" in text
    assert "accept length 2.50" in text and "1:75%" in text
    assert spec_text("none", stats, spec_shape(tree)).plain.startswith("speculative off")
