"""How big the KV pool is: a token budget on CPU, a share of GPU memory on CUDA (SGLang's
--mem-fraction-static: weights + KV may use that fraction of the card)."""

from __future__ import annotations

import torch

from .config import EngineConfig
from .kv_cache import KV_CACHE_DTYPES, KVPoolSpec
from .model_loader import LoadedModel


def kv_pool_spec(
    config: EngineConfig, loaded: LoadedModel, extra_bytes_per_page: int = 0
) -> KVPoolSpec:
    """`extra_bytes_per_page`: memory that every page of this pool costs elsewhere (a draft
    model's KV pool has as many pages), shared out of the GPU budget."""
    mc = loaded.model_config
    common = dict(
        num_layers=mc.num_layers,
        num_kv_heads=mc.num_kv_heads,
        head_dim=mc.head_dim,
        page_size=config.page_size,
        dtype=KV_CACHE_DTYPES.get(config.kv_cache_dtype, loaded.dtype),
    )
    if loaded.device.type != "cuda" or config.max_total_tokens is not None:
        return KVPoolSpec.for_budget(**common, max_tokens=config.max_total_tokens)
    free, total = torch.cuda.mem_get_info(loaded.device)
    fraction = config.mem_fraction_static or 0.88
    used = total - free
    budget = int(total * fraction) - used
    if budget <= 0:
        raise ValueError(
            f"--mem-fraction-static {fraction} leaves no room for the KV cache: "
            f"{used / 2**30:.1f} GiB of {total / 2**30:.1f} GiB is already in use"
        )
    if extra_bytes_per_page:
        own = KVPoolSpec.for_budget(**common, max_tokens=config.page_size).bytes_per_page
        budget = budget * own // (own + extra_bytes_per_page)
    return KVPoolSpec.for_budget(**common, max_bytes=budget)
