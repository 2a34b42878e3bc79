"""GGUF files out: one ``.gguf`` that llama.cpp and Ollama run, written from a ``Model``.

The reverse of ``gguf_read.py``: tensors get llama.cpp's names (``blk.0.attn_q.weight``),
the rows of q and k go back to Meta's interleaved RoPE order
(:func:`halves_to_interleaved`, the inverse of ``meta_format.interleaved_to_halves``),
and the ``llama.*`` keys describe the architecture with the value types llama.cpp
checks (counts uint32, ``freq_base`` and epsilon float32). The ``tokenizer.ggml.*`` keys
come from ``lora_course.tokenizer.gguf.tokenizer_to_gguf``.

Two writers, one per tensor kind:

- ``f16`` / ``f32``: ``mx.save_gguf``. It takes metadata as ``str``, ``list[str]`` or
  ``mx.array`` only (a plain Python int raises ``bad_cast``), so every number is wrapped
  in an ``mx.array`` of the exact GGUF type;
- ``q8_0``: ``mx.save_gguf`` cannot write quantized blocks, so :func:`write_gguf` writes
  the file itself (header, metadata, tensor table, aligned data: the layout in
  https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), with :func:`quantize_q8_0`
  in plain numpy. A test checks it against ``mx.save_gguf`` on float tensors.

As llama.cpp's converter does, 1-D tensors (the norms) always stay float32.
Taught in notebook 04 (checkpoints, tokenizers and sampling).
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

from lora_course import atomic
from lora_course.checkpoint.files import CheckpointError
from lora_course.checkpoint.gguf_header import ARRAY, GGUF_MAGIC, STRING
from lora_course.checkpoint.gguf_read import GGUF_BLOCK, GGUF_TOP, PERMUTED_QK, ROPE_FREQS
from lora_course.checkpoint.layouts import hf_weights
from lora_course.model.args import ModelArgs
from lora_course.model.rope import llama3_factors
from lora_course.model.transformer import Model
from lora_course.tokenizer.gguf import tokenizer_to_gguf
from lora_course.tree import tree_flatten

import mlx.core as mx
import numpy as np

GGUF_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}  # our name -> general.file_type (llama_ftype)
TENSOR_TYPE = {"F32": 0, "F16": 1, "Q8_0": 8}  # ggml_type ids this writer emits
Q8_BLOCK = 32  # weights per Q8_0 block: one float16 scale, then 32 int8 values (34 bytes)
ALIGNMENT = 32  # GGUF's default: every tensor's data starts at a multiple of this
# mx.array dtype -> GGUF metadata value type id (gguf.md, gguf_metadata_value_type)
VALUE_TYPE = {
    mx.uint8: 0,
    mx.int8: 1,
    mx.uint16: 2,
    mx.int16: 3,
    mx.uint32: 4,
    mx.int32: 5,
    mx.float32: 6,
    mx.bool_: 7,
    mx.uint64: 10,
    mx.int64: 11,
}
TO_GGUF_TOP = {ours: gguf for gguf, ours in GGUF_TOP.items()}
TO_GGUF_BLOCK = {ours: gguf for gguf, ours in GGUF_BLOCK.items()}


def halves_to_interleaved(w: mx.array, n_heads: int) -> mx.array:
    """Reorder q/k output rows from HF's half-split RoPE layout to interleaved pairs (llama.cpp)."""
    rows = w.shape[0]
    head_dim = rows // n_heads
    w = w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:])  # (heads, halves, pairs, ...)
    return w.swapaxes(1, 2).reshape(rows, *w.shape[1 + 2 :])  # (heads * head_dim, ...)


