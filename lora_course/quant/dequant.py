"""QLoRA's frozen base on CPU: quantized layers that run at BLAS speed.

``DequantLinear`` is an ``nn.QuantizedLinear`` whose CPU forward dequantizes the packed
weight (``quantize.dequantize``) and calls a BLAS matmul, with a custom backward that
dequantizes again rather than keeping float weights alive. So on CPU a quantized layer
*does* materialize its float matrix, one layer at a time, for the length of one matmul;
the saving is in what stays resident. On other devices it runs MLX's fused
``quantized_matmul``. Taught in notebook 08 (QLoRA).
"""

from __future__ import annotations

from lora_course.quant.quantize import dequantize

import mlx.core as mx
import mlx.nn as nn


def make_dequant_matmul(group_size: int, bits: int):
    """Build ``f(x, w_q, scales, biases) = x @ dequantize(w_q).T`` with its own backward."""

    # float32 throughout: CPU matmuls in float16 / bfloat16 are ~15x slower than in float32.
    def dense(w_q, scales, biases):  # (out, in)
        w = mx.dequantize(w_q, scales, biases, group_size=group_size, bits=bits)
        return w.astype(mx.float32)

    @mx.custom_function
    def matmul(x, w_q, scales, biases):
        # mx.depends ties each dequantization to the data flowing through this layer. Left
        # free, MLX's scheduler would dequantize every layer's weight up front (they only
        # depend on the frozen weights), and mx.compile would merge the backward's
        # dequantization with the forward's, keeping the float weight alive in between.
        packed = mx.depends([w_q, scales, biases], [x])
        y = x.astype(mx.float32) @ dense(*packed).T  # (..., in) @ (in, out)
        # quantized_matmul's output dtype: the shared dtype, float32 when they differ
        return y.astype(x.dtype if x.dtype == scales.dtype else mx.float32)

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        x, w_q, scales, biases = primals
        packed = mx.depends([w_q, scales, biases], [cotangent])
        dx = cotangent.astype(mx.float32) @ dense(*packed)  # (..., out) @ (out, in)
        # The packed weight is frozen: its "gradients" are never evaluated.
        return dx.astype(x.dtype), mx.zeros_like(w_q), mx.zeros_like(scales), mx.zeros_like(biases)

    return matmul


_DEQUANT_MATMULS: dict = {}  # (group_size, bits) -> the function above, built once each


def dequant_matmul(
    x: mx.array, w_q: mx.array, scales: mx.array, biases: mx.array, group_size: int = 64, bits: int = 4
) -> mx.array:
    """``x @ dequantize(w_q).T`` through BLAS, with a backward that dequantizes again.

    Equal (up to float summation order) to ``mx.quantized_matmul(x, w_q, scales,
    biases, transpose=True, group_size=group_size, bits=bits)``, and its gradient
    with respect to ``x`` likewise.
    """
    key = (group_size, bits)
    if key not in _DEQUANT_MATMULS:
        _DEQUANT_MATMULS[key] = make_dequant_matmul(group_size, bits)
    return _DEQUANT_MATMULS[key](x, w_q, scales, biases)


def _dequant_path(layer: nn.Module) -> bool:
    if getattr(layer, "mode", "affine") != "affine":
        return False
    path = getattr(layer, "path", "auto")
    return path == "dequant" or (path == "auto" and mx.default_device() == mx.cpu)


def dequantize_after(layer: nn.Module, after: mx.array) -> mx.array | None:
    """A quantized layer's float32 weight (out, in), computed once ``after`` exists, where
    the layer runs the dequant path (CPU); ``None`` for any other layer. For a frozen head
    applied many times in one step (the chunked loss): one de-quantization, not two per use."""
    if not isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)) or not _dequant_path(layer):
        return None
    packed = mx.depends([layer["weight"], layer["scales"], layer["biases"]], [after])
    # our dequantize (bit-equal to mx.dequantize): element-wise, so under mx.compile it writes
    # the float matrix and nothing else; mx.dequantize's CPU kernel peaks at twice that
    return dequantize(*packed, group_size=layer.group_size, bits=layer.bits).astype(mx.float32)


class DequantLinear(nn.QuantizedLinear):
    """An ``nn.QuantizedLinear`` that runs at BLAS speed on CPU (QLoRA's frozen base).

    On CPU the forward is :func:`dequant_matmul`; elsewhere it is MLX's fused
    ``quantized_matmul`` (``super().__call__``). Set ``layer.path`` to ``"dequant"`` or
    ``"kernel"`` to force one; the default ``"auto"`` picks by ``mx.default_device()``.
    Same parameters and file layout as ``nn.QuantizedLinear``, so LoRA wraps it as is.
    """

    path = "auto"

    def __call__(self, x: mx.array) -> mx.array:
        if not _dequant_path(self):
            return super().__call__(x)
        y = dequant_matmul(x, self["weight"], self["scales"], self["biases"], self.group_size, self.bits)
        return y + self["bias"] if "bias" in self else y


class DequantEmbedding(nn.QuantizedEmbedding):
    """``nn.QuantizedEmbedding`` whose ``as_linear`` (a tied output head) uses the CPU fast path."""

    path = "auto"

    def as_linear(self, x: mx.array) -> mx.array:
        if not _dequant_path(self):
            return super().as_linear(x)
        return dequant_matmul(x, self["weight"], self["scales"], self["biases"], self.group_size, self.bits)
