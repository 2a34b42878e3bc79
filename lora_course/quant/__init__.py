"""Quantization and QLoRA's frozen base: the quantizer, fast CPU layers, whole models, sizes.

``quantize`` (the math, bit-identical to ``mx.quantize``) -> ``dequant`` (layers that run
at BLAS speed on CPU) -> ``layers`` (whole models) -> ``size`` (bytes and bits per weight).
Taught in notebooks 07 (precision and quantization) and 08 (QLoRA).
"""

from lora_course.quant.dequant import DequantEmbedding, DequantLinear, dequant_matmul
from lora_course.quant.layers import (
    default_predicate,
    dense_weight,
    dequantized,
    is_quantized,
    quantize_model,
    use_dequant_layers,
)
from lora_course.quant.quantize import QuantizationError, dequantize, pack, quantize, unpack
from lora_course.quant.size import ModelSize, effective_bits, model_size

__all__ = [
    "QuantizationError",
    "dequantize",
    "pack",
    "quantize",
    "unpack",
    "DequantEmbedding",
    "DequantLinear",
    "dequant_matmul",
    "default_predicate",
    "dense_weight",
    "dequantized",
    "is_quantized",
    "quantize_model",
    "use_dequant_layers",
    "ModelSize",
    "effective_bits",
    "model_size",
]
