"""Which float type the heavy matrix products of scoring run in.

CPUs with native bfloat16 dot products (AVX512-BF16, AMX) multiply bfloat16 matrices about three
to five times faster than float32 ones (measured on the 2-core dev machine: 400-500 against
100-150 GFLOP/s), and those products dominate scoring once the backbone has run: the
nearest-neighbour search and the DMAD heads. Elsewhere bfloat16 is emulated and slower. Callers
only use it where its rounding (3 significant digits) is harmless; distances that reach a score
are recomputed in float32.

The choice must not change from one process to the next on the same machine: a timing probe of a
few milliseconds, run while other work loads the CPU, picked float32 in one benchmark run and
bfloat16 in the next on the same CPU, and the scorer's speed changed by a third. So the CPU's own
feature flags decide where torch reports them (x86); a timing probe, repeated and judged on its
median, decides only elsewhere (e.g. ARM, where bfloat16 support varies by core).

``DEFECTLOOP_BF16=1`` or ``=0`` overrides both (for reproducible figures across machines).
"""

from __future__ import annotations

import functools
import logging
import os
import statistics
import time

import torch

log = logging.getLogger(__name__)


def native_bf16() -> bool | None:
    """Whether the CPU multiplies bfloat16 natively, from its feature flags; None where unknown."""
    checks = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if not all(callable(c) for c in checks) or not torch.cpu._is_avx512_supported():
        return None  # not x86 with AVX-512 (or an older torch): the flags say nothing either way
    return any(c() for c in checks)


def bf16_speedup(rounds: int = 15) -> float:
    """Median over interleaved rounds of float32 time / bfloat16 time for a 1024x256x1024 product."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1024, 256, generator=g), torch.randn(256, 1024, generator=g)
    ah, bh = a.bfloat16(), b.bfloat16()
    a @ b, ah @ bh  # first calls pick and prepare kernels
    ratios = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        a @ b
        t1 = time.perf_counter()
        ah @ bh
        t2 = time.perf_counter()
        ratios.append((t1 - t0) / max(t2 - t1, 1e-9))
    return statistics.median(ratios)


@functools.cache
def matmul_dtype() -> torch.dtype:
    """bfloat16 where the CPU multiplies it natively (or measurably twice as fast), else float32."""
    env = os.environ.get("DEFECTLOOP_BF16", "").strip().lower()
    if env:
        return torch.float32 if env in ("0", "false", "no", "off") else torch.bfloat16
    native = native_bf16()
    if native is not None:
        dtype = torch.bfloat16 if native else torch.float32
        log.info("matrix products in %s (CPU flags: native bfloat16 %s)", dtype, native)
        return dtype
    speedup = bf16_speedup()
    dtype = torch.bfloat16 if speedup >= 2 else torch.float32
    log.info("matrix products in %s (bfloat16 %.2fx the speed of float32, median)", dtype, speedup)
    return dtype
