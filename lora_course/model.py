"""The Llama / Mistral transformer, written to be read.

A decoder-only transformer (Vaswani et al., 2017) with the Llama changes
(Touvron et al., 2023): RMSNorm before each sub-layer (Zhang & Sennrich, 2019),
rotary position embeddings (Su et al., 2021), grouped-query attention
(Ainslie et al., 2023) and a SwiGLU feed-forward (Shazeer, 2020).

Every layer has two paths that must agree (tests/test_model.py proves it):
the hot path calls MLX's fused kernels (``mx.fast.rms_norm``, ``mx.fast.rope``,
``mx.fast.scaled_dot_product_attention``), and a ``*_reference`` function spells
out the same math with basic ``mx`` ops, for reading.

Module and parameter names follow the Hugging Face / mlx-lm Llama layout
(``model.layers.N.self_attn.q_proj`` ...), so checkpoints and adapters map onto
this tree one to one. Taught in notebooks 02 (normalization) and 03 (attention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from lora_course import fastmath


@dataclass
class ModelArgs:
    dim: int = 4096  # width of the residual stream (HF: hidden_size)
    n_layers: int = 32  # number of transformer blocks (HF: num_hidden_layers)
    head_dim: int | None = None  # width of one attention head; None means dim // n_heads
    hidden_dim: int = 11008  # inner width of the SwiGLU feed-forward (HF: intermediate_size)
    n_heads: int = 32  # query heads (HF: num_attention_heads)
    n_kv_heads: int | None = None  # key/value heads; fewer than n_heads is GQA; None means n_heads
    norm_eps: float = 1e-5  # epsilon inside RMSNorm (HF: rms_norm_eps)
    vocab_size: int = 32000  # number of token ids
    rope_theta: float = 10000.0  # RoPE base: wavelengths grow as theta^(2i/d)
    rope_traditional: bool = False  # True: rotate interleaved pairs (Meta); False: halves (HF)
    rope_scaling: dict | None = None  # {"type": "linear", "factor": f} stretches positions by f
    tie_word_embeddings: bool = False  # reuse embed_tokens as the output head
    attention_bias: bool = False  # biases on q/k/v/o projections (some fine-tunes use them)
    mlp_bias: bool = False  # biases on gate/up/down projections
    max_position_embeddings: int = 4096  # context length the model was trained for
    model_type: str = "llama"  # "llama" or "mistral"; both use this same architecture
    quantization: dict | None = None  # {"group_size": g, "bits": b} once quantized

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelArgs: n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind not in ("linear", "default"):
                raise ValueError(
                    f"ModelArgs: rope_scaling type {kind!r} is not supported "
                    "(only 'linear'); remove it from config.json to load without scaling"
                )

    # HF config.json and Meta params.json spell some fields differently.
    _ALIASES = {
        "hidden_size": "dim",
        "num_hidden_layers": "n_layers",
        "intermediate_size": "hidden_dim",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "rms_norm_eps": "norm_eps",
    }

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "ModelArgs":
        """Build from an HF ``config.json`` dict, a Meta ``params.json`` dict, or our own
        ``asdict``. Unknown keys are ignored."""
        config = dict(config)
        rope = config.get("rope_parameters") or {}
        if "rope_theta" not in config and "rope_theta" in rope:
            config["rope_theta"] = rope["rope_theta"]
        if config.get("rope_scaling") is None and rope.get("rope_type") not in (None, "default"):
            config["rope_scaling"] = rope
        known = {f.name for f in fields(cls)}
        kwargs = {}
        for key, value in config.items():
            name = cls._ALIASES.get(key, key)
            if name in known and value is not None:
                kwargs[name] = value
        if "hidden_dim" not in kwargs and "multiple_of" in config and "dim" in kwargs:
            kwargs["hidden_dim"] = _meta_hidden_dim(
                kwargs["dim"], config["multiple_of"], config.get("ffn_dim_multiplier")
            )
        if "model_type" not in config and "dim" in config and "n_layers" in config:
            # A Meta params.json: its weights rotate interleaved pairs.
            kwargs.setdefault("rope_traditional", True)
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """The equivalent Hugging Face ``config.json`` (LlamaForCausalLM / MistralForCausalLM)."""
        arch = "MistralForCausalLM" if self.model_type == "mistral" else "LlamaForCausalLM"
        d = {
            "architectures": [arch],
            "model_type": self.model_type,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "intermediate_size": self.hidden_dim,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.norm_eps,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
        }
        if self.quantization:
            d["quantization"] = dict(self.quantization)
        return d


def _meta_hidden_dim(dim: int, multiple_of: int, multiplier: float | None) -> int:
    # Meta's params.json gives the FFN width as a recipe, not a number.
    hidden = int(2 * (4 * dim) / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# ----------------------------------------------------------------------------- RMSNorm


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


# ----------------------------------------------------------------------------- RoPE


def rope_reference(
    x: mx.array, offset: int, base: float, traditional: bool, scale: float = 1.0
) -> mx.array:
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


# ----------------------------------------------------------------------------- attention


def causal_mask(q_len: int, k_len: int) -> mx.array:
    """Boolean (q_len, k_len): query i (at absolute position k_len - q_len + i) sees keys <= it."""
    q_pos = mx.arange(k_len - q_len, k_len)[:, None]
    return q_pos >= mx.arange(k_len)[None, :]


def attention_reference(
    q: mx.array, k: mx.array, v: mx.array, scale: float, causal: bool
) -> mx.array:
    """softmax(q k^T * scale + mask) v, with K/V heads repeated for GQA.

    q: (B, n_heads, Lq, D); k, v: (B, n_kv_heads, Lk, D).
    """
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:  # each K/V head serves n_rep query heads
        k = mx.repeat(k, n_rep, axis=1)  # (B, n_heads, Lk, D)
        v = mx.repeat(v, n_rep, axis=1)
    scores = (q * scale) @ k.swapaxes(-1, -2)  # (B, n_heads, Lq, Lk)
    if causal:
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
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=bias)
        rope_scale = 1.0
        if args.rope_scaling and args.rope_scaling.get("type", args.rope_scaling.get("rope_type")) == "linear":
            rope_scale = 1.0 / args.rope_scaling["factor"]
        self.rope = RoPE(self.head_dim, args.rope_traditional, args.rope_theta, rope_scale)

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

        if reference:
            out = attention_reference(q, k, v, self.scale, causal=L > 1)
        else:  # mx.fast's kernel; on Linux x86 CPUs an exp-light equivalent (fastmath.py)
            out = fastmath.attention(q, k, v, self.scale, causal=L > 1)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)  # (B, L, n_heads * head_dim)
        return self.o_proj(out)


# ----------------------------------------------------------------------------- feed-forward


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=args.mlp_bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(fastmath.silu(self.gate_proj(x)) * self.up_proj(x))  # nn.silu, faster on CPU


# ----------------------------------------------------------------------------- the model


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = FeedForward(args)
        self.input_layernorm = RMSNorm(args.dim, eps=args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.dim, eps=args.norm_eps)

    def __call__(self, x: mx.array, cache: KVCache | None = None, reference: bool = False) -> mx.array:
        norm1 = self.input_layernorm.reference if reference else self.input_layernorm
        norm2 = self.post_attention_layernorm.reference if reference else self.post_attention_layernorm
        h = x + self.self_attn(norm1(x), cache, reference)
        return h + self.mlp(norm2(h))


class Transformer(nn.Module):
    """Token embeddings, the blocks and the final norm (HF's ``model`` submodule)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = [TransformerBlock(args) for _ in range(args.n_layers)]
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)

    def __call__(self, tokens: mx.array, cache=None, reference: bool = False) -> mx.array:
        h = self.embed_tokens(tokens)  # (B, L) -> (B, L, dim)
        cache = cache or [None] * len(self.layers)
        for layer, c in zip(self.layers, cache):
            h = layer(h, c, reference)
        return self.norm.reference(h) if reference else self.norm(h)


class Model(nn.Module):
    """A causal language model: ``Model(args)(tokens, cache=None) -> logits``."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Transformer(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)

    def __call__(
        self, tokens: mx.array, cache: list[KVCache] | None = None, reference: bool = False
    ) -> mx.array:
        h = self.model(tokens, cache, reference)  # (B, L, dim)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)  # (B, L, vocab)
        return self.lm_head(h)  # (B, L, vocab)

    @property
    def layers(self) -> list[TransformerBlock]:
        return self.model.layers


def make_cache(model: Model) -> list[KVCache]:
    """One empty KV cache per block."""
    return [KVCache() for _ in model.layers]

