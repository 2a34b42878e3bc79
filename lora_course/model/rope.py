"""Rotary position embeddings (Su et al., 2021, "RoFormer", arXiv:2104.09864).

RoPE rotates each pair of query/key features by an angle proportional to the
token's position, so attention scores depend on relative positions only. The hot
path is ``mx.fast.rope``; ``rope_reference`` is the same rotation in basic ops.

Two ways to stretch a model to longer contexts change only the frequencies:
``linear`` divides every position by a factor, and Llama 3.1's ``llama3`` scaling
(Meta, 2024, "The Llama 3 Herd of Models", arXiv:2407.21783) divides only the slow
frequencies, those whose wavelength is longer than the original context allows, with a
smooth blend in between (:func:`llama3_inv_freq`). Taught in notebook 03 (RoPE and
attention); checkpoints that use it in notebook 15.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn


def llama3_factors(dims: int, base: float, scaling: dict) -> list[float]:
    """What each inverse frequency base^(-2i/dims) is divided by under Llama 3.1's scaling.

    A frequency whose wavelength 2 pi / f fits the original context ``high_freq_factor``
    times is kept (factor 1); one whose wavelength exceeds the context / ``low_freq_factor``
    is divided by ``factor``; between the two, 1 / divisor blends linearly in
    context / wavelength. llama.cpp stores these divisors as the ``rope_freqs`` tensor.
    """
    factor, context = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    out = []
    for i in range(dims // 2):
        wavelength = 2 * math.pi * base ** (2 * i / dims)
        if wavelength < context / high:  # fast: rotates many times within the old context
            out.append(1.0)
        elif wavelength > context / low:  # slow: never completed a turn in training
            out.append(float(factor))
        else:
            smooth = (context / wavelength - low) / (high - low)  # 0 at the slow end, 1 at the fast
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return out


def llama3_inv_freq(dims: int, base: float, scaling: dict) -> list[float]:
    """Llama 3.1's inverse frequencies: base^(-2i/dims) / :func:`llama3_factors`."""
    factors = llama3_factors(dims, base, scaling)
    return [base ** (-2 * i / dims) / f for i, f in enumerate(factors)]


def inv_frequencies(dims: int, base: float, scaling: dict | None = None) -> list[float] | None:
    """The inverse frequencies a rope scaling needs spelled out, or None for plain base^(-2i/d)."""
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
    return llama3_inv_freq(dims, base, scaling) if kind == "llama3" else None


def rope_reference(
    x: mx.array,
    offset: int,
    base: float,
    traditional: bool,
    scale: float = 1.0,
    inv_freq: list[float] | None = None,
) -> mx.array:
    """Rotate feature pairs of x (B, H, L, D) by angle position * theta_i.

    theta_i = base^(-2i/D), or ``inv_freq[i]`` when given (Llama 3.1's scaling).
    ``traditional`` pairs features (0,1), (2,3), ...; otherwise feature i pairs with
    i + D/2 (the HF layout).
    """
    L, D = x.shape[-2], x.shape[-1]
    positions = (mx.arange(offset, offset + L, dtype=mx.float32) * scale)[:, None]  # (L, 1)
    if inv_freq is None:
        inv_freq = base ** (-mx.arange(0, D, 2, dtype=mx.float32) / D)  # (D/2,)
    angles = positions * mx.array(inv_freq, dtype=mx.float32)  # (L, D/2)
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
    """Rotary position embedding with an explicit position offset (for the KV cache).

    ``inv_freq`` replaces base^(-2i/dims) when a scaling (Llama 3.1's) sets each frequency.
    """

    def __init__(
        self,
        dims: int,
        traditional: bool,
        base: float,
        scale: float = 1.0,
        inv_freq: list[float] | None = None,
    ):
        super().__init__()
        self.dims, self.traditional, self.base, self.scale = dims, traditional, base, scale
        # "_": not parameters. mx.fast.rope takes the reciprocals (base^(2i/d) for plain RoPE).
        self._inv_freq = inv_freq
        self._freqs = None if inv_freq is None else 1.0 / mx.array(inv_freq, dtype=mx.float32)

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        base = None if self._freqs is not None else self.base
        return mx.fast.rope(
            x,
            self.dims,
            traditional=self.traditional,
            base=base,
            scale=self.scale,
            offset=offset,
            freqs=self._freqs,
        )

    def reference(self, x: mx.array, offset: int = 0) -> mx.array:
        return rope_reference(x, offset, self.base, self.traditional, self.scale, self._inv_freq)
