"""Converting checkpoints: Hugging Face or Meta / Mistral originals to MLX, optionally quantized.

``convert`` is ``load`` (any layout ``lora_course.checkpoint`` reads), an optional cast of the
float weights, an optional quantization with ``lora_course.quant`` (group-wise affine,
as QLoRA's base models need; Dettmers et al. 2023, arXiv:2305.14314), then ``save`` in
the MLX layout. ``lora-course convert`` is its command line. Taught in notebook 04
(checkpoints, tokenizers and sampling); quantization itself in notebooks 07-08.
"""

from __future__ import annotations

from pathlib import Path

from lora_course.checkpoint.files import DEFAULT_SHARD_MB, CheckpointError
from lora_course.checkpoint.load import load
from lora_course.checkpoint.save import quantized_modules, save
from lora_course.checkpoint.weights import FLOATS
from lora_course.model.transformer import Model
from lora_course.quant.layers import quantize_model
from lora_course.tree import tree_map

import mlx.core as mx


def _quantize(model: Model, group_size: int = 64, bits: int = 4) -> Model:
    """Quantize with lora_course.quant (the MLX LoRA example's rule: every Linear but the output head)."""
    quantize_model(model, group_size=group_size, bits=bits)
    model.args.quantization = {"group_size": group_size, "bits": bits}
    return model


def convert(
    torch_path=None,
    hf_path=None,
    mlx_path="mlx_model",
    quantize: bool = False,
    q_group_size: int = 64,
    q_bits: int = 4,
    dtype: str | None = None,
    shard_size_mb: float = DEFAULT_SHARD_MB,
) -> Path:
    """Convert a Meta (``torch_path``) or HF (``hf_path``) checkpoint to MLX format at ``mlx_path``.

    ``dtype`` (``"float16"``, ``"bfloat16"``, ``"float32"``) casts the float weights;
    ``None`` keeps the stored dtype. ``quantize`` then quantizes with ``q_group_size``
    and ``q_bits``.
    """
    if (torch_path is None) == (hf_path is None):
        raise CheckpointError("convert: give exactly one source, torch_path or hf_path")
    if dtype is not None and dtype not in ("float16", "bfloat16", "float32"):
        raise CheckpointError(f"convert: dtype must be float16, bfloat16 or float32, got {dtype!r}")
    source = torch_path if torch_path is not None else hf_path
    model, tokenizer = load(source, lazy=True)
    if dtype is not None:
        target = getattr(mx, dtype)
        model.update(tree_map(lambda a: a.astype(target) if a.dtype in FLOATS else a, model.parameters()))
    if quantize:
        if quantized_modules(model):
            raise CheckpointError(
                f"{source}: the checkpoint is already quantized; convert it "
                "without -q, or start from an unquantized checkpoint"
            )
        _quantize(model, q_group_size, q_bits)
    return save(model, tokenizer, mlx_path, format="mlx", shard_size_mb=shard_size_mb)
