"""Saving a model: the MLX layout (quantized weights kept) or plain Hugging Face.

Saving is atomic (``lora_course.atomic``): everything is written into a temporary
directory beside the target, which is then renamed into place.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lora_course import atomic
from lora_course.checkpoint.files import (
    CHECKPOINT_FILES,
    DEFAULT_SHARD_MB,
    INDEX,
    CheckpointError,
    dtype_name,
)
from lora_course.checkpoint.gguf_write import save_gguf
from lora_course.checkpoint.layouts import hf_weights, quantized_modules
from lora_course.checkpoint.weights import FLOATS
from lora_course.model.transformer import Model
from lora_course.tokenizer.spm import Tokenizer
from lora_course.tree import tree_flatten

import mlx.core as mx


def _quantization_config(model) -> dict | None:
    """``{"group_size", "bits"}`` of the quantized layers, plus per-layer entries that differ."""
    mods = quantized_modules(model)
    if not mods:
        return None
    first = next(iter(mods.values()))
    q = {"group_size": first.group_size, "bits": first.bits}
    if getattr(first, "mode", "affine") != "affine":
        q["mode"] = first.mode
    for path, m in mods.items():
        if (m.group_size, m.bits) != (q["group_size"], q["bits"]):
            q[path] = {"group_size": m.group_size, "bits": m.bits}
    return q


def _dtype_name(weights: dict[str, mx.array]) -> str:
    return next((dtype_name(v.dtype) for v in weights.values() if v.dtype in FLOATS), "float32")


def save(
    model: Model,
    tokenizer: Tokenizer | None,
    path,
    format: str = "mlx",
    shard_size_mb: float = DEFAULT_SHARD_MB,
    gguf_type: str = "f16",
) -> Path:
    """Write ``model`` (and ``tokenizer``) as a checkpoint directory at ``path``, atomically.

    ``format="mlx"`` keeps quantized layers and RoPE layout as they are; ``format="hf"``
    writes a plain Hugging Face checkpoint (dequantized, HF RoPE layout) that
    ``transformers.AutoModelForCausalLM.from_pretrained`` loads. Weights above
    ``shard_size_mb`` are split into shards with an index. An existing directory is
    replaced only if it holds nothing but checkpoint files.

    ``format="gguf"`` writes one llama.cpp ``.gguf`` file at ``path`` instead, its
    tensors stored as ``gguf_type`` ("f16", "f32" or "q8_0"); see ``gguf_write.py``.
    """
    if format == "gguf":
        return save_gguf(model, tokenizer, path, gguf_type)
    if format not in ("mlx", "hf"):
        raise CheckpointError(f"save: format must be 'mlx', 'hf' or 'gguf', got {format!r}")
    names = [k for k, _ in tree_flatten(model.parameters())]
    lora = next((k for k in names if ".lora_" in k), None)
    if lora:
        raise CheckpointError(
            f"save: the model still has adapter parameters ('{lora}'); merge them "
            "first with lora_course.fuse(model), or save the adapters alone"
        )
    path = Path(path)
    _check_replaceable(path)
    args = model.args
    if format == "hf":
        weights = hf_weights(model)
        config = {k: v for k, v in args.to_hf_dict().items() if k != "quantization"}
    else:
        weights = dict(tree_flatten(model.parameters()))
        config = args.to_hf_dict()
        config.pop("quantization", None)
        quantization = _quantization_config(model)  # read from the layers, not trusted from args
        if quantization:
            config["quantization"] = quantization
        if args.rope_traditional:
            config["rope_traditional"] = True
    config["torch_dtype"] = config["dtype"] = _dtype_name(weights)
    if tokenizer is not None:
        eos = list(tokenizer.eos_ids) or None  # Llama 3 declares several
        config["bos_token_id"] = tokenizer.bos_id
        config["eos_token_id"] = eos if eos is None or len(eos) > 1 else eos[0]

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = atomic.temp_dir(path)  # the new version is built beside the old, then swapped in
    except OSError as e:
        raise CheckpointError(f"{path}: cannot write here ({e.strerror}); nothing was changed") from None
    try:
        _write_shards(tmp, weights, shard_size_mb, {"format": "pt" if format == "hf" else "mlx"})
        del weights
        atomic.write_json(tmp / "config.json", config)
        if tokenizer is not None:
            tokenizer.save(tmp)
        atomic.fsync_files(tmp)
        atomic.replace_dir(tmp, path)
    except (OSError, RuntimeError) as e:  # mx.save_safetensors reports a full disk as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        why = getattr(e, "strerror", None) or e
        raise CheckpointError(
            f"{path}: writing the checkpoint failed ({why}); the previous contents are unchanged"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _check_replaceable(path: Path) -> None:
    if not path.exists():
        return
    if not path.is_dir():
        raise CheckpointError(f"{path}: exists and is a file; save needs a directory path")
    for child in path.iterdir():
        if child.is_dir() or not CHECKPOINT_FILES.match(child.name):
            raise CheckpointError(
                f"{path}: exists and holds '{child.name}', which is not a checkpoint "
                "file; save to a new or empty directory (nothing was written)"
            )


def _write_shards(folder: Path, weights: dict, shard_size_mb: float, metadata: dict) -> None:
    limit = shard_size_mb * 2**20
    shards, current, size = [], {}, 0
    for name in sorted(weights):
        nbytes = weights[name].nbytes
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = {}, 0
        current[name] = weights[name]
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        mx.save_safetensors(str(folder / "model.safetensors"), shards[0], metadata=metadata)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(folder / file), shard, metadata=metadata)  # evaluates this shard only
        weight_map.update({k: file for k in shard})
        total += sum(v.nbytes for v in shard.values())
    shards.clear()
    atomic.write_json(folder / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
