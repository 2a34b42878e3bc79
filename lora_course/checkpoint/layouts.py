"""The model's tensors in the ecosystem's layouts: float, with RoPE rows as HF orders them.

MLX checkpoints keep quantized layers packed and Meta's RoPE layout as loaded; a plain
Hugging Face checkpoint (and a GGUF file) wants float weights and q/k rows in HF's
half-split order. ``hf_weights`` gives that view; ``save`` and ``gguf_write`` use it.
"""

from __future__ import annotations

import re

from lora_course.checkpoint.files import (
    CheckpointError,
)
from lora_course.checkpoint.meta import interleaved_to_halves
from lora_course.model.transformer import Model
from lora_course.quant.quantize import dequantize
from lora_course.tree import tree_flatten

import mlx.core as mx
import mlx.nn as nn


def quantized_modules(model) -> dict[str, nn.Module]:
    return {p: m for p, m in model.named_modules() if hasattr(m, "scales") and hasattr(m, "bits")}


def hf_weights(model: Model) -> dict[str, mx.array]:
    """The model's tensors as a plain HF checkpoint: dequantized, RoPE in HF's layout."""
    weights = dict(tree_flatten(model.parameters()))
    for path, m in quantized_modules(model).items():
        if getattr(m, "mode", "affine") != "affine":
            raise CheckpointError(
                f"layer '{path}': mode '{m.mode}' quantization cannot be "
                "written in HF format; save with format='mlx'"
            )
        weights[f"{path}.weight"] = dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits)
        del weights[f"{path}.scales"], weights[f"{path}.biases"]
    if model.args.rope_traditional:
        for name in list(weights):
            if re.search(r"self_attn\.[qk]_proj\.(weight|bias)$", name):
                heads = model.args.n_heads if ".q_proj." in name else model.args.n_kv_heads
                weights[name] = interleaved_to_halves(weights[name], heads)
    return weights
