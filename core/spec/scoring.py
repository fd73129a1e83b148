"""What both verify passes (chain_verify.py, tree_verify.py) do with the target's logits: score
every verified position under its request's sampling parameters, and turn the host copy of the
top log-probs into each emitted token's TokenLogprob."""

from __future__ import annotations

import torch

from ..request import Request
from ..runner import ModelRunner, TokenLogprob
from ..sampling import SamplingBatch, penalised
from ..transfer import int64_to_device

TopLogprobs = list[list]  # host lists of top_logprobs(): chosen [R], top lp [R][N], top ids [R][N]


def position_scores(
    runner: ModelRunner,
    reqs: list[Request],
    width: int,
    logits: torch.Tensor,  # [>= B * width, V]: request b's positions in rows b * width + j
) -> tuple[SamplingBatch, torch.Tensor]:  # the expanded batch, scores [B * width, V] fp32
    """Every position of a request is scored with that request's sampling parameters. Requests
    with penalties never get drafts (their later positions would need the drafts counted as
    output), so one set of output ids per request is exact."""
    expand = [b for b in range(len(reqs)) for _ in range(width)]
    sampling = SamplingBatch.build(
        [reqs[b].params for b in expand],
        [reqs[b].prompt_ids for b in expand],
        [reqs[b].output_ids for b in expand],
        [None] * len(expand),
        runner.vocab_size,
        runner.device,
    )
    return sampling, penalised(logits[: len(expand)].float(), sampling)


def kept_features(
    features: torch.Tensor | None,  # [>= rows, F], possibly a CUDA graph's reused buffer
    rows: list[list[int]],  # per chunk, the rows of its kept positions
) -> tuple[torch.Tensor, ...]:
    """Each chunk's kept features ([len(rows[c]), F]) gathered by one copy (so they outlive
    the buffer) and split into per-chunk views of it; () when no features were captured."""
    if features is None:
        return ()
    flat = [r for chunk in rows for r in chunk]
    index = int64_to_device(flat, features.device)
    return features.index_select(0, index).split([len(chunk) for chunk in rows])


def row_logprobs(
    lp_host: TopLogprobs | None, rows: list[int], tokens: tuple[int, ...], top_n: int | None
) -> tuple[TokenLogprob | None, ...]:
    """Logprobs of `tokens`, emitted from score rows `rows` (None each when not asked for)."""
    if lp_host is None or top_n is None:
        return (None,) * len(tokens)
    chosen, top_lp, top_ids = lp_host
    return tuple(
        TokenLogprob(
            token, chosen[r], tuple(zip(top_ids[r][:top_n], top_lp[r][:top_n], strict=True))
        )
        for r, token in zip(rows, tokens, strict=True)
    )
