"""The figures of the four sidebars, made from code: ``python book/figures.py``.

Writes PNGs into ``book/sidebars/figures/``. Every number in them is computed here
(with ``lora_course`` and the course's base model), seeded, in well under a minute on
a CPU. Each function makes one figure and is named after its file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lora_course as lc  # first: loads an optimized BLAS before MLX on Linux

import matplotlib

matplotlib.use("Agg")
from lora_course.model.attention import causal_mask  # noqa: E402
from lora_course.model.rope import rope_reference  # noqa: E402
from lora_course.quant.quantize import dequantize, quantize  # noqa: E402
from lora_course.quant.size import effective_bits  # noqa: E402
from lora_course.training.plots import save_png  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

OUT = Path(__file__).parent / "sidebars" / "figures"
PROMPT = "numpy.cumsum(a, axis=None)\n\nReturn the cumulative sum of the elements along a given axis."


def _base():
    model, tokenizer = lc.load()
    model.set_dtype(mx.float32)
    return model, tokenizer


# --- attention -------------------------------------------------------------------------


def attention_weights(model, tokenizer):
    """Causal attention weights of two heads of the base model's first block."""
    ids = tokenizer.encode(PROMPT)[:24]
    tokens = mx.array(ids)[None]  # (1, L)
    blk = model.layers[0]
    attn = blk.self_attn
    x = blk.input_layernorm(model.model.embed_tokens(tokens))  # (1, L, dim)
    B, L, _ = x.shape
    q = attn.q_proj(x).reshape(B, L, attn.n_heads, -1).transpose(0, 2, 1, 3)  # (1, h, L, d_h)
    k = attn.k_proj(x).reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)  # (1, h_kv, L, d_h)
    q, k = attn.rope(q), attn.rope(k)
    k = mx.repeat(k, attn.n_heads // attn.n_kv_heads, axis=1)  # (1, h, L, d_h)
    scores = (q * attn.scale) @ k.swapaxes(-1, -2)  # (1, h, L, L)
    scores = mx.where(causal_mask(L, L), scores, -mx.inf)
    weights = np.array(mx.softmax(scores, axis=-1)[0])
    labels = [repr(tokenizer.decode([t]))[1:-1] or "<bos>" for t in ids]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    for ax, head in zip(axes, (0, 3)):
        ax.imshow(weights[head], cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(L), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(L), labels, fontsize=7)
        ax.set_title(f"block 0, head {head}")
        ax.set_xlabel("key position j (what is looked at)")
    axes[0].set_ylabel("query position i")
    fig.suptitle("attention weights of the course's base model: zero above the diagonal (the causal mask)")
    return fig


def rope_relative(model=None, tokenizer=None):
    """With RoPE the score of a fixed q and k depends only on their distance."""
    d_h, base = 64, 10000.0
    rng = np.random.default_rng(0)
    q = mx.array(rng.normal(size=(1, 1, 1, d_h)).astype(np.float32))
    offsets = np.arange(0, 256)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for start in (0, 100):
        qm = rope_reference(q, start, base, False)
        scores = []
        for n in offsets:
            kn = rope_reference(q, start + int(n), base, False)  # k = q, moved n positions on
            scores.append(float((qm * kn).sum()) / d_h)
        axes[0].plot(
            offsets,
            scores,
            lw=1.5 if start == 0 else 0,
            marker="" if start == 0 else ".",
            ms=2,
            label=f"query at position {start}",
        )
    axes[0].set_xlabel("distance n - m between key and query")
    axes[0].set_ylabel("q·k / d_h")
    axes[0].set_title("the score depends on the distance only")
    axes[0].legend()
    pairs = np.arange(d_h // 2)
    wavelengths = 2 * np.pi * base ** (2 * pairs / d_h)
    axes[1].semilogy(pairs, wavelengths, "o", ms=3)
    axes[1].axhline(256, color="grey", ls="--", label="256 tokens (the base model's context)")
    axes[1].set_xlabel("coordinate pair c")
    axes[1].set_ylabel("wavelength (tokens)")
    axes[1].set_title(f"each pair turns at its own speed (base {base:.0f}, d_h {d_h})")
    axes[1].legend()
    return fig


# --- LoRA ------------------------------------------------------------------------------


def lora_matrices(model=None, tokenizer=None):
    """W, B, A and the update B A as pictures: a rank-2 update to a 16 x 16 weight."""
    rng = np.random.default_rng(0)
    d, r = 16, 2
    W = rng.normal(size=(d, d))
    B = rng.normal(size=(d, r))
    A = rng.normal(size=(r, d))
    panels = [
        ("W (frozen) 16×16", W),
        ("B 16×2", B),
        ("A 2×16", A),
        ("ΔW = B A, rank 2", B @ A),
        ("W + ΔW", W + B @ A),
    ]
    widths = [d, 3, d, d, d]
    fig, axes = plt.subplots(1, 5, figsize=(12, 3), gridspec_kw={"width_ratios": widths})
    for ax, (title, M) in zip(axes, panels):
        lim = np.abs(M).max()
        ax.imshow(M, cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        "LoRA trains B and A (64 numbers) instead of W (256): every row of ΔW is a mix of A's 2 rows"
    )
    return fig


def lora_parameters(model=None, tokenizer=None):
    """Trainable parameters of one 4096 x 4096 projection: full vs LoRA by rank."""
    d = 4096
    ranks = np.array([1, 2, 4, 8, 16, 32, 64, 128, 256])
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    ax.loglog(ranks, ranks * 2 * d, "o-", label="LoRA: r (d_in + d_out)")
    ax.axhline(d * d, color="tab:red", ls="--", label="full fine-tuning: d_in d_out")
    for r in (8, 64):
        ax.annotate(
            f"r={r}: {r * 2 * d / d**2:.2%}", (r, r * 2 * d), textcoords="offset points", xytext=(5, -14)
        )
    ax.set_xlabel("rank r")
    ax.set_ylabel("trainable parameters")
    ax.set_title("one 4096×4096 q_proj (Llama / Mistral 7B)")
    ax.legend(loc="center right")
    return fig


# --- normalization ---------------------------------------------------------------------


def rmsnorm_sphere(model=None, tokenizer=None):
    """RMSNorm puts every vector on the sphere of radius sqrt(d): here d = 2."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 2)) * rng.lognormal(0, 0.8, size=(300, 1)) + [0.5, 0.2]
    y = np.array(lc.RMSNorm(2, eps=1e-6)(mx.array(x.astype(np.float32))))
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    for ax, pts, title in zip(axes, (x, y), ("before: any length", "after RMSNorm: length √2")):
        ax.scatter(pts[:, 0], pts[:, 1], s=6, alpha=0.6)
        ax.add_patch(plt.Circle((0, 0), np.sqrt(2), fill=False, color="tab:red", ls="--"))
        ax.set_aspect("equal")
        ax.set_title(title)
        lim = max(3.5, float(np.abs(pts).max()) * 1.05) if pts is x else 2.2
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
    fig.suptitle("RMSNorm keeps the direction and fixes the length (gain g = 1)")
    return fig


def residual_stream(model, tokenizer):
    """The stream grows block by block; what each sub-layer reads does not."""
    tokens = mx.array(tokenizer.encode(PROMPT))[None]
    h = model.model.embed_tokens(tokens)
    rms = lambda t: float(mx.sqrt(mx.mean(t * t)))  # noqa: E731
    stream, normed = [rms(h)], []
    for blk in model.layers:
        normed.append(rms(blk.input_layernorm(h)))
        h = blk(h)
        stream.append(rms(h))
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    ax.plot(range(len(stream)), stream, "o-", label="residual stream x (before block ℓ+1)")
    ax.plot(range(len(normed)), normed, "s--", label="RMSNorm(x): what attention reads")
    ax.set_xlabel("block ℓ (0: the embedding)")
    ax.set_ylabel("RMS over features and tokens")
    ax.set_yscale("log")
    ax.set_title("the course's base model on one docstring")
    ax.legend()
    return fig


# --- precision and quantization ----------------------------------------------------------


def float_spacing(model=None, tokenizer=None):
    """The gap to the next representable number, by magnitude, for three formats."""
    x = np.logspace(-6, 6, 400)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for dtype, name, eps, top in (
        (mx.float32, "float32", 2**-23, 3.4e38),
        (mx.float16, "float16", 2**-10, 65504),
        (mx.bfloat16, "bfloat16", 2**-7, 3.4e38),
    ):
        xs = mx.array(x.astype(np.float32)).astype(dtype)
        gap = np.array((mx.array(2.0) ** mx.floor(mx.log2(xs.astype(mx.float32)))) * eps)
        keep = x <= top
        ax.loglog(x[keep], gap[keep], label=f"{name} (ε = 2^{int(np.log2(eps))})")
    ax.axvline(65504, color="tab:orange", ls=":", label="float16 overflows to inf")
    ax.axhline(1, color="grey", lw=0.8)
    ax.set_xlabel("|x|")
    ax.set_ylabel("gap to the next number")
    ax.set_title("bfloat16: float32's range, coarse steps\nfloat16: finer steps, small range", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def quantization_error(model, tokenizer):
    """Relative error of affine quantization on the base model's q_proj, by bits and group size."""
    w = model.layers[0].self_attn.q_proj.weight  # (256, 256)
    rms = float(mx.sqrt(mx.mean(w * w)))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for g in (32, 64, 128):
        errs, bits_axis = [], []
        for b in (2, 3, 4, 5, 6, 8):
            w_hat = dequantize(*quantize(w, g, b), g, b)
            errs.append(float(mx.sqrt(mx.mean((w - w_hat) ** 2))) / rms)
            bits_axis.append(effective_bits(b, g))
        axes[0].semilogy(bits_axis, errs, "o-", label=f"group size {g}")
    axes[0].set_xlabel("bits per weight, scales and biases included")
    axes[0].set_ylabel("RMS error / RMS weight")
    axes[0].set_title("block 0's q_proj of the base model")
    axes[0].legend()
    row = w[0, :64]
    axes[1].plot(np.array(row), "k.", label="weights (one group of 64)")
    w_hat = np.array(dequantize(*quantize(row[None], 64, 2), 64, 2)[0])
    for level in np.unique(w_hat):
        axes[1].axhline(level, color="tab:red", lw=0.8)
    axes[1].plot(w_hat, "x", color="tab:red", ms=4, label="2 bits: each weight moves to one of 4 levels")
    axes[1].set_xlabel("index in the group")
    axes[1].set_title("one group at 2 bits")
    axes[1].legend(fontsize=8)
    return fig


FIGURES = {
    "attention_weights": attention_weights,
    "rope_relative": rope_relative,
    "lora_matrices": lora_matrices,
    "lora_parameters": lora_parameters,
    "rmsnorm_sphere": rmsnorm_sphere,
    "residual_stream": residual_stream,
    "float_spacing": float_spacing,
    "quantization_error": quantization_error,
}


def main(names=None) -> list[Path]:
    model, tokenizer = _base()
    written = []
    for name in names or FIGURES:
        mx.random.seed(0)
        fig = FIGURES[name](model, tokenizer)
        path = OUT / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_png(fig, path)
        plt.close(fig)
        written.append(path)
        print(path.relative_to(Path(__file__).parent.parent))
    return written


if __name__ == "__main__":
    main(sys.argv[1:] or None)
