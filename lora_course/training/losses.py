"""Distillation losses: match a student's next-token distribution to a teacher's.

Knowledge distillation (Hinton, Vinyals & Dean, 2015) trains the student on the
teacher's soft probabilities instead of (or besides) the one-hot next token. With
temperature T both distributions are softened, p = softmax(teacher / T) and
q = softmax(student / T), and the loss is multiplied by T^2 so its gradient keeps the
same scale as T changes. Per position, over the vocabulary:

    KL(p || q) = sum_v p_v (log p_v - log q_v)
    JS(p, q)   = 1/2 KL(p || m) + 1/2 KL(q || m),   m = (p + q) / 2

KL is the classic choice; JS (Jensen-Shannon) is symmetric and bounded by log 2,
which keeps early training stable when the two models disagree a lot. Everything
is computed in float32 from log-softmax values, never from raw probabilities, so
tiny probabilities do not underflow. ``tests/training/test_losses.py`` checks both against
NumPy. Taught in notebook 10.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn


def _log_softmax(logits: mx.array, temperature: float) -> mx.array:
    x = logits.astype(mx.float32) / temperature
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def _reduce(per_position: mx.array, mask: mx.array | None, reduction: str) -> mx.array:
    if mask is not None:
        per_position = per_position * mask
    if reduction == "none":
        return per_position  # (B, L)
    if reduction == "sum":
        return per_position.sum()
    if reduction == "mean":
        count = mask.sum() if mask is not None else per_position.size
        return per_position.sum() / mx.maximum(count, 1)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', not {reduction!r}")


def kl_div_loss(
    student_logits: mx.array,
    teacher_logits: mx.array,
    temperature: float = 1.0,
    mask: mx.array | None = None,
    reduction: str = "mean",
) -> mx.array:
    """T^2 * KL(teacher || student) per position; logits (..., V), mask (...) of 0/1.

    ``reduction="mean"`` averages over the positions where ``mask`` is 1 (all if None).
    """
    log_q = _log_softmax(student_logits, temperature)  # (..., V)
    log_p = _log_softmax(teacher_logits, temperature)
    kl = (mx.exp(log_p) * (log_p - log_q)).sum(axis=-1)  # (...)
    return _reduce(kl * temperature**2, mask, reduction)


def js_div_loss(
    student_logits: mx.array,
    teacher_logits: mx.array,
    temperature: float = 1.0,
    mask: mx.array | None = None,
    reduction: str = "mean",
) -> mx.array:
    """T^2 * Jensen-Shannon divergence between teacher and student, per position."""
    log_q = _log_softmax(student_logits, temperature)  # (..., V)
    log_p = _log_softmax(teacher_logits, temperature)
    log_m = mx.logaddexp(log_p, log_q) - math.log(2.0)  # log((p + q) / 2)
    kl_pm = (mx.exp(log_p) * (log_p - log_m)).sum(axis=-1)
    kl_qm = (mx.exp(log_q) * (log_q - log_m)).sum(axis=-1)
    return _reduce(0.5 * (kl_pm + kl_qm) * temperature**2, mask, reduction)


DIVERGENCES = {"kl": kl_div_loss, "js": js_div_loss}


def distillation_loss(
    teacher: nn.Module, kind: str = "kl", temperature: float = 1.0, ce_weight: float = 0.0
) -> Callable:
    """A training loss ``(model, inputs, targets, mask) -> (loss, ntoks)`` that pulls the
    model toward ``teacher``'s distribution: ``(1 - ce_weight) * divergence +
    ce_weight * cross-entropy``. Pass it as ``train(..., loss_fn=...)``, or give
    ``train`` a ``teacher=`` and it builds this for you."""
    if kind not in DIVERGENCES:
        raise ValueError(f"distill: unknown divergence {kind!r}; choose 'kl' or 'js'")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    divergence = DIVERGENCES[kind]
    teacher.eval()  # no dropout in the teacher

    def loss_fn(model, inputs, targets, mask):
        logits = model(inputs)  # (B, L, V)
        target_logits = mx.stop_gradient(teacher(inputs))  # (B, L, V_teacher)
        if target_logits.shape[-1] != logits.shape[-1]:
            raise ValueError(
                f"distillation: the teacher has {target_logits.shape[-1]} vocabulary entries and the "
                f"student {logits.shape[-1]}; they must share a tokenizer"
            )
        per_position = divergence(logits, target_logits, temperature, reduction="none")  # (B, L)
        if ce_weight:
            ce = nn.losses.cross_entropy(logits.astype(mx.float32), targets)  # (B, L)
            per_position = (1 - ce_weight) * per_position + ce_weight * ce
        ntoks = mask.sum()
        return (per_position * mask).sum() / mx.maximum(ntoks, 1), ntoks

    return loss_fn
