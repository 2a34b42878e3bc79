"""The optimized BLAS is picked up on Linux, and matmuls are unchanged by it."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS swap is Linux-only")

PROBE = r"""
import json, os, sys
import lora_course
from lora_course import blas as _blas
import mlx.core as mx, numpy as np
rng = np.random.default_rng(0)
a = rng.standard_normal((256, 192), dtype=np.float32)
b = rng.standard_normal((192, 128), dtype=np.float32)
c = np.asarray(mx.array(a) @ mx.array(b))
err = float(np.abs(c - a.astype(np.float64) @ b.astype(np.float64)).max())
print(json.dumps({"loaded": _blas.STATE["loaded"], "reason": _blas.STATE["reason"],
                  "mapped": _blas.mapped_blas_libraries(), "err": err, "in_use": _blas.blas_in_use()}))
"""


def run_probe(**env):
    import os

    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


def test_optimized_blas_is_loaded_and_results_are_unchanged():
    fast, _ = run_probe()
    assert fast["loaded"], f"no optimized BLAS was loaded: {fast['reason']}"
    name = fast["loaded"].rsplit("/", 1)[-1]
    assert "mkl_rt" in name or "openblas" in name
    assert any(name.split(".so")[0] in m for m in fast["mapped"]), fast["mapped"]
    stock, _ = run_probe(LORA_COURSE_NO_BLAS="1")
    assert stock["loaded"] is None and "disabled" in stock["reason"]
    # Same matmul, both within float32 rounding of a float64 reference.
    assert fast["err"] < 1e-3 and stock["err"] < 1e-3


def test_importing_mlx_first_warns_once_with_the_fix():
    code = "import warnings; warnings.simplefilter('always'); import mlx.core; import lora_course"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stderr.count("mlx.core was imported before lora_course") == 1
    assert "Import lora_course first" in out.stderr


def test_info_reports_the_blas():
    out = subprocess.run(
        [sys.executable, "-m", "lora_course", "info"], capture_output=True, text=True, check=True
    )
    assert "blas" in out.stdout and "mlx" in out.stdout
    assert ("MKL" in out.stdout) or ("OpenBLAS" in out.stdout)


def test_a_chosen_blas_that_cannot_load_is_named_and_the_next_one_used(tmp_path):
    broken = tmp_path / "libbroken.so"
    broken.write_bytes(b"not a shared library")
    fast, stderr = run_probe(LORA_COURSE_BLAS=str(broken))
    assert f"LORA_COURSE_BLAS={broken} could not be loaded" in stderr
    assert fast["loaded"] and fast["loaded"] != str(broken)  # fell back to the next candidate
