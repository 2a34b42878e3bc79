"""Group-wise affine quantization in plain MLX ops, and QLoRA's frozen 4-bit base.

Taught in notebook 07 (precision and quantization) and notebook 08 (QLoRA).

QLoRA (Dettmers et al., 2023, "QLoRA: Efficient Finetuning of Quantized LLMs") freezes
the base model in 4 bits and trains LoRA adapters on top. MLX stores such weights with
*affine group-wise* quantization (MLX docs: ``mlx.core.quantize``, mode ``"affine"``).
This module is that quantizer, op for op, so you can read it; its outputs are
bit-identical to ``mx.quantize`` / ``mx.dequantize`` (tests/quant/test_quantize.py checks every
bits x group-size pair).

The math, for one group of ``g`` consecutive weights ``w_1..w_g`` in a row and ``b`` bits:

    n     = 2**b - 1                        number of steps between the lowest and highest code
    s     = max((max(w) - min(w)) / n, eps)  step size (eps = 1e-7 keeps constant groups finite)
    edge  = min(w) if |min(w)| > |max(w)| else max(w)   the end with the larger magnitude
    s     = +s if edge is min(w) else -s    codes count away from the edge, into the group
    q0    = round(edge / s)                  the edge, measured in steps from zero
    if q0 != 0:  s = edge / q0, bias = edge  nudge s so the grid passes exactly through 0.0
    else:        bias = 0
    q_i   = clip(round((w_i - bias) / s), 0, n)    the b-bit code, an integer in [0, n]
    (for b = 1 MLX skips the edge and snapping steps: s = max(max(w) - min(w), eps),
    bias = min(w), since two codes cannot hold both ends and an exact zero)
    w_i  ~= s * q_i + bias                          dequantization

``round`` is round-half-to-even, the arithmetic is float32 whatever the input dtype, and
``s`` and ``bias`` are stored in the input's dtype (so a bf16 model gets bf16 scales).
Dequantization multiplies and adds in that stored dtype, one rounding per op.

Packing: the codes of a row form one little-endian bit stream. Code ``j`` occupies bits
``j*b .. j*b+b-1`` of the row, and the stream is cut into uint32 words. For b = 4 a word
holds 8 codes (code 0 in bits 0-3, code 1 in bits 4-7, ...). For b = 3, 5 and 6 a code
can straddle two words: 32 three-bit codes fill exactly 3 words, and code 10 uses the
top 2 bits of word 0 and the lowest bit of word 1. A row of ``C`` weights becomes
``C * b / 32`` words plus ``C / g`` scales and ``C / g`` biases.
"""

from __future__ import annotations

import math

import mlx.core as mx

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 8)  # what mx.quantize accepts in affine mode


SUPPORTED_GROUP_SIZES = (32, 64, 128)


FLOAT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)


EPS = 1e-7  # smallest step size; MLX uses the same floor


# Weights must stay below this magnitude: beyond about 3.4e31 the edge/step ratio of a
# constant group overflows float32 and MLX's result depends on undefined behaviour.
MAX_ABS_WEIGHT = 1e30


class QuantizationError(ValueError):
    """Raised when a weight, group size or bit width cannot be quantized."""


