"""Batches for causal-LM training: length-sorted buckets, small padding, a replayable order.

Padding every example to the longest in the *dataset* wastes most of the compute on
short examples. Sorting by length and cutting the sorted list into batches keeps the
examples of a batch alike in length, so each batch is padded only to its own longest
member. The batch *order* is then shuffled, so training still sees lengths mixed
over time. The shuffle is a pure function of (seed, epoch), so a resumed run replays
exactly the same batches. Notebook 09 plots the padding this saves; notebook 10
uses it in the training loop.
"""

from __future__ import annotations

import warnings

import mlx.core as mx
import numpy as np


def _tokens_and_mask(item):
    # A dataset item is (tokens, mask | None); a bare token list is accepted too.
    if isinstance(item, tuple) and len(item) == 2:
        return item
    return item, None


def iterate_batches(
    dataset,
    batch_size: int,
    max_seq_length: int = 2048,
    train: bool = False,
    seed: int = 0,
    epoch: int = 0,
    start: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pad_multiple: int = 8,
    shuffle: bool | None = None,
    limit: int | None = None,
):
    """Yield ``(inputs, targets, mask)`` batches, each ``(B, L)``, from a tokenized dataset.

    Examples are sorted by length and cut into batches, so a batch holds similar
    lengths and is padded only to its longest member (rounded up to ``pad_multiple``,
    which bounds how many shapes ``mx.compile`` sees). With ``train=True`` the batch
    order is shuffled and the ``len % batch_size`` left-over examples are dropped, both
    drawn from ``(seed, epoch)`` alone: epoch e is the same wherever it is replayed,
    which is what exact resume needs. Without ``train`` every example is kept and the
    order is by length, unless ``shuffle`` (then a subset of batches is a fair sample of
    lengths, which is how ``evaluate`` takes ``val_batches`` of them). ``start`` skips
    that many batches and ``limit`` stops after that many; ``rank`` and ``world_size``
    select this process's rows of each batch.
    """
    n = len(dataset)
    if train and batch_size > n:
        raise ValueError(
            f"batch_size={batch_size} is larger than the training set ({n} examples); "
            f"use a batch size of at most {n} or add data"
        )
    if train and batch_size % world_size:
        raise ValueError(f"batch_size={batch_size} must be divisible by the {world_size} processes")
    lengths = getattr(dataset, "lengths", None)  # TokenizedDataset keeps them; no need to read samples
    if lengths is None:
        lengths = [len(_tokens_and_mask(dataset[i])[0]) for i in range(n)]
    lengths = np.asarray(lengths)
    if (lengths > max_seq_length).any():
        warnings.warn(
            f"{int((lengths > max_seq_length).sum())} of {n} examples are longer than "
            f"max_seq_length={max_seq_length} tokens and are truncated",
            stacklevel=2,
        )
    if train:
        rng = np.random.default_rng([seed, epoch])
        keep = rng.permutation(n)[: n - n % batch_size]  # a random remainder is left out
        order = keep[np.argsort(lengths[keep], kind="stable")]  # by length; ties in random order
        batches = order.reshape(-1, batch_size)[rng.permutation(n // batch_size)]
    else:
        order = np.argsort(lengths, kind="stable")
        batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
        if shuffle:
            batches = [batches[i] for i in np.random.default_rng([seed, epoch]).permutation(len(batches))]
    stop = None if limit is None else start + limit
    for rows in batches[start:stop]:
        mine = np.array_split(rows, world_size)[rank]
        if len(mine):
            yield _collate([_tokens_and_mask(dataset[int(i)]) for i in mine], max_seq_length, pad_multiple)


def _collate(items, max_seq_length: int, pad_multiple: int):
    lengths = [min(len(t), max_seq_length) for t, _ in items]
    width = max(max(lengths) - 1, 1)  # inputs drop the last token
    width = min(-(-width // pad_multiple) * pad_multiple, max_seq_length)
    tokens = np.zeros((len(items), width + 1), np.int32)  # pad id 0; padding carries no loss
    mask = np.zeros((len(items), width), np.float32)
    for j, ((toks, m), n) in enumerate(zip(items, lengths)):
        tokens[j, :n] = toks[:n]
        # target j is token j+1, so the target mask is the sample mask shifted by one
        mask[j, : n - 1] = 1.0 if m is None else np.asarray(m[1:n], np.float32)
    return mx.array(tokens[:, :-1]), mx.array(tokens[:, 1:]), mx.array(mask)
