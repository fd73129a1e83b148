"""fp32 products with weights kept in GGUF's 32-weight blocks, on the CPU (`cpu_blocks.c`).

A GGUF checkpoint's weights are blocks of 4- or 8-bit values with fp16 scales. Dequantized to
fp32 (what the engine's model holds) they are 4-6x the bytes, and a decode step, which reads
every weight once for a few rows of activations, is bound by those bytes: on the 2-core CPU box
one row took ~40 ms for the default model's fp32 projections and ~10 ms from its blocks. The C
kernel dequantizes each block in registers to exactly the fp32 values gguf's reference gives
and multiplies in fp32, so only the order of the sums differs from a BLAS product.

The sources (this kernel's, `cpu_attention.c` and `cpu_elementwise.c`: one library) are
compiled once per machine with the system C compiler (`$CC`, else cc / gcc / clang; -O3
-march=native -fopenmp) into a cache folder the caller names, and loaded with ctypes. Built
with -fopenmp it uses the OpenMP runtime already in the process (torch's libgomp, same soname),
so its threads are torch's. Without a compiler, or when the build fails, `library()` returns
None and `unavailable_reason()` says why; callers keep fp32 weights and torch's attention.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

KINDS = {"q4_0": 0, "q4_1": 1, "q8_0": 2}
BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q8_0": 34}
BLOCK_WEIGHTS = 32
_SOURCES = tuple(
    Path(__file__).with_name(n) for n in ("cpu_blocks.c", "cpu_attention.c", "cpu_elementwise.c")
)
_HEADERS = (Path(__file__).with_name("cpu_vec.h"),)
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
_reason: list[str] = []
_lock = threading.Lock()


def row_bytes(kind: str, in_features: int) -> int:
    """Bytes of one weight row of `in_features` in blocks of `kind`."""
    if in_features % BLOCK_WEIGHTS:
        raise ValueError(
            f"{kind} rows hold multiples of {BLOCK_WEIGHTS} weights, not {in_features}"
        )
    return in_features // BLOCK_WEIGHTS * BLOCK_BYTES[kind]


def unavailable_reason() -> str | None:
    """Why `library()` returned None (None while it has not, or when it loaded)."""
    return _reason[0] if _reason else None


def library(cache_dir: Path) -> ctypes.CDLL | None:
    """The compiled kernel, built into `cache_dir` on first use; None when it cannot be.
    Thread-safe: a build started early on another thread (to overlap a model's conversion) is
    waited for, not repeated."""
    with _lock:
        return _load(cache_dir)


@functools.cache
def _load(cache_dir: Path) -> ctypes.CDLL | None:
    compiler = _compiler()
    if compiler is None:
        return _fail("no C compiler found ($CC, cc, gcc or clang)")
    path = cache_dir / f"cpu_blocks-{_build_key(compiler)}.so"
    if not path.is_file():
        try:
            _build(compiler, path)
        except (OSError, subprocess.SubprocessError) as exc:
            names = " + ".join(s.name for s in _SOURCES)
            return _fail(f"building {names} with {compiler} failed: {exc}")
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        return _fail(f"loading {path} failed: {exc}")
    long, ptr = ctypes.c_long, ctypes.c_void_p
    lib.blocks_matmul.argtypes = [ctypes.c_int, ptr, long, long, ptr, long, ptr, ctypes.c_int]
    lib.blocks_matmul.restype = ctypes.c_int
    lib.blocks_dequantize.argtypes = [ctypes.c_int, ptr, long, long, ptr]
    lib.blocks_dequantize.restype = ctypes.c_int
    lib.decode_attention.argtypes = [
        *(ptr,) * 6,
        long,
        ptr,
        long,
        long,
        long,
        long,
        ctypes.c_float,
        ptr,
        ctypes.c_int,
    ]
    lib.decode_attention.restype = ctypes.c_int
    fl, i = ctypes.c_float, ctypes.c_int
    lib.add_rms_norm.argtypes = [ptr, ptr, ptr, long, long, fl, ptr, ptr, i]
    lib.add_rms_norm.restype = i
    lib.silu_mul.argtypes = [ptr, long, long, ptr, i]
    lib.silu_mul.restype = i
    return lib


def matmul(
    lib: ctypes.CDLL,
    x: torch.Tensor,  # [M, K] fp32, CPU
    blocks: torch.Tensor,  # [N, row_bytes(kind, K)] uint8
    kind: str,
    bias: torch.Tensor | None = None,  # [N] fp32
) -> torch.Tensor:  # [M, N] fp32
    """x W^T (+ b) with W given as blocks."""
    x = x.contiguous()
    m, k = x.shape
    n = blocks.shape[0]
    if x.dtype != torch.float32 or blocks.dtype != torch.uint8 or not blocks.is_contiguous():
        raise ValueError("blocks matmul takes fp32 activations and contiguous uint8 blocks")
    if blocks.shape[1] != row_bytes(kind, k):
        raise ValueError(f"{kind} blocks of {blocks.shape[1]} bytes a row do not hold {k} weights")
    y = torch.empty(m, n)
    if m == 0:
        return y
    rc = lib.blocks_matmul(
        KINDS[kind], x.data_ptr(), m, k, blocks.data_ptr(), n, y.data_ptr(), torch.get_num_threads()
    )
    if rc != 0:
        raise ValueError(f"blocks matmul refused x {tuple(x.shape)} with {kind} blocks")
    return y.add_(bias) if bias is not None else y


def dequantize(lib: ctypes.CDLL, blocks: torch.Tensor, kind: str, in_features: int) -> torch.Tensor:
    """The fp32 weight [N, in_features] the blocks stand for (exactly gguf's dequantization)."""
    if blocks.dtype != torch.uint8 or blocks.shape[1] != row_bytes(kind, in_features):
        raise ValueError(f"not {kind} blocks of {in_features} weights a row")
    blocks = blocks.contiguous()
    out = torch.empty(blocks.shape[0], in_features)
    if lib.blocks_dequantize(KINDS[kind], blocks.data_ptr(), blocks.shape[0], in_features,
                             out.data_ptr()) != 0:  # fmt: skip
        raise ValueError(f"could not dequantize {kind} blocks")
    return out


def _fail(reason: str) -> None:
    _reason[:] = [reason]
    return None


def _compiler() -> str | None:
    env = os.environ.get("CC")
    if env:
        return shutil.which(env)
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _build_key(compiler: str) -> str:
    """What the binary depends on: source, compiler, flags and (for -march=native) the CPU."""
    digest = hashlib.sha256(b"".join(s.read_bytes() for s in (*_SOURCES, *_HEADERS)))
    digest.update(f"{compiler}:{os.stat(compiler).st_mtime_ns}:{_FLAGS}".encode())
    digest.update(platform.machine().encode())
    try:
        with open("/proc/cpuinfo") as info:
            digest.update(next((ln for ln in info if ln.startswith("flags")), "").encode())
    except OSError:
        pass
    return digest.hexdigest()[:16]


def _build(compiler: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [compiler, *_FLAGS, *map(str, _SOURCES), "-o", tmp],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            last = done.stderr.strip().splitlines()[-1:]
            raise subprocess.SubprocessError(last[0] if last else f"exit status {done.returncode}")
        os.replace(tmp, path)  # readers never see a half-written library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
