"""One decode batch run through an engine's runner both from its CUDA graph and eagerly: what
the graph-replay tests of every backend compare."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmconsole.core import Engine, SamplingParams
from llmconsole.core.request import Request
from llmconsole.core.runner import StepOutput
from llmconsole.core.scheduler import ScheduledBatch, Scheduler


@dataclass(frozen=True)
class BothWays:
    graph: StepOutput
    eager: StepOutput
    graph_logits: torch.Tensor  # [B, vocab] fp32
    eager_logits: torch.Tensor


def decode_both_ways(engine: Engine, prompts: list[list[int]], tag: str) -> BothWays:
    """Prefill `prompts` on a scheduler of the engine's own pool (its loop must be idle), then
    run their first decode batch from the graph and eagerly (the KV writes are idempotent),
    recording the logits each way; the requests' pages are given back either way."""
    runner = engine.runner
    scheduler = Scheduler(engine.allocator, engine.pool.page_size, 64, 8192)
    params = SamplingParams(max_tokens=8, temperature=0)
    reqs = [Request(f"{tag}-{i}", p, params, 8) for i, p in enumerate(prompts)]
    for req in reqs:
        scheduler.add(req)
    captured: list[torch.Tensor] = []
    sample = runner._sample

    def spy(b: ScheduledBatch, logits: torch.Tensor, *args):  # type: ignore[no-untyped-def]
        captured.append(logits.float().clone())
        return sample(b, logits, *args)

    try:
        step = scheduler.schedule()
        while step is not None and step.kind == "prefill":
            out = runner.forward(step)
            for chunk, token in zip(step.chunks, out.tokens, strict=True):
                chunk.req.num_computed = chunk.end
                if token is not None:
                    chunk.req.output_ids.append(token)
            step = scheduler.schedule()
        assert step is not None and step.kind == "decode" and step.batch_size == len(prompts)
        runner._sample = spy  # type: ignore[method-assign]
        graph = runner.forward(step, use_cuda_graph=True)
        eager = runner.forward(step, use_cuda_graph=False)
    finally:
        runner.__dict__.pop("_sample", None)
        for req in reqs:
            scheduler.finish(req)
    graph_logits, eager_logits = captured
    return BothWays(graph, eager, graph_logits, eager_logits)
