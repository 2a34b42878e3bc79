"""Chunked cross-entropy: the loss over a large vocabulary without the full logits.

The plain loss (``evaluate.loss``) builds the logits of every position at once:
(B*L, vocab) floats, in float32, and autodiff keeps them (and the softmax) for the
backward pass. For Llama 3.2 1B (vocab 128,256) at batch 1 x 512 that is 250 MiB per
copy, more than the LoRA weights and optimizer state together. Yet the loss needs only
one number per position,

    ce_i = logsumexp(z_i) - z_i[target_i]          z_i = head(h_i): (vocab,)

and its gradient has a closed form, d ce_i / d z_i = softmax(z_i) - onehot(target_i).
So we run the transformer once to the hidden states h (``Model.hidden``), then take the
positions a chunk at a time: compute the chunk's logits (``Model.head``), its loss, the
gradient of that loss with respect to the logits, and, right away, the gradient with
respect to the chunk's hidden states (and to the head's trainable weights, if any):
``mx.vjp(head, ...)``, a (chunk, vocab) @ (vocab, dim) product. Then the chunk's logits
are dropped; only (chunk, dim) floats are kept for the backward pass, which (an
``mx.custom_function``) just scales them by the incoming cotangent. This is the idea of
Apple's "Cut Your Losses in Large-Vocabulary Language Models" (Wijmans et al., 2024)
without the fused kernel. The head still costs two GEMMs, as in the plain loss.

Why not ``mx.checkpoint`` per chunk (recompute the logits in the backward pass)? Under
``mx.compile`` the recomputed product is the very same expression as the forward one, and
the compiler merges the two, so the forward logits of every chunk are kept after all.
Measured on the compiled LoRA step at the Llama-3.2-1B shape cut to 2 layers, batch
1 x 512, extra MLX peak over the weights: plain loss 1,249 MiB; ``mx.checkpoint`` chunks
1,240 MiB; these chunks 866 MiB at 261 positions. With today's attention and SwiGLU
(``model/fastmath.py``, which keep less per layer): plain 1,145 MiB, chunks of 130
positions (the automatic size, 64 MiB of logits) 670 MiB, at the plain loss's step time;
chunks of 64 positions save 160 MiB more but ran 10-40% slower. ``mx.depends`` chains
the chunks, so that a chunk starts only when the previous one's gradient is done and its
logits can be freed.

``chunked_loss(...).value_only`` is the same loss without the gradient work, which
``evaluate`` uses. Tested equal to the plain loss in value and gradients
(``tests/training/test_chunked_loss.py``: tied, untied, quantized and trainable heads).
"""

from __future__ import annotations

from collections.abc import Callable

from lora_course.model.fastmath import cross_entropy
from lora_course.quant.dequant import dequantize_after
from lora_course.training.evaluate import loss
from lora_course.tree import tree_flatten, tree_unflatten

import mlx.core as mx
import mlx.nn as nn

CHUNKED_VOCAB = 32768  # from this vocabulary size up, the trainer's default loss is chunked
CHUNK_LOGITS = 2**24  # logits per chunk when the size is automatic: 64 MiB of float32


