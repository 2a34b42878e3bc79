"""LoRA: train a low-rank update beside a frozen linear layer, then merge it back.

Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv:2106.09685).
A frozen weight W (out, in) is adapted by a product of two thin matrices,

    y = x W^T + scale * (x A) B        A: (in, r) "lora_a",  B: (r, out) "lora_b"

with r much smaller than in and out. B starts at zero, so a freshly wrapped layer is
exactly the base layer; A starts uniform in +-1/sqrt(in). ``scale = alpha / r`` keeps
the update's size steady when you change r (rsLoRA, Kalajdzievski 2023, arXiv:2312.03732,
uses ``alpha / sqrt(r)``). After training, ``W + scale * (A B)^T`` is a plain weight
again (``fuse``), so the adapted model runs at the base model's speed.

This module is the layer, ``LoRALinear``; it imports no other adapter module. The
model surgery (``apply_lora``, ``fuse``, counts) is in ``apply.py``, DoRA in ``dora.py``,
adapter files in ``files.py``. Taught in notebook 05 (LoRA from the math up) and 06 (DoRA, full
fine-tuning and merging).
"""

from __future__ import annotations

import math

from lora_course.limits import MAX_RANK, int_in_range
from lora_course.quant.layers import (
    dense_weight,
    is_quantized,
    linear_dims,
    quantize_like,
)

import mlx.core as mx
import mlx.nn as nn


def lora_scale(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """alpha / r (LoRA) or alpha / sqrt(r) (rsLoRA): the factor in front of (x A) B."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def check_hyper(rank: int, alpha: float, dropout: float) -> None:
    why = int_in_range(rank, "LoRA rank", 1, MAX_RANK)
    if why:
        raise ValueError(why)
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha)):
        raise ValueError(f"LoRA alpha must be a finite number, got {alpha!r}")
    if not (isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0.0 <= dropout < 1.0):
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update: y = base(x) + scale * (x A) B."""

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> LoRALinear:
        """Wrap an ``nn.Linear`` or ``nn.QuantizedLinear`` (the base is frozen, not copied)."""
        if not isinstance(linear, (nn.Linear, nn.QuantizedLinear)):
            raise TypeError(
                f"{cls.__name__}.from_linear needs nn.Linear or nn.QuantizedLinear, "
                f"got {type(linear).__name__}"
            )
        out_dims, in_dims = linear_dims(linear)
        layer = cls(in_dims, out_dims, rank, alpha, dropout, use_rslora)
        layer.linear = linear  # replaces the placeholder built in __init__
        layer.linear.freeze()
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
        super().__init__()
        check_hyper(rank, alpha, dropout)
        self.input_dims, self.output_dims = input_dims, output_dims
        self.linear = nn.Linear(input_dims, output_dims, bias=bias)  # the base; from_linear swaps it
        self.linear.freeze()
        self.dropout = nn.Dropout(p=dropout)
        self.dropout_p = float(dropout)
        self.rank, self.alpha, self.use_rslora = rank, float(alpha), use_rslora
        self.scale = lora_scale(self.alpha, rank, use_rslora)
        bound = 1.0 / math.sqrt(input_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (input_dims, rank))  # (in, r)
        self.lora_b = mx.zeros((rank, output_dims))  # (r, out): zero, so we start at the base

    def _extra_repr(self) -> str:
        rs = ", rslora" if self.use_rslora else ""
        return (
            f"input_dims={self.input_dims}, output_dims={self.output_dims}, rank={self.rank}, "
            f"alpha={self.alpha:g}, scale={self.scale:g}, dropout={self.dropout_p:g}{rs}"
        )

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)  # (..., out): the frozen base, bias included
        h = self.dropout(x) @ self.lora_a  # (..., r): through the narrow middle first
        # y + scale * h @ B as one GEMM that accumulates into y (no extra pass over (..., out)).
        return mx.addmm(y, h, self.lora_b, alpha=self.scale).astype(x.dtype)

    def reference(self, x: mx.array) -> mx.array:
        """The same forward in plain ops, without dropout (tests check the two agree)."""
        return self.linear(x) + self.scale * ((x @ self.lora_a) @ self.lora_b)

    def delta_weight(self) -> mx.array:
        """scale * (A B)^T, the update as a full (out, in) matrix, as fusing adds it to W."""
        return (self.scale * self.lora_b.T) @ self.lora_a.T  # (out, r) @ (r, in)

    def fuse(self, de_quantize: bool = False) -> nn.Module:
        """A plain layer with W + scale * (A B)^T; re-quantized like the base unless de_quantize."""
        w = dense_weight(self.linear)  # (out, in)
        return self._rebuild(w + self.delta_weight().astype(w.dtype), de_quantize)

    def _rebuild(self, w: mx.array, de_quantize: bool) -> nn.Module:
        has_bias = "bias" in self.linear
        fused = nn.Linear(self.input_dims, self.output_dims, bias=has_bias)
        fused.weight = w
        if has_bias:
            fused.bias = self.linear.bias
        if is_quantized(self.linear) and not de_quantize:
            return quantize_like(fused, self.linear)
        return fused
