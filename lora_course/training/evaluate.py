"""The loss and evaluation: token-weighted cross-entropy over masked positions.

Taught in notebook 10 (the training loop).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from lora_course.data.batching import iterate_batches
from lora_course.model.fastmath import cross_entropy

import mlx.core as mx
import mlx.nn as nn
import numpy as np


def loss(model: nn.Module, inputs: mx.array, targets: mx.array, mask: mx.array):
    """Mean cross-entropy over the tokens where ``mask`` is 1 -> (loss, ntoks).

    inputs, targets: (B, L) int32, targets = inputs shifted left by one;
    mask: (B, L), 0 on padding and on prompt tokens that carry no loss.
    """
    logits = model(inputs).astype(mx.float32)  # (B, L, V), float32 for a stable logsumexp
    ce = cross_entropy(logits, targets)  # (B, L): logsumexp(logits) - logits[target]; model/fastmath.py
    ntoks = mask.sum()
    return (ce * mask).sum() / mx.maximum(ntoks, 1), ntoks


def check_token_ids(dataset, vocab_size: int, what: str) -> None:
    """Every token id must index the embedding. MLX does not bounds-check that lookup, so
    an id >= vocab_size (data tokenized for another model) would read past the table:
    garbage losses, or a crash. One pass; ``max`` and ``min`` of a list run in C."""
    flat = getattr(dataset, "_tokens", None)  # a TokenizedDataset keeps every id in one array
    if isinstance(flat, np.ndarray) and (flat.size == 0 or (flat.min() >= 0 and flat.max() < vocab_size)):
        return
    for i in range(len(dataset)):
        item = dataset[i]
        tokens = item[0] if isinstance(item, tuple) else item
        if len(tokens) and not (0 <= min(tokens) and max(tokens) < vocab_size):
            bad = next(int(t) for t in tokens if not 0 <= t < vocab_size)
            raise ValueError(
                f"{getattr(dataset, 'path', None) or what}: sample {i} has token id {bad}, "
                f"outside the model's vocabulary (vocab_size={vocab_size}); was it "
                "tokenized with another model's tokenizer?"
            )


def evaluate(
    model: nn.Module,
    dataset,
    batch_size: int,
    num_batches: int = -1,
    max_seq_length: int = 2048,
    loss_fn: Callable = loss,
) -> tuple[float, float]:
    """Token-weighted mean loss over ``num_batches`` batches (-1: all) -> (loss, perplexity).

    The batches come in a fixed shuffled order (seed 0), so the first ``num_batches`` are a
    fair sample of lengths rather than the shortest examples, and the same ones every time.
    """
    if dataset is None or len(dataset) == 0:
        raise ValueError("evaluate: the dataset is empty")
    loss_fn = getattr(loss_fn, "value_only", loss_fn)  # a training loss's cheaper twin
    if getattr(getattr(model, "args", None), "vocab_size", None):
        check_token_ids(dataset, model.args.vocab_size, "evaluate: the dataset")
    world = mx.distributed.init()
    was_training = model.training
    model.eval()
    total, ntoks = mx.array(0.0), mx.array(0.0)
    batches = iterate_batches(
        dataset,
        batch_size,
        max_seq_length,
        shuffle=True,
        rank=world.rank(),
        world_size=world.size(),
        limit=None if num_batches < 0 else num_batches,
    )
    for batch in batches:
        value, n = loss_fn(model, *batch)
        total, ntoks = total + value * n, ntoks + n
        mx.eval(total, ntoks)
    model.train(was_training)
    if world.size() > 1:
        total, ntoks = mx.distributed.all_sum(mx.stack([total, ntoks]), stream=mx.cpu)
    if ntoks.item() == 0:
        raise ValueError("evaluate: no token in the evaluated batches carries loss (check the mask)")
    mean = (total / ntoks).item()
    return mean, math.exp(min(mean, 700.0))