def check_params(group_size: int, bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise QuantizationError(
            f"bits={bits!r} is not supported; use one of {', '.join(map(str, SUPPORTED_BITS))}."
        )
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise QuantizationError(
            f"group_size={group_size!r} is not supported; use one of "
            f"{', '.join(map(str, SUPPORTED_GROUP_SIZES))}."
        )


def _pack_layout(bits: int) -> tuple[int, int]:
    """The shortest run of codes that fills whole uint32 words: (codes, words).

    4 bits -> (8, 1); 3 bits -> (32, 3); 5 bits -> (32, 5); 6 bits -> (16, 3).
    """
    common = math.gcd(bits, 32)
    return 32 // common, bits // common


def pack(q: mx.array, bits: int) -> mx.array:
    """Pack integer codes (..., C) in [0, 2**bits) into uint32 words (..., C * bits / 32)."""
    codes, words = _pack_layout(bits)
    *lead, cols = q.shape
    q = q.astype(mx.uint32).reshape(*lead, cols // codes, codes)  # (..., packs, codes)
    out = [mx.zeros(q.shape[:-1], dtype=mx.uint32) for _ in range(words)]
    for k in range(codes):
        word, shift = divmod(k * bits, 32)
        out[word] = out[word] | (q[..., k] << shift)  # bits pushed past 32 fall off ...
        if shift + bits > 32:  # ... and continue at the bottom of the next word
            out[word + 1] = out[word + 1] | (q[..., k] >> (32 - shift))
    return mx.stack(out, axis=-1).reshape(*lead, cols * bits // 32)  # (..., packs * words)


def unpack(w_q: mx.array, bits: int) -> mx.array:
    """Inverse of :func:`pack`: uint32 words (..., W) -> codes (..., W * 32 / bits), uint32."""
    codes, words = _pack_layout(bits)
    *lead, n_words = w_q.shape
    mask = (1 << bits) - 1
    if words == 1:  # 2, 4 or 8 bits: no code straddles two words, so one broadcast shift does
        # it, an element-wise op that mx.compile fuses with whatever uses the codes
        shifts = mx.arange(0, 32, bits, dtype=mx.uint32)  # (codes,)
        return ((w_q[..., None] >> shifts) & mask).reshape(*lead, n_words * codes)
    w_q = w_q.reshape(*lead, n_words // words, words)  # (..., packs, words)
    out = []
    for k in range(codes):
        word, shift = divmod(k * bits, 32)
        code = w_q[..., word] >> shift
        if shift + bits > 32:  # the code's high bits sit at the bottom of the next word
            code = code | (w_q[..., word + 1] << (32 - shift))
        out.append(code & mask)
    return mx.stack(out, axis=-1).reshape(*lead, n_words * 32 // bits)  # (..., C)


def quantize(w: mx.array, group_size: int = 64, bits: int = 4) -> tuple[mx.array, mx.array, mx.array]:
    """Quantize ``w`` (..., C) group-wise: returns ``(w_q, scales, biases)`` like ``mx.quantize``.

    ``w_q`` is uint32 of shape (..., C * bits / 32); ``scales`` and ``biases`` have shape
    (..., C / group_size) and ``w``'s dtype. Raises :class:`QuantizationError` (a
    ``ValueError``) for unsupported bits or group sizes, fewer than 2 dimensions, a last
    dimension not divisible by ``group_size``, a non-float dtype, or weights that are not
    finite or exceed ``MAX_ABS_WEIGHT`` in magnitude.
    """
    check_params(group_size, bits)
    if not isinstance(w, mx.array):
        raise QuantizationError(f"quantize expects an mx.array, got {type(w).__name__}.")
    if w.dtype not in FLOAT_DTYPES:
        raise QuantizationError(
            f"quantize: w has dtype {w.dtype}; only float32, float16 and bfloat16 weights "
            "can be quantized (cast first, e.g. w.astype(mx.float32))."
        )
    if w.ndim < 2:
        raise QuantizationError(
            f"quantize: w must have at least 2 dimensions (rows, columns), got shape "
            f"{tuple(w.shape)}; reshape it, e.g. w.reshape(1, -1)."
        )
    *lead, cols = w.shape
    if cols % group_size != 0:
        raise QuantizationError(
            f"quantize: the last dimension of w (shape {tuple(w.shape)}) is not divisible by "
            f"group_size={group_size}; choose a group size that divides {cols}."
        )
    if w.size > 0:
        largest = mx.max(mx.abs(w)).item()
        if not largest < MAX_ABS_WEIGHT:  # also catches nan
            raise QuantizationError(
                f"quantize: w (shape {tuple(w.shape)}) has max |w| = {largest}; weights must "
                f"be finite and below {MAX_ABS_WEIGHT:g} in magnitude."
            )

    n_bins = float(2**bits - 1)
    groups = w.astype(mx.float32).reshape(*lead, cols // group_size, group_size)
    w_max = mx.max(groups, axis=-1, keepdims=True)  # (..., n_groups, 1)
    w_min = mx.min(groups, axis=-1, keepdims=True)

    scale = mx.maximum((w_max - w_min) / n_bins, EPS)
    if bits == 1:  # two codes cannot put 0.0 on the grid: plain min + step, no snapping
        bias = w_min
    else:
        min_is_edge = mx.abs(w_min) > mx.abs(w_max)
        scale = mx.where(min_is_edge, scale, -scale)  # count up from min, or down from max
        edge = mx.where(min_is_edge, w_min, w_max)
        q0 = mx.round(edge / scale)  # where the edge sits on the grid of steps from zero
        snap = q0 != 0
        scale = mx.where(snap, edge / q0, scale)  # now the edge (and 0.0) are exact codes
        bias = mx.where(snap, edge, 0.0)

    q = mx.clip(mx.round((groups - bias) / scale), 0.0, n_bins)  # (..., n_groups, group_size)
    w_q = pack(q.astype(mx.uint32).reshape(*lead, cols), bits)
    return w_q, scale.squeeze(-1).astype(w.dtype), bias.squeeze(-1).astype(w.dtype)


def dequantize(
    w_q: mx.array,
    scales: mx.array,
    biases: mx.array,
    group_size: int = 64,
    bits: int = 4,
) -> mx.array:
    """Undo :func:`quantize`: ``w = scales * q + biases`` per group, in ``scales.dtype``.

    Equal, bit for bit, to ``mx.dequantize(w_q, scales, biases, group_size, bits)``.
    """
    check_params(group_size, bits)
    if w_q.dtype != mx.uint32:
        raise QuantizationError(f"dequantize: w_q must be uint32, got {w_q.dtype}.")
    if scales.dtype not in FLOAT_DTYPES or biases.dtype != scales.dtype:
        raise QuantizationError(
            f"dequantize: scales ({scales.dtype}) and biases ({biases.dtype}) must share one "
            "float dtype (float32, float16 or bfloat16)."
        )
    *lead, n_words = w_q.shape
    cols = n_words * 32 // bits
    expected = (*lead, cols // group_size)
    if (
        w_q.ndim < 2
        or (n_words * 32) % bits != 0
        or cols % group_size != 0
        or tuple(scales.shape) != expected
        or tuple(biases.shape) != expected
    ):
        raise QuantizationError(
            f"dequantize: w_q {tuple(w_q.shape)}, scales {tuple(scales.shape)} and biases "
            f"{tuple(biases.shape)} do not fit group_size={group_size}, bits={bits} "
            f"(expected scales and biases of shape {expected}); pass the group_size and bits "
            "used to quantize."
        )
    q = unpack(w_q, bits).reshape(*expected, group_size).astype(scales.dtype)
    w = q * scales[..., None] + biases[..., None]  # two rounded ops, as MLX computes it
    return w.reshape(*lead, cols)
