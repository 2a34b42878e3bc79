"""Give MLX a fast BLAS on Linux before it is first imported.

The Linux ``mlx[cpu]`` wheel links a bundled, single-threaded reference BLAS.
A 1024x1024 fp32 matmul runs about 30x slower with it than with an optimized
library. The dynamic linker resolves ``cblas_sgemm`` and friends to the first
library in the global symbol scope, so loading an optimized BLAS with
``RTLD_GLOBAL`` *before* ``mlx.core`` is imported makes MLX call it instead.
Results are the same up to float rounding.

Candidates, in order:

1. ``$LORA_COURSE_BLAS``: a path you choose.
2. MKL's runtime ``libmkl_rt.so.*`` from the ``mkl`` wheel (a dependency of
   this package on Linux x86-64), found under ``sys.prefix/lib``.
3. OpenBLAS: Debian's ``libopenblas0-pthread`` (``libopenblas.so.0``).

Set ``LORA_COURSE_NO_BLAS=1`` to keep MLX's own BLAS. Taught in notebook 00.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
import warnings

OPT_OUT_ENV = "LORA_COURSE_NO_BLAS"
PATH_ENV = "LORA_COURSE_BLAS"

# What load_optimized_blas() did, for `lora-course info` and the tests.
STATE = {"loaded": None, "reason": "not attempted"}

_OPENBLAS_PATHS = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
]


def candidates() -> list[str]:
    """Paths of optimized BLAS libraries on this machine, best first."""
    found = []
    if os.environ.get(PATH_ENV):
        found.append(os.environ[PATH_ENV])
    for prefix in dict.fromkeys([sys.prefix, sys.base_prefix]):
        found += sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")), reverse=True)
    found += [p for p in _OPENBLAS_PATHS if os.path.exists(p)]
    name = ctypes.util.find_library("openblas")
    if name:
        found.append(name)
    return list(dict.fromkeys(found))


def load_optimized_blas() -> str | None:
    """Load the first working candidate globally. Returns its path, or None.

    Warns once (with the fix) when nothing can be loaded, or when ``mlx.core``
    was imported before us and so already bound the reference BLAS.
    """
    if STATE["reason"] != "not attempted":
        return STATE["loaded"]
    if not sys.platform.startswith("linux"):
        STATE["reason"] = "not needed: MLX uses Accelerate on macOS"
        return None
    if os.environ.get(OPT_OUT_ENV, "") not in ("", "0"):
        STATE["reason"] = f"disabled by {OPT_OUT_ENV}"
        return None
    if "mlx.core" in sys.modules:
        STATE["reason"] = "mlx.core was imported before lora_course"
        warnings.warn(
            "lora_course: mlx.core was imported before lora_course, so MLX keeps its slow "
            "reference BLAS. Import lora_course first (or set LORA_COURSE_NO_BLAS=1 to silence).",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    chosen = os.environ.get(PATH_ENV)
    for path in candidates():
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            if path == chosen:  # the user asked for this one: say why it was passed over
                warnings.warn(
                    f"lora_course: {PATH_ENV}={path} could not be loaded ({e}); trying the other candidates",
                    RuntimeWarning,
                    stacklevel=3,
                )
            continue
        STATE.update(loaded=path, reason="loaded")
        return path
    STATE["reason"] = "no optimized BLAS found"
    warnings.warn(
        "lora_course: no optimized BLAS found, MLX matmuls on CPU will be ~30x slower. "
        "Fix: `pip install mkl` or `apt-get install libopenblas0-pthread` "
        "(or set LORA_COURSE_NO_BLAS=1 to silence).",
        RuntimeWarning,
        stacklevel=3,
    )
    return None


def mapped_blas_libraries(keys=("blas", "mkl_rt", "mkl_core", "libmlx")) -> list[str]:
    """Shared libraries mapped into this process whose file name holds one of ``keys``
    (by default the BLAS-like ones; Linux only, [] elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if ".so" in line}
    except OSError:
        return []
    return sorted(p for p in paths if any(k in os.path.basename(p) for k in keys))


def blas_in_use() -> str:
    """One line saying which BLAS MLX calls."""
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    if STATE["loaded"]:
        kind = "MKL" if "mkl" in STATE["loaded"] else "OpenBLAS"
        return f"{kind}: {STATE['loaded']}"
    return f"MLX's bundled reference BLAS ({STATE['reason']})"
