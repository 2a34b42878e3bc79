"""GGUF files in: llama.cpp / Ollama models loaded as a lora_course ``Model``.

GGUF (llama.cpp's single-file format, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md)
is a header of typed key/value metadata and tensor descriptions, then the tensor data.
``mx.load(path, return_metadata=True)`` reads it; this module adds what a Llama model
needs on top, in three steps:

- **check first**: :func:`read_header` parses the header in plain Python (no tensor
  data), so an unknown architecture, a missing key, a tensor of the wrong shape or a
  type MLX cannot read fails with one line naming the file and the key or tensor,
  before MLX sees the file;
- **names**: llama.cpp calls ``model.layers.3.self_attn.q_proj`` ``blk.3.attn_q``;
  :data:`GGUF_TOP` and :data:`GGUF_BLOCK` map one to the other (``gguf_write.py`` uses it backwards);
- **RoPE rows**: llama.cpp's converter reorders the rows of q and k from HF's half-split
  layout to Meta's interleaved pairs (see ``meta.py``); :func:`interleaved_to_halves`
  undoes it, for the weight and, when it is quantized, its scales and biases (a row
  permutation moves whole rows, so the packed data stays valid).

Quantized tensors: MLX returns Q4_0, Q4_1 and Q8_0 as ``(weight, scales, biases)``
triples in its own affine layout with groups of 32 (Q4_0's ``d * (q - 8)`` is scale
``d`` and bias ``-8 d``), so those layers become ``nn.QuantizedLinear`` and stay small.
MLX turns Q2_K, Q4_K, Q6_K and BF16 into float16 as it loads; we warn when that happens.
Other types (Q5_0, Q3_K, IQ*, ...) MLX cannot read at all; the error says so.

The architecture comes from the ``llama.*`` keys (Mistral's GGUFs say ``llama`` too) or the
``qwen2.*`` keys: Qwen2 has q/k/v biases and llama.cpp rotates its halves as HF does, so
its q/k rows are stored unpermuted. Llama 3.1's RoPE scaling is stored by llama.cpp as the
``rope_freqs`` tensor, one divisor per frequency; :func:`llama3_from_factors` finds the
``llama3`` settings that give exactly those divisors (or refuses).
Taught in notebook 04 (checkpoints, tokenizers and sampling) and 15 (bring your own model).
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

from lora_course.checkpoint.files import CheckpointError
from lora_course.checkpoint.gguf_header import (
    GROUP_SIZE,
    KEPT_QUANTIZED,
    MLX_TO_F16,
    READABLE,
    read_header,
)
from lora_course.checkpoint.meta import interleaved_to_halves
from lora_course.checkpoint.weights import load_weights
from lora_course.model.args import ModelArgs
from lora_course.model.rope import llama3_factors
from lora_course.model.transformer import Model
from lora_course.quant.layers import use_dequant_layers
from lora_course.tokenizer.gguf import tokenizer_from_gguf
from lora_course.tree import tree_flatten

import mlx.core as mx
import mlx.nn as nn

# llama.cpp tensor names -> ours (without the .weight / .bias suffix); gguf_write.py inverts them
GGUF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
GGUF_BLOCK = {  # inside blk.N -> inside model.layers.N
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
GGUF_NAME = re.compile(r"(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)")
ROPE_FREQS = "rope_freqs.weight"  # llama 3.1's per-frequency RoPE divisors, read as rope_scaling
SUPPORTED_ARCH = ("llama", "qwen2")
PERMUTED_QK = ("llama",)  # architectures whose q/k rows llama.cpp stores in interleaved RoPE order
REQUIRED = ("embedding_length", "block_count", "attention.head_count", "feed_forward_length")


# ----------------------------------------------------------------------------- the header


# ----------------------------------------------------------------------------- config


def gguf_to_hf_name(name: str) -> str | None:
    """``blk.0.attn_q.weight`` -> ``model.layers.0.self_attn.q_proj.weight``; None if unknown."""
    m = GGUF_NAME.fullmatch(name)
    if m is None:
        return None
    layer, stem, suffix = m.groups()
    if layer is None:
        return f"{GGUF_TOP[stem]}.{suffix}" if stem in GGUF_TOP else None
    return f"model.layers.{int(layer)}.{GGUF_BLOCK[stem]}.{suffix}" if stem in GGUF_BLOCK else None


def _get(path: Path, metadata: dict, key: str, kind: type, default=None):
    """``metadata[key]`` checked to be a positive number of ``kind`` (or ``default`` if absent)."""
    if key not in metadata:
        if default is None:
            raise CheckpointError(f"{path}: missing metadata key '{key}'")
        return default
    value = metadata[key]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    if not ok or (kind is int and not isinstance(value, int)):
        want = "a positive integer" if kind is int else "a positive number"
        raise CheckpointError(f"{path}: metadata key '{key}' must be {want}, got {repr(value)[:60]}")
    return kind(value)


def gguf_args(path, metadata: dict, tensors: dict) -> ModelArgs:
    """``ModelArgs`` from a GGUF file's ``llama.*`` metadata (and its tensor list)."""
    path = Path(path)
    arch = metadata.get("general.architecture")
    if arch is None:
        raise CheckpointError(f"{path}: missing metadata key 'general.architecture'")
    if arch not in SUPPORTED_ARCH:
        raise CheckpointError(
            f"{path}: architecture '{arch}' (key 'general.architecture') is not "
            f"supported (lora_course reads {', '.join(SUPPORTED_ARCH)})"
        )
    a = f"{arch}."
    dim, layers, heads, hidden = (_get(path, metadata, a + k, int) for k in REQUIRED)
    kv_heads = _get(path, metadata, a + "attention.head_count_kv", int, heads)
    head_dim = _get(path, metadata, a + "attention.key_length", int, dim // heads)
    if head_dim < 2 or head_dim % 2:
        raise CheckpointError(
            f"{path}: attention heads would be {head_dim} wide; RoPE needs an even head width of at least 2"
        )
    if heads % kv_heads:
        raise CheckpointError(
            f"{path}: metadata key '{a}attention.head_count' ({heads}) must be a "
            f"multiple of '{a}attention.head_count_kv' ({kv_heads})"
        )
    tokens = metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and tokens:
        vocab = len(tokens)
    elif f"{a}vocab_size" in metadata:
        vocab = _get(path, metadata, a + "vocab_size", int)
    elif "token_embd.weight" in tensors:
        vocab = tensors["token_embd.weight"][0][0]
    else:
        raise CheckpointError(
            f"{path}: missing metadata key 'tokenizer.ggml.tokens' (or "
            f"'{a}vocab_size'): the vocabulary size is unknown"
        )
    scaling = None
    kind = metadata.get(a + "rope.scaling.type", "none")
    if kind == "linear":
        scaling = {"type": "linear", "factor": _get(path, metadata, a + "rope.scaling.factor", float)}
    elif kind != "none":
        raise CheckpointError(
            f"{path}: metadata key '{a}rope.scaling.type' is '{kind}'; only linear RoPE scaling is supported"
        )
    window = metadata.get(a + "attention.sliding_window")
    return ModelArgs(
        model_type="qwen2" if arch == "qwen2" else "mistral" if window else "llama",
        qkv_bias=arch == "qwen2",
        sliding_window=_get(path, metadata, a + "attention.sliding_window", int) if window else None,
        dim=dim,
        n_layers=layers,
        hidden_dim=hidden,
        n_heads=heads,
        n_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        rope_scaling=scaling,
        rope_theta=_get(path, metadata, a + "rope.freq_base", float, 10000.0),
        norm_eps=_get(path, metadata, a + "attention.layer_norm_rms_epsilon", float, 1e-5),
        max_position_embeddings=_get(path, metadata, a + "context_length", int, 4096),
        tie_word_embeddings="output.weight" not in tensors,
    )


def llama3_from_factors(path: Path, factors: list[float], args: ModelArgs, metadata: dict) -> dict:
    """Llama 3.1 ``rope_scaling`` settings that give llama.cpp's per-frequency divisors exactly.

    Divisors are 1 for fast frequencies, ``factor`` for slow ones, and 1 / divisor is linear
    in u = 1 / wavelength between. Only the ratios context / low and context / high matter,
    so the context is taken from ``rope.scaling.original_context_length`` (or 8192, Llama
    3.1's). Each boundary is solved from the blended frequencies, or put on the nearest
    unblended one; the result is checked against the divisors.
    """
    a = metadata["general.architecture"] + "."
    context = _get(path, metadata, a + "rope.scaling.original_context_length", int, 8192)
    dims, base = args.head_dim, args.rope_theta
    factor = max(factors)
    u = [1 / (2 * math.pi * base ** (2 * i / dims)) for i in range(dims // 2)]  # falls with i
    blend = [(ui, (1 / f - 1 / factor) / (1 - 1 / factor)) for ui, f in zip(u, factors) if 1 < f < factor]
    kept = [ui for ui, f in zip(u, factors) if f == 1]
    slow = [ui for ui, f in zip(u, factors) if f == factor]
    if len(blend) >= 2:  # smooth = (u - lo) / (hi - lo) through two points
        (u1, s1), (u2, s2) = blend[0], blend[-1]
        hi_minus_lo = (u1 - u2) / (s1 - s2)
        lo = u1 - s1 * hi_minus_lo
        hi = lo + hi_minus_lo
    else:
        hi = min(kept) if kept else max(u) * 2
        lo = max(slow) if slow else min(u) / 2
        if blend:  # one blended point: slide along its line until both boundaries fit
            ((u1, s1),) = blend
            lo = (u1 - s1 * hi) / (1 - s1)
            if slow and lo < max(slow):
                lo = max(slow)
                hi = lo + (u1 - lo) / s1
    scaling = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": float(f"{lo * context:.6g}"),  # 1.0, not 0.99999994 from float32 divisors
        "high_freq_factor": float(f"{hi * context:.6g}"),
        "original_max_position_embeddings": context,
    }
    if factor > 1 and lo > 0 and hi > lo:
        again = llama3_factors(dims, base, scaling)
        if all(abs(x - y) <= 1e-4 * y for x, y in zip(again, factors)):
            return scaling
    raise CheckpointError(
        f"{path}: tensor 'rope_freqs.weight' holds RoPE divisors that are not "
        "Llama 3.1's scaling; not supported"
    )


def _check_tensors(path: Path, tensors: dict, model: Model) -> dict[str, str]:
    """Every tensor known, readable and of the right shape; returns our name -> GGUF type."""
    expected = dict(tree_flatten(model.parameters()))
    types = {}
    for name, (shape, kind) in tensors.items():
        if name == ROPE_FREQS:
            if shape != (model.args.head_dim // 2,) or kind != "F32":
                raise CheckpointError(
                    f"{path}: tensor '{name}' is {kind} {shape}; llama.cpp writes "
                    f"F32 ({model.args.head_dim // 2},)"
                )
            continue
        ours = gguf_to_hf_name(name)
        if ours is None or ours not in expected:
            raise CheckpointError(
                f"{path}: unexpected tensor '{name}' (shape {shape}); a llama model "
                f"with {model.args.n_layers} layers has no such tensor"
            )
        if kind not in READABLE:
            raise CheckpointError(
                f"{path}: tensor '{name}' is stored as {kind}, which MLX cannot "
                "read; re-quantize the model to Q8_0, Q4_0 or F16 (llama-quantize)"
            )
        want = tuple(expected[ours].shape)
        if shape != want:
            raise CheckpointError(
                f"{path}: tensor '{name}' has shape {shape}, but the metadata implies {want} (for '{ours}')"
            )
        types[ours] = kind
    missing = [k for k in expected if k not in types]
    if missing:
        raise CheckpointError(f"{path}: tensor for '{missing[0]}' is missing ({len(missing)} missing in all)")
    return types


# ----------------------------------------------------------------------------- loading


def load_gguf(path, lazy: bool = True) -> tuple[Model, object | None]:
    """``(model, tokenizer)`` from one ``.gguf`` file; Q4_0 / Q4_1 / Q8_0 layers stay quantized.

    The tokenizer is built from the file's ``tokenizer.ggml.*`` metadata by
    ``lora_course.tokenizer.gguf.tokenizer_from_gguf``.
    """
    path = Path(path)
    header, infos = read_header(path)
    args = gguf_args(path, header, infos)
    types = _check_tensors(path, infos, Model(args))  # lazy random weights: only shapes are used
    try:
        raw, metadata = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: MLX cannot read this GGUF file ({str(e).splitlines()[0]})") from None
    if ROPE_FREQS in raw:  # Llama 3.1's scaling, as llama.cpp stores it
        args.rope_scaling = llama3_from_factors(path, raw.pop(ROPE_FREQS).tolist(), args, header)
    model = Model(args)

    bits = {ours[: -len(".weight")]: KEPT_QUANTIZED[t] for ours, t in types.items() if t in KEPT_QUANTIZED}
    if bits:
        first = next(iter(bits.values()))
        args.quantization = {"group_size": GROUP_SIZE, "bits": first}
        args.quantization.update(
            {p: {"group_size": GROUP_SIZE, "bits": b} for p, b in bits.items() if b != first}
        )
        nn.quantize(
            model,
            GROUP_SIZE,
            first,
            class_predicate=lambda p, m: (
                p in bits and hasattr(m, "to_quantized") and {"group_size": GROUP_SIZE, "bits": bits[p]}
            ),
        )
        use_dequant_layers(model)  # the fast CPU layer classes, as checkpoint.load uses
    converted = sorted({t for t in types.values() if t in MLX_TO_F16})
    if converted:
        example = next(k for k, t in types.items() if t in MLX_TO_F16)
        warnings.warn(
            f"{path}: tensors stored as {', '.join(converted)} (e.g. '{example}') were "
            "de-quantized to float16 while loading; they take full float16 memory",
            stacklevel=2,
        )

    weights = {}
    for name, value in raw.items():
        stem, _, part = name.rpartition(".")  # part: weight, bias, or scales / biases of a packed one
        if part in ("scales", "biases"):
            ours = gguf_to_hf_name(stem + ".weight")[: -len("weight")] + part
        else:
            ours = gguf_to_hf_name(name)
        if header["general.architecture"] in PERMUTED_QK and re.search(r"self_attn\.[qk]_proj\.", ours):
            heads = args.n_heads if ".q_proj." in ours else args.n_kv_heads
            value = interleaved_to_halves(value, heads)  # llama.cpp's row order -> HF's
        weights[ours] = value
    del raw
    load_weights(model, [(path, weights)], path, lazy)
    if "tokenizer.ggml.model" not in metadata:  # a bare weights file: say so, do not guess
        warnings.warn(f"{path}: no tokenizer.ggml.* metadata; the tokenizer is None", stacklevel=2)
        return model, None
    return model, tokenizer_from_gguf(metadata)
