"""What an adapter directory holds, and reading it safely: names, config, tensors.

The lowest layer of ``lora_course.adapters``' file handling: the file names, the
error type, the checked readers of ``adapter_config.json`` and ``*.safetensors``, and
the atomic writer of a (weights, config) pair. ``peft.py`` and ``files.py`` build on it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

from lora_course import atomic
from lora_course.adapters.apply import KINDS, LoRAConfig
from lora_course.safe_io import InputError, check_safetensors, read_json_object

import mlx.core as mx

ADAPTER_WEIGHTS = "adapters.safetensors"


ADAPTER_CONFIG = "adapter_config.json"


PEFT_WEIGHTS = "adapter_model.safetensors"


# A random id written into both files of a save (the config key and the safetensors
# metadata): two files with different ids come from two different saves.
SAVE_ID = "lora_course_save_id"


# A key names a module inside a block: dotted identifiers, nothing that climbs out of it.
KEY_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")


PEFT_TENSOR = re.compile(
    r"(?:base_model\.model\.)?model\.layers\.(\d+)\.([A-Za-z0-9_.]+?)\."
    r"(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)"
)


class AdapterError(ValueError):
    """An adapter directory that cannot be saved, read or applied; names the file and tensor."""


def as_dict(config) -> dict[str, Any]:
    if config is None:
        return {}
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    return dict(config if isinstance(config, dict) else vars(config))


def write_pair(folder: Path, tensors: dict[str, mx.array], config: dict, note: str = "") -> None:
    """adapters.safetensors + adapter_config.json into ``folder``, tagged with one save id.

    Both files are written before either replaces its old version, so a full disk leaves
    the old pair whole; an exclusive lock on ``folder`` keeps a second writer (another
    process) from interleaving its renames with ours.
    """
    save_id = content_id(tensors, config)
    text = json.dumps({**config, SAVE_ID: save_id}, indent=2, sort_keys=True, default=str) + "\n"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic.locked(folder), atomic.FileSet() as files:
            meta = {SAVE_ID: save_id}
            files.write(folder / ADAPTER_WEIGHTS, lambda f: mx.save_safetensors(f, tensors, metadata=meta))
            files.write(folder / ADAPTER_CONFIG, text)
    except (OSError, RuntimeError) as e:  # MLX may report a write error as RuntimeError
        why = getattr(e, "strerror", None) or e
        raise AdapterError(f"{folder}: cannot write adapters ({why}){note}") from None


def content_id(tensors: dict[str, mx.array], config: dict) -> str:
    """A digest of what a save holds: saves of the same adapter get the same id (so files
    stay byte-identical), any two that differ get different ones."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name in sorted(tensors):
        value = mx.contiguous(tensors[name])  # (a transposed view has no flat buffer)
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(memoryview(value.view(mx.uint16) if value.dtype == mx.bfloat16 else value))
    return digest.hexdigest()[:16]


def check_same_save(config: dict, metadata: dict, cfg_file: Path, weights: Path) -> None:
    """Refuse a weights file and a config written by two different saves (a crash between
    two renames, or a file copied in from elsewhere); files without an id pass."""
    a, b = config.get(SAVE_ID), (metadata or {}).get(SAVE_ID)
    if a is not None and b is not None and a != b:
        raise AdapterError(
            f"{weights}: written by another save than {cfg_file.name} ({SAVE_ID} {str(b)[:20]!r} "
            f"vs {str(a)[:20]!r}); the pair is mixed: save the adapters again"
        )


def read_json(path: Path) -> dict[str, Any]:
    try:
        return read_json_object(path)
    except InputError as e:
        raise AdapterError(str(e)) from None


def read_safetensors(path: Path) -> tuple[dict[str, mx.array], dict[str, str]]:
    """(tensors, metadata), every tensor checked: a float dtype and finite values."""
    if not path.exists():
        raise AdapterError(
            f"{path.parent}: no {path.name} next to {ADAPTER_CONFIG}; copy the weights file too"
        )
    try:
        check_safetensors(path)  # a regular file with a sound header, before MLX reads it
        tensors, metadata = mx.load(str(path), return_metadata=True)
    except InputError as e:
        raise AdapterError(str(e)) from None
    except (RuntimeError, ValueError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdapterError(f"{path}: cannot read safetensors ({reason})") from None
    for name, value in tensors.items():  # NaN weights would generate garbage, silently
        if value.dtype not in (mx.float16, mx.bfloat16, mx.float32):
            raise AdapterError(
                f"{path}: tensor '{name}' has dtype {str(value.dtype).split('.')[-1]}; "
                "adapter tensors are float16, bfloat16 or float32"
            )
        if not mx.all(mx.isfinite(value)).item():
            raise AdapterError(f"{path}: tensor '{name}' holds NaN or inf values; the adapter is broken")
    return tensors, metadata


def parse_config(raw: dict[str, Any], file: Path) -> LoRAConfig:
    """Check an mlx-lm style adapter_config.json and turn it into a LoRAConfig."""
    kind = raw.get("fine_tune_type", "lora")  # mlx-lm's default
    if kind not in KINDS:
        raise AdapterError(f"{file}: fine_tune_type {kind!r} is not one of {', '.join(KINDS)}")
    n = raw.get("num_layers")
    if not isinstance(n, int) or isinstance(n, bool):
        raise AdapterError(f"{file}: 'num_layers' must be an integer, got {n!r}")
    if kind == "full":
        return LoRAConfig("full", n, None)
    params = raw.get("lora_parameters")
    if not isinstance(params, dict):
        raise AdapterError(f"{file}: 'lora_parameters' must be an object with rank and scale")
    rank = params.get("rank")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterError(f"{file}: lora_parameters 'rank' must be a positive integer, got {rank!r}")
    for name in ("scale", "alpha", "dropout"):
        v = params.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise AdapterError(f"{file}: lora_parameters '{name}' must be a number, got {v!r}")
    if params.get("scale") is None and params.get("alpha") is None:
        raise AdapterError(f"{file}: lora_parameters needs 'scale' (mlx-lm) or 'alpha'")
    keys = params.get("keys")
    if keys is not None:
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise AdapterError(f"{file}: lora_parameters 'keys' must be a list of module paths")
        for k in keys:
            if not KEY_PATTERN.fullmatch(k) or k.startswith(("model.", "layers.")):
                raise AdapterError(
                    f"{file}: key {k!r} is not a module path inside a block "
                    "(like 'self_attn.q_proj'); keys cannot reach outside a block"
                )
    cfg = LoRAConfig.from_dict({**raw, "fine_tune_type": kind})
    if params.get("scale") is not None and params.get("alpha") is not None:
        if not math.isclose(cfg.scale, params["scale"], rel_tol=1e-6):
            raise AdapterError(
                f"{file}: scale {params['scale']} disagrees with alpha "
                f"{params['alpha']} and rank {rank} (expected {cfg.scale:g})"
            )
    return cfg
