"""The Llama / Mistral transformer, written to be read.

A decoder-only transformer (Vaswani et al., 2017) with the Llama changes
(Touvron et al., 2023): RMSNorm before each sub-layer (Zhang & Sennrich, 2019),
rotary position embeddings (Su et al., 2021), grouped-query attention
(Ainslie et al., 2023) and a SwiGLU feed-forward (Shazeer, 2020).

The parts live one module each (``norm``, ``rope``,
``attention``); this module has the SwiGLU feed-forward and assembles them. Every
layer has two paths that must agree (tests/model/test_transformer.py proves it):
the hot path calls MLX's fused kernels (``mx.fast.rms_norm``, ``mx.fast.rope``,
``mx.fast.scaled_dot_product_attention``), and a ``*_reference`` function spells
out the same math with basic ``mx`` ops, for reading.

Module and parameter names follow the Hugging Face / mlx-lm Llama layout
(``model.layers.N.self_attn.q_proj`` ...), so checkpoints and adapters map onto
this tree one to one. Taught in notebooks 02 (normalization) and 03 (attention).
"""

from __future__ import annotations

from lora_course.model import fastmath
from lora_course.model.args import ModelArgs
from lora_course.model.attention import Attention, KVCache
from lora_course.model.norm import RMSNorm

import mlx.core as mx
import mlx.nn as nn


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=args.mlp_bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(fastmath.swiglu(self.gate_proj(x), self.up_proj(x)))  # silu(gate) * up


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
        return self.head(self.hidden(tokens, cache, reference))  # (B, L, vocab)

    def hidden(self, tokens: mx.array, cache: list[KVCache] | None = None, reference: bool = False):
        """Everything but the output head: (B, L) token ids -> (B, L, dim) final hidden states.
        A loss over a large vocabulary can then apply ``head`` a chunk at a time."""
        return self.model(tokens, cache, reference)

    @property
    def output_layer(self) -> nn.Module:
        """The module holding the head's weight: ``lm_head``, or the embedding when tied."""
        return self.model.embed_tokens if self.args.tie_word_embeddings else self.lm_head

    def head(self, h: mx.array) -> mx.array:
        """The output projection, (..., dim) -> (..., vocab) logits."""
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)  # h @ embed_tokens.weight^T
        return self.lm_head(h)

    @property
    def layers(self) -> list[TransformerBlock]:
        return self.model.layers


def make_cache(model: Model) -> list[KVCache]:
    """One empty KV cache per block."""
    return [KVCache() for _ in model.layers]
