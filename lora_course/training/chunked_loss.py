"""Chunked cross-entropy: the loss over a large vocabulary without the full logits.

The plain loss (``evaluate.loss``) builds the logits of every position at once:
(B*L, vocab) floats, in float32, and autodiff keeps them (and the softmax) for the
backward pass. For Llama 3.2 1B (vocab 128,256) at batch 2 x 512 that is 525 MB per
copy, more than the LoRA weights, activations and optimizer state together. Yet
the loss needs only one number per position:

    ce_i = logsumexp(h_i W^T) - (h_i W^T)[target_i]        h_i: (dim,), W: (vocab, dim)

so the positions can be taken a chunk at a time: run the transformer once to get the
hidden states h (``Model.hidden``), then for each chunk of positions compute its logits
with the head (``Model.head``), reduce them to a sum of masked token losses, and drop
them. Each chunk is wrapped in ``mx.checkpoint`` (Chen et al., 2016), so the backward
pass recomputes that chunk's logits instead of keeping them for it. The value and the gradients
are the plain loss's (``tests/training/test_chunked_loss.py``: tied, untied and quantized
heads), at the price of a second head GEMM per chunk in the backward pass.
Measured so far it saves less than it should: MLX evaluates the chunks' independent head
matmuls side by side rather than one chunk after another, so several chunks' logits are
alive at once (at the Llama-3.2-1B shape, batch 1 x 512: 46 MiB less peak; see
``benchmarks/README.md``, "Memory at the Llama-3.2-1B shape").
Apple's "Cut Your Losses in Large-Vocabulary Language Models" (Wijmans et al., 2024)
takes the same idea down to a fused kernel. Not yet taught in a notebook (notebook 11,
on making training go faster, is its home).
"""

from __future__ import annotations

from collections.abc import Callable

from lora_course.model.fastmath import cross_entropy
from lora_course.training.evaluate import loss

import mlx.core as mx
import mlx.nn as nn

CHUNKED_VOCAB = 32768  # from this vocabulary size up, the trainer's default loss is chunked
CHUNK_LOGITS = 2**24  # logits per chunk when the size is automatic: 64 MiB of float32


def auto_chunk_size(vocab_size: int) -> int:
    """Positions per chunk so that one chunk's logits are about CHUNK_LOGITS floats."""
    return max(16, CHUNK_LOGITS // vocab_size)


def chunked_cross_entropy(model: nn.Module, h: mx.array, targets: mx.array, mask: mx.array, chunk_size: int):
    """Sum over positions of mask * cross-entropy of ``model.head(h)``, a chunk at a time.

    h: (B, L, dim) hidden states; targets, mask: (B, L) -> a scalar (float32).
    """
    h = h.reshape(-1, h.shape[-1])  # (N, dim), N = B*L
    targets, mask = targets.reshape(-1), mask.reshape(-1).astype(mx.float32)  # (N,)
    layer = model.output_layer  # only its trainable parameters (usually none) get gradients

    def chunk_loss(params, h, targets, mask):
        layer.update(params)
        logits = model.head(h).astype(mx.float32)  # (chunk, vocab): the only logits alive
        # mx.checkpoint differentiates every input; the ids and the mask get none
        targets, mask = mx.stop_gradient(targets), mx.stop_gradient(mask)
        return (cross_entropy(logits, targets) * mask).sum()

    one_chunk = mx.checkpoint(chunk_loss)  # backward recomputes the chunk's logits
    cuts = list(range(chunk_size, h.shape[0], chunk_size))
    params = layer.trainable_parameters()
    parts = zip(mx.split(h, cuts), mx.split(targets, cuts), mx.split(mask, cuts))
    return sum(one_chunk(params, hc, tc, mc) for hc, tc, mc in parts)


def chunked_loss(chunk_size: int) -> Callable:
    """A loss ``(model, inputs, targets, mask) -> (loss, ntoks)`` equal to ``evaluate.loss``,
    computed ``chunk_size`` positions at a time; ``model`` needs ``hidden`` and ``head``."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be at least 1")

    def chunked(model: nn.Module, inputs: mx.array, targets: mx.array, mask: mx.array):
        h = model.hidden(inputs)  # (B, L, dim)
        ntoks = mask.sum()
        return chunked_cross_entropy(model, h, targets, mask, chunk_size) / mx.maximum(ntoks, 1), ntoks

    return chunked


def default_loss(model: nn.Module, chunk_size: int | None) -> Callable:
    """The trainer's loss: chunked for a vocabulary of at least CHUNKED_VOCAB entries (or
    when ``chunk_size`` is given), the plain one otherwise or when ``chunk_size`` is 0."""
    vocab = getattr(getattr(model, "args", None), "vocab_size", 0) or 0
    can_chunk = hasattr(model, "hidden") and hasattr(model, "head") and hasattr(model, "output_layer")
    if not can_chunk or chunk_size == 0 or (chunk_size is None and vocab < CHUNKED_VOCAB):
        return loss
    return chunked_loss(chunk_size or auto_chunk_size(vocab))
