"""How big a model is on disk and in memory: bytes, parameters and bits per weight.

Packed quantized words are counted at their logical size (a b-bit word holds 32 / b
weights), and their scales and biases as overhead. Taught in notebook 07.
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_course.quant.layers import QUANTIZED_CLASSES
from lora_course.tree import tree_flatten

import mlx.core as mx
import mlx.nn as nn


@dataclass
class ModelSize:
    """Storage of a model's parameters, packed weights counted as stored."""

    total_bytes: int  # every parameter array: packed words, scales, biases, floats
    parameters: int  # logical parameter count (a b-bit packed word holds 32 / b weights)
    quantized_parameters: int  # weights stored packed
    quantized_bytes: int  # their words + scales + biases

    @property
    def bits_per_weight(self) -> float:
        """Average storage per parameter, whole model."""
        return 8 * self.total_bytes / max(self.parameters, 1)

    @property
    def quantized_bits_per_weight(self) -> float:
        """Storage per packed weight, scales and biases included (e.g. 4.5 for 4-bit, group 64, fp16)."""
        return 8 * self.quantized_bytes / max(self.quantized_parameters, 1)

    def __str__(self) -> str:
        text = f"{self.total_bytes / 2**20:.2f} MiB, {self.parameters:,} parameters, "
        text += f"{self.bits_per_weight:.2f} bits/weight"
        if self.quantized_parameters:
            text += f" ({self.quantized_parameters:,} quantized at {self.quantized_bits_per_weight:.2f} bits)"
        return text


def model_size(model: nn.Module) -> ModelSize:
    """Bytes and effective bits per weight of ``model``, quantization scales and biases included."""
    packed = {p: m.bits for p, m in model.named_modules() if isinstance(m, QUANTIZED_CLASSES)}
    total = params = q_params = q_bytes = 0
    for path, a in tree_flatten(model.parameters()):
        owner, _, leaf = path.rpartition(".")
        total += a.nbytes
        if owner in packed and leaf in ("weight", "scales", "biases"):
            q_bytes += a.nbytes
            if leaf == "weight":
                n = a.size * 32 // packed[owner]
                params, q_params = params + n, q_params + n
        else:
            params += a.size
    return ModelSize(total, params, q_params, q_bytes)


def effective_bits(bits: int, group_size: int, scale_dtype=mx.float16) -> float:
    """Bits stored per weight: the code plus its share of one scale and one bias."""
    return bits + 2 * 8 * scale_dtype.size / group_size
