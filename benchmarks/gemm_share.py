"""How much of our LoRA step is SGEMM: the profile that bounds the step's speed on CPU.

    python -m benchmarks.gemm_share --configs small medium --threads 1 2

A tiny C shim (compiled here with the system C compiler, loaded with ``LD_PRELOAD``)
stands in front of ``cblas_sgemm``: it forwards every call to the real BLAS (MKL, which
``import lora_course`` loads) and adds up the wall time spent inside and the FLOPs. The
worker then runs the benchmark's compiled LoRA step (``benchmarks/configs.py`` shapes,
random weights, the trainer's loss) and prints, per step: wall time, time inside SGEMM,
the SGEMM rate inside those calls, and the time outside them, which is MLX's own CPU
ops (element-wise, softmax, norms, copies), run on one thread one after another.

Whatever the other work costs, the step cannot be faster than its SGEMM time, so a
peer's step time below that (same machine, same run) is out of reach without faster
GEMMs. Linux only (``LD_PRELOAD``, ``cc``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <time.h>
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float*, int,
                         const float*, int, float, float*, int);
static double seconds_in, flops_in;
static long calls_in;
static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}
void cblas_sgemm(int order, int ta, int tb, int m, int n, int k, float alpha, const float* a,
                 int lda, const float* b, int ldb, float beta, float* c, int ldc) {
  static sgemm_fn real;
  if (!real) real = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm");
  double t0 = now();
  real(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  seconds_in += now() - t0;
  flops_in += 2.0 * m * n * k;
  calls_in++;
}
double shim_seconds(void) { return seconds_in; }
double shim_flops(void) { return flops_in; }
long shim_calls(void) { return calls_in; }
void shim_reset(void) { seconds_in = flops_in = 0; calls_in = 0; }
"""


def build_shim(folder: Path) -> Path:
    src, lib = folder / "sgemm_timer.c", folder / "libsgemm_timer.so"
    src.write_text(SHIM)
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(lib), str(src), "-ldl"], check=True)
    return lib


def worker(config: str, steps: int) -> None:
    """Inside the LD_PRELOAD'ed process: time the compiled step and the SGEMM calls in it."""
    import ctypes
    import time

    import lora_course  # noqa: F401  (MKL before mlx)

    import mlx.core as mx

    from benchmarks.configs import PRESETS
    from benchmarks.train_step import lora_course_step

    shim = ctypes.CDLL(None)
    shim.shim_seconds.restype = shim.shim_flops.restype = ctypes.c_double
    shim.shim_calls.restype = ctypes.c_long
    cfg = PRESETS[config]
    update, state = lora_course_step(cfg)  # random weights: the timing does not depend on them
    tokens = mx.random.randint(0, cfg.vocab_size, (cfg.batch, cfg.seq + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    mask = mx.ones(inputs.shape, mx.float32)
    for _ in range(cfg.warmup):
        mx.eval(state, *update(inputs, targets, mask, None))
    shim.shim_reset()
    tic = time.perf_counter()
    for _ in range(steps):
        mx.eval(state, *update(inputs, targets, mask, None))
    wall = (time.perf_counter() - tic) / steps
    inside = shim.shim_seconds() / steps
    print(
        f"| {config} | {os.environ.get('MKL_NUM_THREADS')} | {wall * 1e3:,.0f} | {inside * 1e3:,.0f} "
        f"({inside / wall:.0%}) | {shim.shim_flops() / steps / inside / 1e9:.0f} | "
        f"{shim.shim_calls() // steps:,} | {(wall - inside) * 1e3:,.0f} |",
        flush=True,
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=["small", "medium"])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="MKL threads per run")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.steps)
        return 0
    print(
        "| config | MKL threads | step ms | inside SGEMM ms | SGEMM GFLOP/s inside | calls/step | other ms |"
    )
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        lib = build_shim(Path(tmp))
        for config in args.configs:
            for threads in args.threads:
                env = {**os.environ, "LD_PRELOAD": str(lib), "MKL_NUM_THREADS": str(threads)}
                cmd = [
                    sys.executable,
                    "-m",
                    "benchmarks.gemm_share",
                    "--worker",
                    config,
                    "--steps",
                    str(args.steps),
                ]
                subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
