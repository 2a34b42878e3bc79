"""The machine's measured fp32 GEMM rate: the yardstick for achieved GFLOP/s.

Square fp32 matmuls at sizes 1024 and 2048, through MLX (with the BLAS lora_course
loads) and through numpy (its own bundled OpenBLAS), each in its own process. The
best rate of all is the "measured GEMM rate"; training-step GFLOP/s are reported as
a fraction of it. Best-of-repeats is the machine's capability, so the fractions are
conservative.
"""

from __future__ import annotations

import time

SIZES = (1024, 2048)
REPEATS = 5


def _rates(matmul, make, sync) -> dict:
    out = {}
    for n in SIZES:
        a, b = make(n), make(n)
        sync(matmul(a, b))  # warm-up
        best = float("inf")
        for _ in range(REPEATS):
            tic = time.perf_counter()
            sync(matmul(a, b))
            best = min(best, time.perf_counter() - tic)
        out[str(n)] = 2.0 * n**3 / best / 1e9
    return {"gflops": out, "best_gflops": max(out.values())}


def run_mlx(cfg=None, *_args, **_kw) -> dict:
    import mlx.core as mx

    return _rates(lambda a, b: a @ b, lambda n: mx.random.normal((n, n)), mx.eval)


def run_numpy(cfg=None, *_args, **_kw) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    return _rates(lambda a, b: a @ b, lambda n: rng.standard_normal((n, n), dtype=np.float32), lambda x: x)


def run_torch(cfg=None, *_args, **_kw) -> dict:
    import torch

    from benchmarks.train_step import cores

    torch.set_num_threads(cores())
    return _rates(lambda a, b: a @ b, lambda n: torch.randn(n, n), lambda x: x)


RUNNERS = {"mlx": run_mlx, "numpy": run_numpy, "torch": run_torch}
