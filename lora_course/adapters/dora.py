"""DoRA: LoRA on the direction of each weight row, plus a trainable magnitude.

Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation" (arXiv:2402.09353).
Write every output unit's weight row as a length times a unit direction,
W[i] = m[i] * V[i] / ||V[i]||. DoRA trains the lengths m directly and the direction
through a LoRA update of V:

    W' = m * (W + scale * (A B)^T) / ||W + scale * (A B)^T||      (norm of each row, (out,))
    y  = x W'^T + bias

MLX stores a linear weight as (out, in), so "the norm of each column" of the paper's
(in, out) matrix is our per-row norm over the input axis: one number per output
unit, as mlx-lm and PEFT compute it. m starts at ||W[i]||, so at initialization
W' = W. Following section 4.3 of the paper the norm is treated as a constant in the
backward pass (``mx.stop_gradient``): gradients flow to m, A and B, but not through
||V||, which saves memory and, the paper reports, costs no accuracy.

Taught in notebook 06 (DoRA, full fine-tuning and merging).
"""

from __future__ import annotations

from lora_course.adapters.lora import LoRALinear
from lora_course.quant.layers import dense_weight

import mlx.core as mx
import mlx.nn as nn


def row_norms(w: mx.array) -> mx.array:
    """Euclidean norm of each row of w (out, in), in float32: (out,)."""
    return mx.linalg.norm(w.astype(mx.float32), axis=1)


def dora_reference(
    x: mx.array, w: mx.array, m: mx.array, a: mx.array, b: mx.array, scale: float, detach_norm: bool = True
) -> mx.array:
    """DoRA in plain ops, bias left out: x @ (m * V / ||V||)^T with V = W + scale (A B)^T.

    ``detach_norm=False`` differentiates through ||V|| as well; tests compare the two
    to show the stop-gradient matters.
    """
    v = w + scale * (a @ b).T  # (out, in)
    norm = mx.linalg.norm(v, axis=1)  # (out,)
    if detach_norm:
        norm = mx.stop_gradient(norm)
    return x @ ((m / norm)[:, None] * v).T


class DoRALinear(LoRALinear):
    """LoRALinear plus a magnitude vector m (out,): y = m / ||V|| * (x V^T) + bias."""

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> DoRALinear:
        layer = super().from_linear(linear, rank, alpha, dropout, use_rslora)
        layer.m = row_norms(dense_weight(layer.linear))  # the base's lengths
        return layer

    def __init__(
        self,
        input_dims: int,
        output_dims: int,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        bias: bool = False,
    ):
        super().__init__(input_dims, output_dims, rank, alpha, dropout, use_rslora, bias)
        self.m = row_norms(self.linear.weight)  # (out,)

    def __call__(self, x: mx.array) -> mx.array:
        w = dense_weight(self.linear)  # (out, in); dequantized if the base is packed
        h = self.dropout(x) @ self.lora_a  # (..., r)
        y = mx.addmm(x @ w.T, h, self.lora_b, alpha=self.scale)  # x V^T = x W^T + scale (x A) B
        # ||V|| per output row, a constant for the backward pass (DoRA section 4.3).
        norm = mx.stop_gradient(row_norms(w + self.delta_weight().astype(w.dtype)))  # (out,)
        out = (self.m / norm).astype(x.dtype) * y.astype(x.dtype)  # (..., out)
        if "bias" in self.linear:
            out = out + self.linear.bias
        return out

    def reference(self, x: mx.array) -> mx.array:
        """The same forward in plain ops, without dropout."""
        out = dora_reference(x, dense_weight(self.linear), self.m, self.lora_a, self.lora_b, self.scale)
        return out + self.linear.bias if "bias" in self.linear else out

    def fuse(self, de_quantize: bool = False) -> nn.Module:
        """A plain layer with W' = m * V / ||V||; re-quantized like the base unless de_quantize."""
        w = dense_weight(self.linear)
        v = w + self.delta_weight().astype(w.dtype)  # (out, in)
        return self._rebuild(((self.m / row_norms(v))[:, None] * v).astype(w.dtype), de_quantize)