def hf_to_gguf_name(name: str) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` -> ``blk.0.attn_q.weight``."""
    stem, _, suffix = name.rpartition(".")
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", stem)
    if m and m.group(2) in TO_GGUF_BLOCK:
        return f"blk.{m.group(1)}.{TO_GGUF_BLOCK[m.group(2)]}.{suffix}"
    if stem in TO_GGUF_TOP:
        return f"{TO_GGUF_TOP[stem]}.{suffix}"
    raise CheckpointError(
        f"save: tensor '{name}' has no GGUF name; lora_course writes Llama, Mistral and Qwen2"
    )


def gguf_arch(args: ModelArgs) -> str:
    """llama.cpp's architecture name: "qwen2" for Qwen2, "llama" for Llama and Mistral."""
    return "qwen2" if args.model_type == "qwen2" else "llama"


def gguf_tensors(model: Model) -> dict[str, mx.array]:
    """The model's float tensors with llama.cpp's names and q/k row order, plus Llama 3.1's
    RoPE divisors as ``rope_freqs.weight``, as llama.cpp's converter writes them."""
    args, out = model.args, {}
    permute = gguf_arch(args) in PERMUTED_QK
    for name, value in hf_weights(model).items():  # dequantized, HF RoPE layout
        if permute and re.search(r"self_attn\.[qk]_proj\.(weight|bias)$", name):
            value = halves_to_interleaved(value, args.n_heads if ".q_proj." in name else args.n_kv_heads)
        out[hf_to_gguf_name(name)] = value
    if args.rope_type == "llama3":
        out[ROPE_FREQS] = mx.array(llama3_factors(args.head_dim, args.rope_theta, args.rope_scaling))
    return out


def _u32(v: int) -> mx.array:
    return mx.array(int(v), dtype=mx.uint32)


def _f32(v: float) -> mx.array:
    return mx.array(float(v), dtype=mx.float32)


def gguf_metadata(args: ModelArgs, gguf_type: str, name: str = "lora_course") -> dict:
    """``general.*`` and ``llama.*`` (or ``qwen2.*``) keys for ``args``, typed as llama.cpp expects."""
    a = gguf_arch(args) + "."
    meta = {
        "general.architecture": gguf_arch(args),
        "general.name": name,
        "general.file_type": _u32(GGUF_TYPES[gguf_type]),
        "general.quantization_version": _u32(2),
        a + "vocab_size": _u32(args.vocab_size),
        a + "context_length": _u32(args.max_position_embeddings),
        a + "embedding_length": _u32(args.dim),
        a + "block_count": _u32(args.n_layers),
        a + "feed_forward_length": _u32(args.hidden_dim),
        a + "attention.head_count": _u32(args.n_heads),
        a + "attention.head_count_kv": _u32(args.n_kv_heads),
        a + "attention.key_length": _u32(args.head_dim),
        a + "attention.value_length": _u32(args.head_dim),
        a + "rope.dimension_count": _u32(args.head_dim),
        a + "rope.freq_base": _f32(args.rope_theta),
        a + "attention.layer_norm_rms_epsilon": _f32(args.norm_eps),
    }
    if args.rope_type == "linear":
        meta[a + "rope.scaling.type"] = "linear"
        meta[a + "rope.scaling.factor"] = _f32(args.rope_scaling["factor"])
    elif args.rope_type == "llama3":  # the divisors go in rope_freqs; the context helps read them back
        context = args.rope_scaling["original_max_position_embeddings"]
        meta[a + "rope.scaling.original_context_length"] = _u32(context)
    if args.sliding_window is not None:  # llama.cpp's key; its llama architecture ignores it
        meta[a + "attention.sliding_window"] = _u32(args.sliding_window)
    return meta


def _typed(key: str, value):
    """A metadata value as mx.save_gguf takes it: ints uint32 (ids), floats float32,
    lists of ints int32 (token types), lists of floats float32, strings as they are."""
    if isinstance(value, (str, mx.array)):
        return value
    if isinstance(value, bool):
        return mx.array(value)
    if isinstance(value, int):
        return _u32(value)
    if isinstance(value, float):
        return _f32(value)
    if isinstance(value, (list, tuple, np.ndarray)):
        items = list(value)
        if items and all(isinstance(v, str) for v in items):
            return items
        arr = np.asarray(items)
        return mx.array(arr.astype(np.float32 if arr.dtype.kind == "f" else np.int32))
    raise CheckpointError(
        f"save: metadata key '{key}' holds a {type(value).__name__}, which GGUF cannot store"
    )


def tokenizer_metadata(tokenizer, vocab_size: int) -> dict:
    """``tokenizer.ggml.*`` keys (``tokenizer.gguf.tokenizer_to_gguf``), typed for GGUF.

    llama.cpp sizes the vocabulary by the token list, so a model whose embedding has
    more rows than its tokenizer has pieces gets unused ``[PAD<i>]`` tokens at the end,
    as llama.cpp's own converter writes them.
    """
    meta = tokenizer_to_gguf(tokenizer)
    tokens = list(meta["tokenizer.ggml.tokens"])
    if len(tokens) > vocab_size:
        raise CheckpointError(
            f"save: the tokenizer has {len(tokens)} tokens but the model's vocab_size is {vocab_size}"
        )
    pad = vocab_size - len(tokens)
    if pad:
        meta["tokenizer.ggml.tokens"] = tokens + [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
        types = np.asarray(meta["tokenizer.ggml.token_type"])
        meta["tokenizer.ggml.token_type"] = mx.array(
            np.concatenate([types, np.full(pad, 5)]).astype(np.int32)
        )
        if "tokenizer.ggml.scores" in meta:
            scores = np.asarray(meta["tokenizer.ggml.scores"])
            meta["tokenizer.ggml.scores"] = mx.array(
                np.concatenate([scores, np.full(pad, -1000.0)]).astype(np.float32)
            )
    return {k: _typed(k, v) for k, v in meta.items()}


# ----------------------------------------------------------------------------- our writer


def quantize_q8_0(w: np.ndarray) -> bytes:
    """llama.cpp's Q8_0 in plain numpy: per block of 32, d = max|x| / 127, q = round(x / d)."""
    x = w.astype(np.float32).reshape(-1, Q8_BLOCK)  # (blocks, 32)
    d = np.abs(x).max(axis=1, keepdims=True) / 127.0  # (blocks, 1)
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    q = np.clip(np.round(x * inv), -127, 127).astype(np.int8)  # (blocks, 32)
    blocks = np.concatenate([d.astype(np.float16).view(np.uint8), q.view(np.uint8)], axis=1)
    return blocks.tobytes()  # (blocks, 34) bytes


def _nbytes(shape: tuple[int, ...], kind: str) -> int:
    n = int(np.prod(shape))
    return {"F32": 4 * n, "F16": 2 * n, "Q8_0": n // Q8_BLOCK * (2 + Q8_BLOCK)}[kind]


def _encode(key: str, value) -> bytes:
    def string(s: str) -> bytes:
        raw = s.encode("utf-8")
        return struct.pack("<Q", len(raw)) + raw

    if isinstance(value, str):
        return struct.pack("<I", STRING) + string(value)
    if isinstance(value, list):  # of strings
        return struct.pack("<IIQ", ARRAY, STRING, len(value)) + b"".join(string(s) for s in value)
    kind = VALUE_TYPE.get(value.dtype)
    if kind is None:
        raise CheckpointError(f"save: metadata key '{key}' has dtype {value.dtype}, which GGUF cannot store")
    data = np.asarray(value).tobytes()
    if value.ndim == 0:
        return struct.pack("<I", kind) + data
    return struct.pack("<IIQ", ARRAY, kind, value.size) + data


def write_gguf(file, tensors: dict[str, tuple[str, mx.array]], metadata: dict) -> None:
    """Write a GGUF v3 stream to the open binary ``file``: ``tensors`` maps a name to
    ``(type, float array)`` with type "F32", "F16" or "Q8_0"."""
    pad = lambda n: -n % ALIGNMENT  # noqa: E731  (bytes to the next aligned offset)
    head = [GGUF_MAGIC, struct.pack("<IQQ", 3, len(tensors), len(metadata))]
    head += [_encode("", key)[4:] + _encode(key, v) for key, v in metadata.items()]  # key: a bare string
    offset = 0
    for name, (kind, value) in tensors.items():
        dims = tuple(reversed(value.shape))  # GGUF lists the innermost dimension first
        head.append(
            _encode("", name)[4:]
            + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, TENSOR_TYPE[kind], offset)
        )
        offset += _nbytes(value.shape, kind) + pad(_nbytes(value.shape, kind))
    header = b"".join(head)
    file.write(header + b"\0" * pad(len(header)))
    for kind, value in tensors.values():  # one tensor in numpy at a time
        if kind == "Q8_0":
            data = quantize_q8_0(np.asarray(value.astype(mx.float32)))
        else:
            data = np.asarray(value.astype(mx.float32 if kind == "F32" else mx.float16)).tobytes()
        file.write(data + b"\0" * pad(len(data)))


# ----------------------------------------------------------------------------- saving


def save_gguf(model: Model, tokenizer, path, gguf_type: str = "f16") -> Path:
    """Write ``model`` (and the tokenizer's metadata) to one ``.gguf`` file, atomically."""
    path = Path(path)
    if gguf_type not in GGUF_TYPES:
        raise CheckpointError(f"save: gguf_type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    if path.suffix != ".gguf":
        raise CheckpointError(f"{path}: a GGUF file name must end in .gguf")
    lora = next((k for k, _ in tree_flatten(model.parameters()) if ".lora_" in k), None)
    if lora:
        raise CheckpointError(
            f"save: the model still has adapter parameters ('{lora}'); merge them "
            "first with lora_course.fuse(model)"
        )
    metadata = gguf_metadata(model.args, gguf_type, path.stem)
    if tokenizer is not None:
        metadata.update(tokenizer_metadata(tokenizer, model.args.vocab_size))
    tensors = {}
    for name, value in gguf_tensors(model).items():
        if value.ndim == 1 or gguf_type == "f32":
            kind = "F32"
        elif gguf_type == "q8_0" and value.shape[-1] % Q8_BLOCK == 0:
            kind = "Q8_0"
        else:
            kind = "F16"  # f16, and q8_0 rows whose width is not a multiple of 32
        tensors[name] = (kind, value)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = atomic.temp_path(path)
        try:
            if gguf_type == "q8_0":
                with open(tmp, "wb") as f:
                    write_gguf(f, tensors, metadata)
            else:
                mx.save_gguf(
                    str(tmp),
                    {
                        k: v.astype(mx.float32 if kind == "F32" else mx.float16)
                        for k, (kind, v) in tensors.items()
                    },
                    metadata,
                )
                with open(tmp, "rb+") as f:  # mx.save_gguf does not flush to disk itself
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        atomic.fsync_dir(path.parent)
    except (OSError, RuntimeError) as e:
        why = getattr(e, "strerror", None) or e
        raise CheckpointError(f"{path}: writing the GGUF file failed ({why}); nothing was replaced") from None
    return path
