"""exp, sigmoid, SiLU, softmax and cross-entropy that run fast on MLX's Linux x86 CPU build.

The ``mlx[cpu]`` wheel for Linux x86-64 is compiled for the baseline instruction set,
so ``mx.exp`` runs its polynomial one element at a time and each of its six fused
multiply-adds is a call into libm. Measured on one core of our 2-core machine: about
10 ns per element, 20x slower than numpy's exp. Every softmax, ``logsumexp`` (the
cross-entropy over the vocabulary) and sigmoid (SiLU in the feed-forward) pays it;
in a small LoRA training step these took a third of the time.

libm's ``powf`` is fast, and MLX's ``mx.power`` calls it. Since

    e**x = 2**(x * log2(e))

``mx.power(2.0, x * LOG2E)`` is exp at about 3x the speed, and MLX fuses it with the
surrounding element-wise ops under ``mx.compile``. Its accuracy is MLX's own: ``mx.exp``
multiplies by log2(e) in float32 too (max relative difference ~1e-7, tested), and
``2**-inf = 0``, ``2**inf = inf`` and NaN behave like exp. The functions below build
softmax, logsumexp, sigmoid, SiLU, cross-entropy and attention on it. Sigmoid, SiLU and
softmax have hand-written gradients that keep what MLX's own ops keep (so no extra
memory) and recompute no exponential; logsumexp's autodiff reuses the forward's powers.

Two functions keep less for the backward pass than autodiff would, and recompute
instead: ``swiglu`` keeps only its two inputs (``silu`` times ``up`` keeps two
hidden-width matrices more) and recomputes the sigmoid; ``attention`` keeps each row's
logsumexp instead of the (Lq, Lk) probabilities and recomputes them (one more small
matmul and exponential per score). Measured on the compiled LoRA step at the
Llama-3.2-1B shape (batch 1 x 512): 139 MiB of activations per layer before, 111 MiB
with the attention, 79 MiB with both.

The fast path is used only where it is faster: the CPU device on Linux x86-64. On
macOS (Accelerate / NEON) and on GPUs each function is the MLX op it replaces, which
is also its plain reference (``tests/model/test_fastmath.py`` checks the two agree). Set
``LORA_COURSE_FAST_MATH=0`` to turn it off, ``=1`` to force it on.
Measured in ``benchmarks/`` (see its README); not yet taught in a notebook (notebook 11,
on making training go faster, is its natural home).
"""

from __future__ import annotations

import os
import platform
import sys

import mlx.core as mx
import mlx.nn as nn

LOG2E = 1.4426950408889634  # log2(e) = 1 / ln(2)
ENV = "LORA_COURSE_FAST_MATH"
# Below this many elements the exponentials cost less than the extra ops of the fast path
# (decoding one token: SiLU over one row, attention of one query), so MLX's op is used.
SMALL = 16384
_X86_LINUX = sys.platform.startswith("linux") and platform.machine().lower() in ("x86_64", "amd64")


def enabled() -> bool:
    """True where the pow-based path is the faster one (CPU device, Linux x86-64)."""
    flag = os.environ.get(ENV, "")
    if flag in ("0", "1"):
        return flag == "1"
    return _X86_LINUX and mx.default_device() == mx.cpu


def _f32(x: mx.array) -> mx.array:
    # Half-precision inputs are computed in float32, as MLX's own kernels do.
    return x if x.dtype == mx.float32 else x.astype(mx.float32)


def exp(x: mx.array) -> mx.array:
    """e**x, computed as 2**(x * log2 e) on the fast path."""
    if not enabled():
        return mx.exp(x)
    return mx.power(2.0, _f32(x) * LOG2E).astype(x.dtype)


def _sigmoid32(x: mx.array) -> mx.array:
    # Below x = -80, e**-x would overflow float32 (and a gradient through 1 / (1 + inf) is
    # inf / inf = NaN); sigmoid(-80) is already 2e-35, so clamping there changes nothing
    # visible. One chain of single-use ops, so mx.compile fuses it into one loop.
    return 1.0 / (1.0 + mx.power(2.0, mx.maximum(x, -80.0) * -LOG2E))


