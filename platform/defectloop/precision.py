"""Which float type the heavy matrix products of scoring run in.

CPUs with native bfloat16 dot products (AVX512-BF16, AMX) multiply bfloat16 matrices about five
times faster than float32 ones (measured on the 2-core dev machine: 500 against 100 GFLOP/s), and
those products dominate scoring once the backbone has run: the nearest-neighbour search and the
DMAD heads. Elsewhere bfloat16 is emulated and slower, so the choice is measured, once per
process, not assumed. Callers only use it where its rounding (3 significant digits) is harmless;
distances that reach a score are recomputed in float32.

``DEFECTLOOP_BF16=1`` or ``=0`` overrides the measurement (for reproducible figures across machines).
"""

from __future__ import annotations

import functools
import logging
import os
import time

import torch

log = logging.getLogger(__name__)


def _best_time(a: torch.Tensor, b: torch.Tensor, reps: int = 3) -> float:
    a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return min(times)


@functools.cache
def matmul_dtype() -> torch.dtype:
    """bfloat16 where it multiplies at least twice as fast as float32 on this CPU, else float32."""
    env = os.environ.get("DEFECTLOOP_BF16", "").strip().lower()
    if env:
        return torch.float32 if env in ("0", "false", "no", "off") else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(512, 256, generator=g), torch.randn(256, 512, generator=g)
    fp32, bf16 = _best_time(a, b), _best_time(a.bfloat16(), b.bfloat16())
    dtype = torch.bfloat16 if 2 * bf16 < fp32 else torch.float32
    log.info("matrix products in %s (bfloat16 %.2fx the speed of float32)", dtype, fp32 / bf16)
    return dtype
