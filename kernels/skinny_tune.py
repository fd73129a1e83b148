"""Measure skinny GEMM launch shapes against cuBLAS on this card (`llmconsole bench tune-gemm`).

For each of a model's decode products (qkv, o, gate_up, down, LM head; gate_up also with
SiLU-and-mul fused) and each row count asked for, every candidate shape is timed in a CUDA graph
of back-to-back calls that cycle through distinct copies of the weight (so none is served from
L2, as in a decode step, which reads each weight once), against the path the engine takes
without it: cuBLAS (then the SiLU-and-mul kernel, for the fused op). The fastest candidate is
kept only if it beats that by `margin` and its product matches cuBLAS's within bf16 rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import triton

from . import skinny_gemm as sg
from .skinny_table import SkinnyConfig, TunedEntry

BLOCK_NS = (64, 128, 256)
BLOCK_KS = (64, 128)
WARPS = (4, 8)
STAGES = (3, 4)
MAX_ACC_PER_THREAD = 128  # fp32 accumulators per thread; more spills registers
MIN_CHUNKS_PER_SLICE = 2  # a K slice walks at least this many BLOCK_K chunks
L2_COPIES_BYTES = 4 * 50 * 2**20  # weight copies cycled per graph: well past an H100's 50 MB L2


@dataclass(frozen=True)
class Product:
    name: str  # qkv, o, gate_up, down, lm_head
    op: str  # "gemm" | "silu_mul" (kernels/skinny_table.py OPS)
    n: int  # weight rows (silu_mul: gate and up rows together)
    k: int


@dataclass(frozen=True)
class Measured:
    product: Product
    rows: int
    baseline_us: float  # cuBLAS (+ SiLU-and-mul kernel)
    best: SkinnyConfig | None  # None: no candidate ran
    best_us: float
    kept: bool  # beat the baseline by the margin and matched its values


def row_ranges(rows: Iterable[int]) -> list[tuple[int, int]]:
    """(min, max) rows each tuned count stands for: from just above the previous count (or the
    built-in rules' last row) up to itself."""
    ordered = sorted(set(rows))
    if not ordered or ordered[0] < sg.MIN_ROWS:
        raise ValueError(f"rows must be at least {sg.MIN_ROWS}, got {ordered}")
    ranges, low = [], sg.MAX_ROWS + 1 if ordered[0] > sg.MAX_ROWS else sg.MIN_ROWS
    for r in ordered:
        ranges.append((low, r))
        low = r + 1
    return ranges


def splits_for(tiles: int, k: int, block_k: int, num_sms: int) -> tuple[int, ...]:
    """K slice counts worth timing: none when the tiles alone fill the SMs; else the fewest
    slices that reach one and two programs per SM, each slice at least a few K chunks long."""
    if tiles >= num_sms:
        return (1,)
    most = max(1, k // (block_k * MIN_CHUNKS_PER_SLICE))
    out = {min(most, -(-num_sms * waves // tiles)) for waves in (1, 2)}
    return tuple(sorted(out))


def candidates(
    op: str, rows: int, n: int, k: int, num_sms: int, smem_bytes: int
) -> list[SkinnyConfig]:
    """Launch shapes for x [rows, k] W [n, k]^T that fit the card's shared memory and registers."""
    silu = op == "silu_mul"
    cols = n // 2 if silu else n  # output columns
    block_m = min(256, max(16, triton.next_power_of_2(rows)))
    out = []
    for block_n in BLOCK_NS:
        for block_k in BLOCK_KS:
            if block_k > max(16, triton.next_power_of_2(k)):
                continue
            w_rows = block_n * (2 if silu else 1)
            tiles = triton.cdiv(cols, block_n) * triton.cdiv(rows, block_m)
            for warps in WARPS:
                if block_m * w_rows > MAX_ACC_PER_THREAD * warps * 32:
                    continue
                for stages in STAGES:
                    if stages * (block_m + w_rows) * block_k * 2 > smem_bytes:
                        continue
                    for split in (1,) if silu else splits_for(tiles, k, block_k, num_sms):
                        out.append(SkinnyConfig(block_m, block_n, block_k, warps, stages, split))
    return out


def _card_limits(device: torch.device) -> tuple[int, int]:
    """(SMs, shared memory a block may opt into, in bytes) of the card."""
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count, int(
        getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024
    )


def graph_us(fn: Callable[[int], None], calls: int, repeats: int = 5) -> float:
    """Median µs per call of `fn(i)` for i in range(calls), captured in one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(calls):  # warm-up outside the graph: compiles, allocates
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return sorted(times)[len(times) // 2]


def _weights(p: Product, device: torch.device, gen: torch.Generator) -> list[torch.Tensor]:
    nbytes = p.n * p.k * 2
    copies = max(2, min(16, -(-L2_COPIES_BYTES // nbytes)))
    return [
        torch.randn(p.n, p.k, device=device, dtype=torch.bfloat16, generator=gen) * 0.02
        for _ in range(copies)
    ]


def wins(us: float, baseline_us: float, margin: float) -> bool:
    """Whether ours at `us` is worth a table entry: at least `margin` faster than the baseline."""
    return us <= (1 - margin) * baseline_us


def matches(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Same product within bf16 rounding (largest error under 2% of the largest value)."""
    scale = want.float().abs().max().clamp_min(1e-6)
    return bool(((got.float() - want.float()).abs().max() / scale) < 2e-2)


def measure(
    p: Product,
    rows: int,
    device: torch.device,
    margin: float,
    calls: int = 12,
    on_candidate: Callable[[], None] | None = None,
) -> Measured:
    """Time `p` at `rows` rows: the baseline, then every candidate shape."""
    from . import activation

    gen = torch.Generator(device=device).manual_seed(0)
    ws = _weights(p, device, gen)
    x = torch.randn(rows, p.k, device=device, dtype=torch.bfloat16, generator=gen)
    silu = p.op == "silu_mul"
    full = torch.empty(rows, p.n, device=device, dtype=torch.bfloat16)
    out = torch.empty(rows, p.n // 2 if silu else p.n, device=device, dtype=torch.bfloat16)

    def baseline(i: int) -> None:
        if silu:
            torch.mm(x, ws[i % len(ws)].t(), out=full)
            activation.silu_and_mul(full, out=out)
        else:
            torch.mm(x, ws[i % len(ws)].t(), out=out)

    baseline_us = graph_us(baseline, calls)
    baseline(0)
    want = out.clone()
    best: SkinnyConfig | None = None
    best_us = float("inf")
    for cfg in candidates(p.op, rows, p.n, p.k, *_card_limits(device)):
        launch = _launcher(silu, x, ws, out, cfg)
        try:
            us = graph_us(launch, calls)
        except Exception:  # noqa: BLE001 - a shape the compiler or the card rejects: skip it
            torch.cuda.synchronize()
            continue
        finally:
            if on_candidate is not None:
                on_candidate()
        if us < best_us:
            best, best_us = cfg, us
    kept = False
    if best is not None and wins(best_us, baseline_us, margin):
        _launcher(silu, x, ws, out, best)(0)
        kept = matches(out, want)
    return Measured(p, rows, baseline_us, best, best_us, kept)


def _launcher(
    silu: bool, x: torch.Tensor, ws: list[torch.Tensor], out: torch.Tensor, cfg: SkinnyConfig
) -> Callable[[int], None]:
    def launch(i: int) -> None:
        w = ws[i % len(ws)]
        if silu:
            sg.skinny_gemm_silu_mul(x, w, out=out, config=cfg)
        else:
            sg.skinny_gemm(x, w, out=out, config=cfg)

    return launch


def count_candidates(products: Iterable[Product], rows: Iterable[int], device: torch.device) -> int:
    """How many shapes `tune` will time (for a progress bar)."""
    limits = _card_limits(device)
    return sum(len(candidates(p.op, r, p.n, p.k, *limits)) for p in products for r in rows)


def tune(
    products: Iterable[Product],
    rows: Iterable[int],
    device: torch.device,
    margin: float = 0.03,
    on_candidate: Callable[[], None] | None = None,
) -> Iterator[tuple[Measured, TunedEntry | None]]:
    """Measure every product at every row count; yields each measurement and, where ours won,
    the table entry for its row range."""
    for low, high in row_ranges(rows):
        for p in products:
            m = measure(p, high, device, margin, on_candidate=on_candidate)
            entry = None
            if m.kept and m.best is not None:
                entry = TunedEntry(
                    p.op, p.n, p.k, low, high, m.best, round(m.best_us, 2), round(m.baseline_us, 2)
                )
            yield m, entry
            torch.cuda.empty_cache()
