"""Meta / Mistral original checkpoints: ``params.json`` + ``consolidated.*.pth``.

Meta's Llama releases (Touvron et al. 2023, "Llama 2", arXiv:2307.09288) and Mistral's
original downloads differ from the Hugging Face layout in three ways, each undone here:

- **names**: ``layers.0.attention.wq.weight`` instead of
  ``model.layers.0.self_attn.q_proj.weight``; :data:`META_NAMES` maps one to the other;
- **shards**: a model-parallel release splits each tensor over ``consolidated.00.pth``,
  ``consolidated.01.pth``, ... (by rows for most matrices, by columns for ``wo``, ``w2``
  and the embedding); :func:`meta_concat_axis` says which, and the shards are joined back;
- **container**: ``.pth`` is a pickle; :func:`torch_load` reads it with
  ``torch.load(weights_only=True)``, which refuses pickled code. Newer Mistral releases
  use ``consolidated.safetensors`` with the same names.

RoPE layout: Meta's q/k weights rotate interleaved feature pairs ``(x0, x1), (x2, x3),
...`` (Su et al. 2021, "RoFormer", arXiv:2104.09864); HF's Llama permutes the rows so
that it rotates halves ``(x_i, x_{i + d/2})``. We load Meta weights as they are and
build the model with ``rope_traditional=True``; :func:`interleaved_to_halves` is the
permutation applied only when such a model is saved in HF format.

The rest (config checks, tensor checks, the tokenizer) is shared with HF checkpoints in
the rest of ``lora_course.checkpoint``. Taught in notebook 04 (checkpoints, tokenizers and sampling).
"""

from __future__ import annotations

import re
from pathlib import Path

from lora_course.checkpoint.config import read_config
from lora_course.checkpoint.files import CheckpointError, mx_load, read_json
from lora_course.checkpoint.weights import load_weights
from lora_course.model.transformer import Model
from lora_course.safe_io import InputError, regular_file

import mlx.core as mx

META_NAMES = [  # Meta / Mistral original name -> ours
    (r"^tok_embeddings\.", "model.embed_tokens."),
    (r"^norm\.", "model.norm."),
    (r"^output\.", "lm_head."),
    (r"^layers\.(\d+)\.attention\.w([qkvo])\.", r"model.layers.\1.self_attn.\2_proj."),
    (r"^layers\.(\d+)\.feed_forward\.w1\.", r"model.layers.\1.mlp.gate_proj."),
    (r"^layers\.(\d+)\.feed_forward\.w2\.", r"model.layers.\1.mlp.down_proj."),
    (r"^layers\.(\d+)\.feed_forward\.w3\.", r"model.layers.\1.mlp.up_proj."),
    (r"^layers\.(\d+)\.attention_norm\.", r"model.layers.\1.input_layernorm."),
    (r"^layers\.(\d+)\.ffn_norm\.", r"model.layers.\1.post_attention_layernorm."),
]


def meta_to_hf_name(name: str) -> str:
    """``layers.0.attention.wq.weight`` -> ``model.layers.0.self_attn.q_proj.weight``."""
    for pattern, repl in META_NAMES:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name


def meta_concat_axis(name: str) -> int | None:
    """How model-parallel shards of Meta checkpoints split a tensor (None: replicated)."""
    if re.search(r"(norm|rope)", name):
        return None
    if re.search(r"(attention\.wo|feed_forward\.w2|tok_embeddings)\.", name):
        return 1
    return 0


def load_meta(folder: Path, lazy: bool) -> Model:
    """A model from a Meta / Mistral original checkpoint directory (weights checked and loaded)."""
    args_path = folder / "params.json"
    safetensors = sorted(folder.glob("consolidated*.safetensors"))
    if safetensors:  # newer Mistral releases: Meta names, safetensors container
        shards = [mx_load(f) for f in safetensors]
        first = safetensors[0]
    else:
        pths = sorted(folder.glob("consolidated.*.pth"))
        if not pths:
            raise CheckpointError(
                f"{folder}: params.json but no consolidated.*.pth or consolidated.safetensors weights"
            )
        shards = [torch_load(f) for f in pths]
        first = pths[0]
    merged = {}
    for name in shards[0]:
        parts = [s[name] for s in shards if name in s]
        axis = meta_concat_axis(name)
        try:
            merged[meta_to_hf_name(name)] = (
                parts[0] if len(parts) == 1 or axis is None else mx.concatenate(parts, axis=axis)
            )
        except ValueError as e:  # shards whose shapes do not join
            raise CheckpointError(f"{first}: tensor '{name}': the shards do not fit together ({e})") from None
    del shards
    config = read_json(args_path)
    args = read_config(folder)
    embed = merged.get("model.embed_tokens.weight")
    if embed is not None and (config.get("vocab_size") in (None, -1) or args.vocab_size <= 0):
        args.vocab_size = embed.shape[0]  # Llama 1/2 params.json says vocab_size: -1
    if "lm_head.weight" not in merged:
        args.tie_word_embeddings = True
    model = Model(args)
    load_weights(model, [(first, merged)], folder, lazy)
    return model


def torch_load(path: Path) -> dict[str, mx.array]:
    """Read a ``.pth`` state dict without running pickled code, as MLX arrays."""
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path}: reading .pth weights needs PyTorch: pip install torch "
            "(or convert the checkpoint to safetensors elsewhere)"
        ) from None
    try:
        regular_file(path)  # a FIFO or a device would hang or never end
    except InputError as e:
        raise CheckpointError(str(e)) from None
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except Exception as e:  # noqa: BLE001  (UnpicklingError, zip errors ...: one line for people)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: refused to load: not a plain tensor checkpoint (torch.load weights_only=True: {reason})"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    out = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{path}: entry '{name}' is a {type(t).__name__}, not a tensor")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise CheckpointError(
                f"{path}: tensor '{name}' has dtype {str(t.dtype).replace('torch.', '')}; "
                "lora_course reads float32, float16 and bfloat16 weights"
            )
        t = t.contiguous()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: move the raw bits
            out[name] = mx.array(t.view(torch.uint16).numpy()).view(mx.bfloat16)
        else:
            out[name] = mx.array(t.numpy())
    return out


def interleaved_to_halves(w: mx.array, n_heads: int) -> mx.array:
    """Reorder q/k output rows from RoPE's interleaved pairs to the HF half-split layout."""
    rows = w.shape[0]
    head_dim = rows // n_heads
    w = w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:])  # (heads, pairs, 2, ...)
    return w.swapaxes(1, 2).reshape(rows, *w.shape[3:])  # (heads * head_dim, ...)
