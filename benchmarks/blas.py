"""Set up a worker process's BLAS before ``mlx.core`` is imported, and say what it got.

The Linux ``mlx[cpu]`` wheel calls whatever ``cblas_sgemm`` is first in the global
symbol scope; ``lora_course`` loads MKL there on import (``lora_course/blas.py``).
To compare like for like, mlx-lm runs twice:

- ``stock``: nothing preloaded, MLX's bundled reference BLAS (what a user gets);
- ``same``:  the library ``lora_course`` would load, found by ``lora_course.blas
  .candidates()`` and loaded with ``RTLD_GLOBAL``, without importing ``lora_course``
  itself (its ``__init__`` would import mlx). We load ``blas.py`` by file path.

MKL picks its threading layer at its first call: Intel OpenMP in a lora_course
process, whose first matmul comes before anything imports torch. mlx-lm imports
transformers, which imports torch, which puts GNU OpenMP (libgomp) in the global
symbol scope; an MKL first called after that picks the GNU layer. So the ``same``
run makes MKL's first call (a small matmul) right after loading it, before mlx-lm is
imported, as a lora_course process does. (Pinning the Intel layer without that first
call is wrong: MKL then binds to libgomp's ``omp_*`` symbols and returns garbage.)
Every worker checks its matmuls against numpy: ``check_matmul``.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import sys
from pathlib import Path

KINDS = ("lora_course", "same", "stock", "torch")


@functools.cache
def lora_course_blas_module():
    """``lora_course/blas.py`` as a module, without running ``lora_course/__init__.py``."""
    spec = importlib.util.find_spec("lora_course")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "lora_course is not importable; run from the repository root or `pip install -e .`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "blas.py"
    module_spec = importlib.util.spec_from_file_location("_bench_lora_course_blas", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)  # stdlib only: ctypes, glob, os
    return module


def setup(kind: str) -> str | None:
    """Prepare this process for ``kind``; returns the preloaded library path, if any."""
    if kind not in KINDS:
        raise ValueError(f"blas.setup: kind {kind!r} is not one of {', '.join(KINDS)}")
    if "mlx.core" in sys.modules:
        raise RuntimeError("blas.setup must run before mlx.core is imported")
    if kind == "lora_course":
        import lora_course  # noqa: F401  (its own preload)
        from lora_course import blas as _blas

        return _blas.STATE["loaded"]
    if kind == "same":
        if not sys.platform.startswith("linux"):
            return None  # Accelerate on macOS: there is nothing to preload
        for path in lora_course_blas_module().candidates():
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)  # stays loaded, in the global scope
            except OSError:
                continue
            _first_blas_call()
            return path
        raise RuntimeError(
            "no optimized BLAS found for the 'same BLAS' mlx-lm run; "
            "install the mkl wheel or libopenblas0-pthread"
        )
    return None  # stock mlx / torch: nothing preloaded


def _first_blas_call() -> None:
    import mlx.core as mx

    a = mx.ones((256, 256))
    mx.eval(a @ a)


def check_matmul() -> float:
    """Largest relative error of an MLX fp32 matmul against numpy in float64 (a BLAS sanity check)."""
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((192, 320)).astype(np.float32)
    b = rng.standard_normal((320, 96)).astype(np.float32)
    want = a.astype(np.float64) @ b
    got = np.array(mx.array(a) @ mx.array(b))
    return float(np.abs(got - want).max() / np.abs(want).max())


def mapped_blas() -> list[str]:
    """Basenames of the BLAS, MKL, MLX and OpenMP libraries mapped into this process."""
    found = lora_course_blas_module().mapped_blas_libraries(
        keys=("blas", "mkl_", "libmlx", "libgomp", "libiomp")
    )
    return sorted({os.path.basename(p) for p in found})


def mlx_gemm_gflops(n: int = 512, reps: int = 3) -> float:
    """fp32 (n x n) @ (n x n) rate through MLX in this process: which BLAS did we get?"""
    import time

    import mlx.core as mx

    a = mx.random.normal((n, n))
    b = mx.random.normal((n, n))
    mx.eval(a, b, a @ b)
    tic = time.perf_counter()
    for _ in range(reps):
        mx.eval(a @ b)
    return 2.0 * n**3 * reps / (time.perf_counter() - tic) / 1e9
