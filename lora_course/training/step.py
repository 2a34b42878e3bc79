"""One optimizer step, written once and compiled whole.

``make_step`` builds the functions the trainer compiles with ``mx.compile``: forward,
backward (``nn.value_and_grad``), gradient accumulation, the all-reduce across
data-parallel processes, normalization by the token count, clipping and the
optimizer update. ``enable_grad_checkpoint`` trades compute for memory by
recomputing each transformer block in the backward pass (``mx.checkpoint``;
Chen et al., 2016, "Training Deep Nets with Sublinear Memory Cost").
Taught in notebook 10.
"""

from __future__ import annotations

from collections.abc import Callable

from lora_course.tree import tree_flatten, tree_map

import mlx.core as mx
import mlx.nn as nn


def _global_norm(grads) -> mx.array:
    return mx.sqrt(sum(mx.sum(g.astype(mx.float32) ** 2) for _, g in tree_flatten(grads)))


def make_step(model, optimizer, loss_fn, grad_clip=None, world_size=1):
    """Two functions: ``accumulate(inputs, targets, mask, acc) -> acc`` for all but the last
    micro-batch, and ``update(inputs, targets, mask, acc) -> (loss, ntoks, grad_norm)``, which
    adds the last one, reduces over processes, normalizes, clips and applies the update."""

    def token_sum(model, inputs, targets, mask):
        value, n = loss_fn(model, inputs, targets, mask)
        # "+ 0" makes n a node of its own. A loss that computes mask.sum() twice (once for
        # its mean, once for ntoks) otherwise crashes mx.compile (mlx 0.32: "_Map_base::at").
        n = mx.stop_gradient(n.astype(mx.float32)) + 0
        return value * n, n  # differentiate the SUM of token losses

    value_and_grad = nn.value_and_grad(model, token_sum)

    def accumulate(inputs, targets, mask, acc):
        (lsum, n), grads = value_and_grad(model, inputs, targets, mask)
        if acc is not None:
            grads = tree_map(mx.add, grads, acc[0])
            lsum, n = lsum + acc[1], n + acc[2]
        return grads, lsum, n

    def update(inputs, targets, mask, acc):
        grads, lsum, n = accumulate(inputs, targets, mask, acc)
        if world_size > 1:
            grads = nn.average_gradients(grads)  # sum over processes / world_size
            lsum, n = mx.distributed.all_sum(mx.stack([lsum, n]))
            grads = tree_map(lambda g: g * (world_size / mx.maximum(n, 1)), grads)
        else:
            grads = tree_map(lambda g: g / mx.maximum(n, 1), grads)
        norm = _global_norm(grads)
        if grad_clip is not None:
            scale = mx.minimum(grad_clip / (norm + 1e-6), 1.0)
            grads = tree_map(lambda g: g * scale.astype(g.dtype), grads)
        optimizer.update(model, grads)
        return lsum / mx.maximum(n, 1), n, norm

    return accumulate, update


def _checkpointed(block_type):
    """A subclass of ``block_type`` whose forward is recomputed in the backward pass."""

    class Checkpointed(block_type):
        def __call__(self, x, cache=None, *args, **kwargs):
            if cache is not None:  # decoding: nothing to save memory on
                return super().__call__(x, cache, *args, **kwargs)

            def forward(params, x):
                self.update(params)
                return block_type.__call__(self, x, None, *args, **kwargs)

            return mx.checkpoint(forward)(self.trainable_parameters(), x)

    Checkpointed.__name__ = block_type.__name__
    return Checkpointed


def enable_grad_checkpoint(model) -> Callable[[], None]:
    """Recompute every block in the backward pass (``mx.checkpoint``); returns an undo."""
    originals = [(layer, type(layer)) for layer in model.layers]
    for layer, cls in originals:
        layer.__class__ = _checkpointed(cls)
    return lambda: [setattr(layer, "__class__", cls) for layer, cls in originals]