# The custom gradients below keep exactly what MLX's own ops keep for their backward pass
# (sigmoid: its output; SiLU: x and sigmoid(x); softmax: its output), so the fast path
# costs no extra memory. Plain autodiff would also keep the powers and the sums.


@mx.custom_function
def _sigmoid(x):
    return _sigmoid32(x)


@_sigmoid.vjp
def _sigmoid_vjp(x, g, s):
    return g * s * (1.0 - s)  # d sigmoid / dx = s (1 - s)


@mx.custom_function
def _silu(x):
    s = _sigmoid32(x)
    return x * s, s  # the second output is kept for the backward pass


@_silu.vjp
def _silu_vjp(x, cotangents, outputs):
    s = outputs[1]
    return cotangents[0] * s * (1.0 + x * (1.0 - s))  # d (x s) / dx = s + x s (1 - s)


@mx.custom_function
def _softmax_last(x):
    e = mx.power(2.0, (x - mx.max(x, axis=-1, keepdims=True)) * LOG2E)  # shifted: nothing overflows
    return e / mx.sum(e, axis=-1, keepdims=True)


@_softmax_last.vjp
def _softmax_last_vjp(x, g, p):
    return p * (g - mx.sum(g * p, axis=-1, keepdims=True))  # the softmax Jacobian applied to g


def sigmoid(x: mx.array) -> mx.array:
    """1 / (1 + e**-x)."""
    if not enabled():
        return mx.sigmoid(x)
    return _sigmoid(_f32(x)).astype(x.dtype)


def silu(x: mx.array) -> mx.array:
    """x * sigmoid(x), the gate of a SwiGLU feed-forward."""
    if not enabled() or x.size < SMALL:
        return nn.silu(x)
    return _silu(_f32(x))[0].astype(x.dtype)


# SwiGLU's product keeping only its two inputs for the backward pass, where the sigmoid is
# recomputed. fastmath.silu(gate) * up keeps gate, sigmoid(gate), silu(gate) and up: two
# hidden-width matrices more per layer (32 MiB each in a 1B model's layer at 512 tokens).


@mx.custom_function
def _swiglu(gate, up):
    return gate * _sigmoid32(gate) * up


@_swiglu.vjp
def _swiglu_vjp(primals, d_out, out):
    gate, up = mx.depends(list(primals), [d_out])  # recompute in the backward pass (see _attend_vjp)
    s = _sigmoid32(gate)
    d_silu = s * (1.0 + gate * (1.0 - s))  # d (gate s) / d gate
    return d_out * up * d_silu, d_out * gate * s


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up, SwiGLU's product (Shazeer, 2020); on the fast path it keeps only
    gate and up for the backward pass."""
    if not enabled() or gate.size < SMALL:  # mx.compile fuses MLX's own ops well enough
        return nn.silu(gate) * up
    return _swiglu(_f32(gate), _f32(up)).astype(gate.dtype if gate.dtype == up.dtype else mx.float32)


def softmax(x: mx.array, axis: int = -1) -> mx.array:
    """e**x / sum(e**x) along ``axis``, shifted by the max so nothing overflows."""
    if not enabled():
        return mx.softmax(x, axis=axis, precise=True)
    x32 = _f32(x)
    if axis in (-1, x.ndim - 1):
        return _softmax_last(x32).astype(x.dtype)
    return _softmax_last(x32.swapaxes(axis, -1)).swapaxes(axis, -1).astype(x.dtype)


def logsumexp(x: mx.array, axis: int = -1, keepdims: bool = False) -> mx.array:
    """log(sum(e**x)) along ``axis``, computed stably as m + log(sum(e**(x - m)))."""
    if not enabled():
        return mx.logsumexp(x, axis=axis, keepdims=keepdims)
    x32 = _f32(x)
    m = mx.stop_gradient(mx.max(x32, axis=axis, keepdims=True))
    out = m + mx.log(mx.sum(exp(x32 - m), axis=axis, keepdims=True))
    return out if keepdims else out.squeeze(axis)


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Per-position cross-entropy: logsumexp(logits) - logits[target], in float32.

    logits: (..., V); targets: (...) integer class ids -> (...). Equal to
    ``nn.losses.cross_entropy(logits, targets)`` (reduction "none").
    """
    if not enabled():
        return nn.losses.cross_entropy(logits.astype(mx.float32), targets)
    logits = _f32(logits)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)  # (...)
    return logsumexp(logits, axis=-1) - picked


