"""Rotary position embeddings (Su et al., 2021, "RoFormer", arXiv:2104.09864).

RoPE rotates each pair of query/key features by an angle proportional to the
token's position, so attention scores depend on relative positions only. The hot
path is ``mx.fast.rope``; ``rope_reference`` is the same rotation in basic ops.
Taught in notebook 03 (RoPE and attention).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def rope_reference(x: mx.array, offset: int, base: float, traditional: bool, scale: float = 1.0) -> mx.array:
    """Rotate feature pairs of x (B, H, L, D) by angle position * theta_i.

    theta_i = base^(-2i/D). ``traditional`` pairs features (0,1), (2,3), ...;
    otherwise feature i pairs with i + D/2 (the HF layout).
    """
    L, D = x.shape[-2], x.shape[-1]
    positions = (mx.arange(offset, offset + L, dtype=mx.float32) * scale)[:, None]  # (L, 1)
    inv_freq = base ** (-mx.arange(0, D, 2, dtype=mx.float32) / D)  # (D/2,)
    angles = positions * inv_freq  # (L, D/2)
    cos, sin = mx.cos(angles), mx.sin(angles)
    x32 = x.astype(mx.float32)
    if traditional:
        x1, x2 = x32[..., 0::2], x32[..., 1::2]  # (B, H, L, D/2) each
        out = mx.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)  # (B, H, L, D/2, 2)
        out = out.reshape(x.shape)
    else:
        x1, x2 = x32[..., : D // 2], x32[..., D // 2 :]
        out = mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return out.astype(x.dtype)


class RoPE(nn.Module):
    """Rotary position embedding with an explicit position offset (for the KV cache)."""

    def __init__(self, dims: int, traditional: bool, base: float, scale: float = 1.0):
        super().__init__()
        self.dims, self.traditional, self.base, self.scale = dims, traditional, base, scale

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        return mx.fast.rope(
            x, self.dims, traditional=self.traditional, base=self.base, scale=self.scale, offset=offset
        )

    def reference(self, x: mx.array, offset: int = 0) -> mx.array:
        return rope_reference(x, offset, self.base, self.traditional, self.scale)
