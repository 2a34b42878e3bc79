"""Causal self-attention with grouped-query heads and a KV cache.

Scaled dot-product attention (Vaswani et al., 2017) with RoPE on queries and keys and
grouped-query attention (Ainslie et al., 2023, arXiv:2305.13245): fewer key/value heads
than query heads, each serving a group. ``KVCache`` keeps past keys and values for
incremental decoding. The hot path is MLX's fused attention (through ``fastmath``);
``attention_reference`` is the same math in basic ops. Taught in notebook 03.
"""

from __future__ import annotations

from lora_course.model import fastmath
from lora_course.model.args import ModelArgs
from lora_course.model.rope import RoPE, inv_frequencies

import mlx.core as mx
import mlx.nn as nn


def causal_mask(q_len: int, k_len: int) -> mx.array:
    """Boolean (q_len, k_len): query i (at absolute position k_len - q_len + i) sees keys <= it."""
    q_pos = mx.arange(k_len - q_len, k_len)[:, None]
    return q_pos >= mx.arange(k_len)[None, :]


def sliding_window_mask(q_len: int, k_len: int, window: int) -> mx.array:
    """Causal, and each query sees only the last ``window`` keys, itself included (Mistral)."""
    q_pos = mx.arange(k_len - q_len, k_len)[:, None]  # (q_len, 1)
    k_pos = mx.arange(k_len)[None, :]  # (1, k_len)
    return (q_pos >= k_pos) & (q_pos - k_pos < window)


def attention_reference(
    q: mx.array, k: mx.array, v: mx.array, scale: float, causal: bool, window: int | None = None
) -> mx.array:
    """softmax(q k^T * scale + mask) v, with K/V heads repeated for GQA.

    q: (B, n_heads, Lq, D); k, v: (B, n_kv_heads, Lk, D). ``window``: Mistral's sliding
    window (applies to decoding one token after a long cache too).
    """
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:  # each K/V head serves n_rep query heads
        k = mx.repeat(k, n_rep, axis=1)  # (B, n_heads, Lk, D)
        v = mx.repeat(v, n_rep, axis=1)
    scores = (q * scale) @ k.swapaxes(-1, -2)  # (B, n_heads, Lq, Lk)
    if window is not None and k.shape[2] > window:
        mask = sliding_window_mask(q.shape[2], k.shape[2], window)
        scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
    elif causal:
        mask = causal_mask(q.shape[2], k.shape[2])
        scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
    weights = mx.softmax(scores.astype(mx.float32), axis=-1).astype(q.dtype)
    return weights @ v  # (B, n_heads, Lq, D)


class KVCache:
    """Keys and values of past positions, for incremental decoding.

    Storage grows in steps of ``step`` positions and is filled by slice assignment,
    so decoding one token does not copy the whole cache.
    """

    step = 256

    def __init__(self):
        self.keys = None  # (B, n_kv_heads, capacity, head_dim)
        self.values = None
        self.offset = 0  # number of positions stored

    def update(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        B, H, L, D = keys.shape
        if self.keys is None or self.offset + L > self.keys.shape[2]:
            n_new = ((L + self.step - 1) // self.step) * self.step
            grow_k = mx.zeros((B, H, n_new, D), keys.dtype)
            grow_v = mx.zeros((B, H, n_new, values.shape[-1]), values.dtype)
            if self.keys is None:
                self.keys, self.values = grow_k, grow_v
            else:
                self.keys = mx.concatenate([self.keys[..., : self.offset, :], grow_k], axis=2)
                self.values = mx.concatenate([self.values[..., : self.offset, :], grow_v], axis=2)
        self.keys[..., self.offset : self.offset + L, :] = keys
        self.values[..., self.offset : self.offset + L, :] = values
        self.offset += L
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]


class Attention(nn.Module):
    """Multi-head self-attention with RoPE, grouped-query heads and a KV cache."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.scale = self.head_dim**-0.5
        self.window = args.sliding_window  # None: every earlier key is visible
        qkv_bias = args.attention_bias or args.qkv_bias  # Qwen2: q/k/v only
        self.q_proj = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=args.attention_bias)
        rope_scale = 1.0 / args.rope_scaling["factor"] if args.rope_type == "linear" else 1.0
        inv_freq = inv_frequencies(self.head_dim, args.rope_theta, args.rope_scaling)  # llama3: per frequency
        self.rope = RoPE(self.head_dim, args.rope_traditional, args.rope_theta, rope_scale, inv_freq)

    def __call__(self, x: mx.array, cache: KVCache | None = None, reference: bool = False) -> mx.array:
        B, L, _ = x.shape
        # (B, L, n_heads * head_dim) -> (B, n_heads, L, head_dim)
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)

        offset = cache.offset if cache is not None else 0
        rope = self.rope.reference if reference else self.rope
        q, k = rope(q, offset), rope(k, offset)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, n_kv_heads, offset + L, head_dim)

        Lk = k.shape[2]
        if reference:
            out = attention_reference(q, k, v, self.scale, causal=L > 1, window=self.window)
        elif self.window is not None and Lk > self.window:  # keys beyond the window are hidden
            mask = sliding_window_mask(L, Lk, self.window)  # (L, Lk)
            out = fastmath.attention(q, k, v, self.scale, causal=False, mask=mask)
        else:  # mx.fast's kernel; on Linux x86 CPUs an exp-light equivalent (fastmath.py)
            out = fastmath.attention(q, k, v, self.scale, causal=L > 1)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)  # (B, L, n_heads * head_dim)
        return self.o_proj(out)