def attention(
    q: mx.array, k: mx.array, v: mx.array, scale: float, causal: bool, mask: mx.array | None = None
) -> mx.array:
    """softmax(q k^T * scale + causal mask) v with grouped-query heads, no K/V copies.

    q: (B, n_heads, Lq, D); k, v: (B, n_kv_heads, Lk, D) -> (B, n_heads, Lq, D).
    With ``causal``, query i sits at absolute position Lk - Lq + i (a KV cache
    holds the earlier ones) and sees keys up to it. ``mask``: a boolean (Lq, Lk) of
    visible keys instead (a sliding window). ``mx.fast.scaled_dot_product_attention``
    off the fast path.
    """
    if not enabled() or q.shape[2] * k.shape[2] * q.shape[1] < SMALL:  # e.g. decoding one token
        if mask is None and causal:
            mask = "causal"
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if mask is None and causal:  # query i sees keys up to its absolute position
        mask = mx.arange(Lk - Lq, Lk)[:, None] >= mx.arange(Lk)[None, :]  # (Lq, Lk)
    elif mask is None:
        mask = mx.ones((Lq, Lk), mx.bool_)
    q = (_f32(q) * scale).reshape(B, Hkv, H // Hkv, Lq, D)  # each K/V head serves H / Hkv query heads
    out, _ = _attend(q, _f32(k)[:, :, None], _f32(v)[:, :, None], mask)  # (B, Hkv, H/Hkv, Lq, D)
    return out.reshape(B, H, Lq, D).astype(v.dtype)


# Attention that keeps no (Lq, Lk) matrix for the backward pass. Plain autodiff keeps the
# softmax's probabilities, heads x Lq x Lk floats per layer: 32 MiB in each of a 1B
# model's 16 layers at 512 tokens, more than any other activation. Here the forward keeps
# only each row's logsumexp, and the backward recomputes the probabilities from q and k
# (one more small matmul and one exp per score), the recomputation of FlashAttention
# (Dao et al., 2022, arXiv:2205.14135) without its tiling.


def _scores(q, k, visible):
    return mx.where(visible, q @ k.swapaxes(-1, -2), -mx.inf)  # (B, Hkv, G, Lq, Lk)


@mx.custom_function
def _attend(q, k, v, visible):
    """q: (B, Hkv, G, Lq, D), already scaled; k, v: (B, Hkv, 1, Lk, D); visible: (Lq, Lk)."""
    scores = _scores(q, k, visible)
    top = mx.max(scores, axis=-1, keepdims=True)
    e = mx.power(2.0, (scores - top) * LOG2E)  # e**(s - max): nothing overflows
    total = mx.sum(e, axis=-1, keepdims=True)
    return (e / total) @ v, top + mx.log(total)  # the output, and the logsumexp kept for backward


@_attend.vjp
def _attend_vjp(primals, cotangents, outputs):
    q, k, v, visible = primals
    d_out, (out, lse) = cotangents[0], outputs
    # Recompute once the output's gradient exists: without the dependency, MLX would run
    # this with the forward (or mx.compile merge it with the forward's product) and the
    # probabilities would stay alive until the backward pass after all.
    q, k = mx.depends([q, k], [d_out])
    p = mx.power(2.0, (_scores(q, k, visible) - lse) * LOG2E)  # the forward's probabilities
    d_v = (p.swapaxes(-1, -2) @ d_out).sum(axis=2, keepdims=True)  # summed over the group
    d_p = d_out @ v.swapaxes(-1, -2)
    # softmax backward: p * (d_p - sum(p * d_p)), and sum(p * d_p) = sum(out * d_out) per row
    d_s = p * (d_p - mx.sum(out * d_out, axis=-1, keepdims=True))
    d_k = (d_s.swapaxes(-1, -2) @ q).sum(axis=2, keepdims=True)
    return d_s @ k, d_k, d_v, mx.zeros_like(visible)
