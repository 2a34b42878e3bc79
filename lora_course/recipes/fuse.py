"""Fusing: load a checkpoint and its adapters, merge them, save a standalone model.

``lora-course fuse`` runs :func:`fuse_adapters`. Taught in notebook 06 (merging) and 14.
"""

from __future__ import annotations

from pathlib import Path

from lora_course.adapters.apply import fuse
from lora_course.adapters.files import load_adapters
from lora_course.checkpoint.load import load
from lora_course.checkpoint.save import save


def fuse_adapters(
    model_path,
    adapter_path,
    save_path,
    de_quantize: bool = False,
    export_hf: bool = False,
    export_gguf: bool = False,
    gguf_type: str = "f16",
) -> Path:
    """Load a checkpoint and an adapter, merge them, and save a standalone model.

    ``export_hf`` writes a plain Hugging Face checkpoint (always de-quantized: HF
    cannot hold MLX's packed weights, and merging into float avoids rounding twice).
    ``export_gguf`` writes one llama.cpp file instead: ``save_path`` itself if it ends
    in ``.gguf``, else ``save_path/ggml-model-<gguf_type>.gguf`` (mlx-lm's name).
    """

    model, tokenizer = load(model_path)
    load_adapters(model, adapter_path)
    fuse(model, de_quantize=de_quantize or export_hf or export_gguf)
    if export_gguf:
        out = Path(save_path)
        out = out if out.suffix == ".gguf" else out / f"ggml-model-{gguf_type}.gguf"
        return save(model, tokenizer, out, format="gguf", gguf_type=gguf_type)
    return save(model, tokenizer, save_path, format="hf" if export_hf else "mlx")
