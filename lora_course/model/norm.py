"""RMSNorm: root-mean-square layer normalization (Zhang & Sennrich, 2019, arXiv:1910.07467).

The hot path is ``mx.fast.rms_norm``; ``rms_norm_reference`` spells out the same math
with basic ops, and tests/model/test_norm.py proves they agree. Taught in notebook 02.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def rms_norm_reference(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32."""
    x32 = x.astype(mx.float32)
    inv_rms = mx.rsqrt(mx.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * inv_rms).astype(x.dtype) * weight


class RMSNorm(nn.Module):
    """Root-mean-square norm: LayerNorm without the mean subtraction and the bias."""

    def __init__(self, dims: int, eps: float = 1e-5):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight, self.eps)

    def reference(self, x: mx.array) -> mx.array:
        return rms_norm_reference(x, self.weight, self.eps)