def auto_chunk_size(vocab_size: int) -> int:
    """Positions per chunk so that one chunk's logits are about CHUNK_LOGITS floats."""
    return max(16, CHUNK_LOGITS // vocab_size)


def _head(model: nn.Module, names: list[str]) -> Callable:
    """``model.head`` as a function of (h, *trainable head arrays), for ``mx.vjp``."""
    layer = model.output_layer

    def head(h, *arrays):
        if arrays:
            layer.update(tree_unflatten(list(zip(names, arrays))))
        return model.head(h)

    return head


def _chunk(head: Callable, h, targets, mask, arrays):
    """One chunk: (sum of mask * cross-entropy, its gradient w.r.t. h, w.r.t. arrays)."""
    logits = head(h, *arrays)  # (n, vocab): the only logits alive
    z = logits.astype(mx.float32)
    lse = mx.logsumexp(z, axis=-1, keepdims=True)  # (n, 1)
    picked = mx.take_along_axis(z, targets[:, None], axis=-1)  # (n, 1): z[target]
    value = ((lse - picked)[:, 0] * mask).sum()
    # d ce / d z = softmax(z) - onehot(target), zero where the mask is
    dz = mx.put_along_axis(mx.exp(z - lse), targets[:, None], mx.exp(picked - lse) - 1, axis=-1)
    dz = (dz * mask[:, None]).astype(logits.dtype)
    _, (dh, *darrays) = mx.vjp(head, [h, *arrays], [dz])
    return value, dh, darrays


def chunked_cross_entropy(model: nn.Module, h: mx.array, targets: mx.array, mask: mx.array, chunk_size: int):
    """Sum over positions of mask * cross-entropy of ``model.head(h)``, a chunk at a time.

    h: (B, L, dim) hidden states; targets, mask: (B, L) -> a scalar (float32). Differentiable
    with respect to h and to the output layer's trainable parameters (usually none).
    """
    layer = model.output_layer
    flat = tree_flatten(layer.trainable_parameters())
    names, arrays = [k for k, _ in flat], [v for _, v in flat]
    head = _head(model, names)

    @mx.custom_function
    def fused(h, targets, mask, *arrays):
        flat_h = h.reshape(-1, h.shape[-1])  # (N, dim), N = B*L
        flat_t, flat_m = targets.reshape(-1), mask.reshape(-1).astype(mx.float32)
        total, dhs, dsums = mx.zeros((), mx.float32), [], None
        run = head
        w = None if arrays else dequantize_after(layer, flat_h)
        if w is not None:  # a frozen 4-bit head on CPU: de-quantized once per step, not per chunk
            bias = layer["bias"] if "bias" in layer else None
            same = layer["scales"].dtype  # the quantized head's output dtype: the input's if it matches

            def run(hc):
                y = hc.astype(mx.float32) @ w.T
                y = y.astype(hc.dtype if hc.dtype == same else mx.float32)
                return y if bias is None else y + bias

        for start in range(0, flat_h.shape[0], chunk_size):
            hc = flat_h[start : start + chunk_size]
            if dhs:  # one chunk after another: one chunk's logits (and head gradient) alive
                hc = mx.depends(hc, [dhs[-1], *dsums])
            cut = slice(start, start + chunk_size)
            value, dh, darrays = _chunk(run, hc, flat_t[cut], flat_m[cut], arrays)
            total, dhs = total + value, dhs + [dh]
            dsums = darrays if dsums is None else [a + b for a, b in zip(dsums, darrays)]
        if arrays:
            layer.update(tree_unflatten(list(zip(names, arrays))))  # undo head()'s update
        return (total, mx.concatenate(dhs).reshape(h.shape), *dsums)

    @fused.vjp
    def fused_vjp(primals, cotangents, outputs):
        c = cotangents[0]  # d(final loss) / d(this sum)
        _, dh, *darrays = outputs
        zeros = [mx.zeros_like(primals[1]), mx.zeros_like(primals[2])]  # ids and mask get none
        return (dh * c.astype(dh.dtype), *zeros, *[d * c.astype(d.dtype) for d in darrays])

    return fused(h, targets, mask, *arrays)[0]


def chunked_value(model: nn.Module, h: mx.array, targets: mx.array, mask: mx.array, chunk_size: int):
    """The same sum as ``chunked_cross_entropy``, without the gradient work (evaluation)."""
    h = h.reshape(-1, h.shape[-1])
    targets, mask = targets.reshape(-1), mask.reshape(-1).astype(mx.float32)
    cuts = [slice(s, s + chunk_size) for s in range(0, h.shape[0], chunk_size)]
    return sum((cross_entropy(model.head(h[c]), targets[c]) * mask[c]).sum() for c in cuts)


def chunked_loss(chunk_size: int) -> Callable:
    """A loss ``(model, inputs, targets, mask) -> (loss, ntoks)`` equal to ``evaluate.loss``,
    computed ``chunk_size`` positions at a time; ``model`` needs ``hidden`` and ``head``.
    Its ``value_only`` attribute is the same loss for evaluation (no gradient work)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be at least 1")

    def with_sum(sum_fn: Callable) -> Callable:
        def chunked(model: nn.Module, inputs: mx.array, targets: mx.array, mask: mx.array):
            h = model.hidden(inputs)  # (B, L, dim)
            ntoks = mask.sum()
            return sum_fn(model, h, targets, mask, chunk_size) / mx.maximum(ntoks, 1), ntoks

        return chunked

    chunked = with_sum(chunked_cross_entropy)
    chunked.value_only = with_sum(chunked_value)
    return chunked


def default_loss(model: nn.Module, chunk_size: int | None) -> Callable:
    """The trainer's loss: chunked for a vocabulary of at least CHUNKED_VOCAB entries (or
    when ``chunk_size`` is given), the plain one otherwise or when ``chunk_size`` is 0."""
    vocab = getattr(getattr(model, "args", None), "vocab_size", 0) or 0
    can_chunk = hasattr(model, "hidden") and hasattr(model, "head") and hasattr(model, "output_layer")
    if not can_chunk or chunk_size == 0 or (chunk_size is None and vocab < CHUNKED_VOCAB):
        return loss
    return chunked_loss(chunk_size or auto_chunk_size(vocab))
