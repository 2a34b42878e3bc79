"""Peak memory of loading a checkpoint: safetensors through ``lora_course.load``, and GGUF.

A loader that reads a file into memory and then copies it into the model's arrays
peaks at twice the weights; one that hands the file's tensors to the model (or reads
them on first use) peaks near one copy. The worker writes the configuration's shape
with seeded random weights in float16 (as real checkpoints ship, and as GGUF's f16),
frees everything, resets the peak-RSS mark, and loads:

- ``lora_course``: a Hugging Face-layout folder (config.json, model.safetensors, the
  course tokenizer) through ``lora_course.load`` and ``mx.eval`` of every parameter.
- ``lora_course_gguf``: the same model written as one f16 ``.gguf`` file
  (``lora_course.save(..., format="gguf")``, with the course tokenizer's metadata) and
  read back through ``lora_course.load``, which reads GGUF with ``mx.load``.

Reported: the peak RSS during loading, the RSS before it, the bytes of the loaded
weights, and ``peak_over_weights`` = (peak RSS - RSS before) / weight bytes.
"""

from __future__ import annotations

import gc
import json
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks import measure

_TOKENIZER = Path(__file__).resolve().parent.parent / "lora_course" / "assets" / "base" / "tokenizer.model"


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _write(cfg, folder: Path, fmt: str) -> int:
    """Seeded random float16 weights of ``cfg``'s shape; returns the file's size in bytes."""
    from lora_course import Model, ModelArgs

    import mlx.core as mx

    args = ModelArgs.from_dict(cfg.hf_config())
    mx.random.seed(cfg.seed)
    model = Model(args)
    model.set_dtype(mx.float16)
    weights = dict(_flat(model))
    mx.eval(weights)
    if fmt == "gguf":
        from lora_course import Tokenizer, save

        path = save(model, Tokenizer(_TOKENIZER), folder / "model.gguf", format="gguf", gguf_type="f16")
    else:
        path = folder / "model.safetensors"
        mx.save_safetensors(str(path), weights)
        config = {**cfg.hf_config(), "torch_dtype": "float16"}
        (folder / "config.json").write_text(json.dumps(config))
        shutil.copy(_TOKENIZER, folder / "tokenizer.model")
    return path.stat().st_size


def _flat(model):
    from lora_course.tree import tree_flatten

    return tree_flatten(model.parameters())


def run(cfg, weights_path, data_path, quant: bool = False, fmt: str = "safetensors") -> dict:
    from lora_course import load

    import mlx.core as mx

    with tempfile.TemporaryDirectory(prefix="lora_course_load_") as tmp:
        folder = Path(tmp)
        file_bytes = _write(cfg, folder, fmt)
        gc.collect()
        mx.clear_cache()
        rss_method = measure.reset_peak_rss()
        before = _rss_mib()
        tic = time.perf_counter()
        with measure.watch_load() as machine:
            model, _ = load(folder / "model.gguf" if fmt == "gguf" else folder)
            mx.eval(model.parameters())
        seconds = time.perf_counter() - tic
        peak = measure.peak_rss_mib(rss_method)
        weight_bytes = sum(v.nbytes for _, v in _flat(model))
    return {
        "format": fmt,
        "load_s": seconds,
        "file_bytes": file_bytes,
        "weight_bytes": weight_bytes,
        "weights_dtype": str(next(v for _, v in _flat(model)).dtype),
        "rss_before_mib": before,
        "peak_rss_mib": peak,
        "rss_method": rss_method,
        "peak_over_weights": (peak - before) * 2**20 / weight_bytes,
        "load": machine,
    }


def run_gguf(cfg, weights_path, data_path, quant: bool = False) -> dict:
    return run(cfg, weights_path, data_path, quant, fmt="gguf")


RUNNERS = {"lora_course": run, "lora_course_gguf": run_gguf}
