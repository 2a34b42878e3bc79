"""One measurement in a fresh process: ``python -m benchmarks.worker '<json spec>'``.

The spec names the benchmark (``lora``, ``qlora``, ``generation``, ``load``, ``gemm``), the peer,
the configuration and the checkpoint files. The worker sets the peer's BLAS up
*before* anything imports ``mlx.core``, runs the measurement, and prints one line
``BENCH_RESULT {json}``. mlx-lm workers never import lora_course (checked).
"""

from __future__ import annotations

import json
import sys
import time

# peer -> (BLAS setup kind, implementation); see blas.py and train_step.py
PEERS = {
    "lora_course": ("lora_course", "lora_course"),
    "lora_course_full_logits": ("lora_course", "lora_course"),  # the plain loss: see train_step.py
    "lora_course_qembed": ("lora_course", "lora_course"),  # QLoRA, the embedding quantized too
    "lora_course_ckpt": ("lora_course", "lora_course"),  # gradient checkpointing on
    "lora_course_gguf": ("lora_course", "lora_course_gguf"),  # load bench: GGUF instead of safetensors
    "mlx_lm_stock": ("stock", "mlx_lm"),
    "mlx_lm_same_blas": ("same", "mlx_lm"),
    "torch_peft": ("torch", "torch_peft"),
    "torch_peft_1t": ("torch", "torch_peft"),  # one thread: see train_step.py
}
PEER_EXTRA = {
    "torch_peft_1t": {"torch_threads": 1},
    "lora_course_full_logits": {"loss_chunk_size": 0},
    "lora_course_qembed": {"quantize_embedding": True},
    "lora_course_ckpt": {"grad_checkpoint": True},
}
GEMM_PEERS = {"mlx": "lora_course", "numpy": "stock", "torch": "torch"}
MARKER = "BENCH_RESULT "


def _versions(impl: str) -> dict:
    out = {"python": sys.version.split()[0]}
    for name in ("mlx.core", "mlx_lm", "torch", "transformers", "peft", "numpy", "lora_course"):
        mod = sys.modules.get(name)
        if mod is not None:
            out[name.split(".")[0]] = getattr(mod, "__version__", "?")
    return out


def run(spec: dict) -> dict:
    from benchmarks import blas
    from benchmarks.configs import BenchConfig

    bench, peer = spec["bench"], spec["peer"]
    cfg = BenchConfig.from_dict(spec["config"])
    cfg.extra.update(PEER_EXTRA.get(spec["peer"], {}))
    if bench == "gemm":
        kind, impl = GEMM_PEERS[peer], peer
    else:
        kind, impl = PEERS[peer]
    tic = time.perf_counter()
    preloaded = blas.setup(kind)
    if bench == "gemm":
        from benchmarks import gemm as module
    elif bench in ("lora", "qlora"):
        from benchmarks import train_step as module
    elif bench == "generation":
        from benchmarks import generation as module
    elif bench == "load":
        from benchmarks import load_memory as module
    else:
        raise ValueError(f"unknown benchmark {bench!r}")
    runner = module.RUNNERS.get(impl)
    if runner is None:
        return {"skipped": f"no {bench} runner for {peer}"}
    result = runner(cfg, spec.get("weights"), spec.get("data"), bench == "qlora")
    if impl == "mlx_lm" and "lora_course" in sys.modules:
        raise AssertionError("an mlx-lm worker imported lora_course (it would change the BLAS)")
    info = {
        "preloaded_blas": preloaded,
        "mapped_blas": blas.mapped_blas(),
        "versions": _versions(impl),
        "worker_s": time.perf_counter() - tic,
    }
    if "mlx.core" in sys.modules and "skipped" not in result:
        info["matmul_rel_error"] = err = blas.check_matmul()
        if not err < 1e-5:
            raise AssertionError(
                f"MLX matmuls are wrong in this process (relative error {err:.2g}): "
                f"BLAS {preloaded}, mapped {blas.mapped_blas()}"
            )
        info["blas_check_gflops_512"] = blas.mlx_gemm_gflops()
    return {**result, **info}


def main() -> int:
    spec = json.loads(sys.argv[1])
    result = run(spec)
    print(MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
