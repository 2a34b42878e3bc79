"""What an adapter directory holds, and reading it safely: names, config, tensors.

The lowest layer of ``lora_course.adapters``' file handling: the file names, the
error type, the checked readers of ``adapter_config.json`` and ``*.safetensors``, and
the atomic writer of a (weights, config) pair. ``peft.py`` and ``files.py`` build on it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import mlx.core as mx

from lora_course import atomic
from lora_course.adapters.apply import KINDS, LoRAConfig

ADAPTER_WEIGHTS = "adapters.safetensors"


ADAPTER_CONFIG = "adapter_config.json"


PEFT_WEIGHTS = "adapter_model.safetensors"


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


def write_pair(folder: Path, tensors: dict[str, mx.array], config_text: str, note: str = "") -> None:
    """adapters.safetensors + adapter_config.json into ``folder``. Both files are written
    before either replaces the old pair, so a full disk leaves the old pair whole."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic.FileSet() as files:
            files.write(folder / ADAPTER_WEIGHTS, lambda f: mx.save_safetensors(f, tensors))
            files.write(folder / ADAPTER_CONFIG, config_text)
    except (OSError, RuntimeError) as e:  # MLX may report a write error as RuntimeError
        why = getattr(e, "strerror", None) or e
        raise AdapterError(f"{folder}: cannot write adapters ({why}){note}") from None


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise AdapterError(f"{path}: not UTF-8 text; adapter_config.json must be JSON") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_safetensors(path: Path) -> dict[str, mx.array]:
    if not path.is_file():
        raise AdapterError(
            f"{path.parent}: no {path.name} next to {ADAPTER_CONFIG}; copy the weights file too"
        )
    try:
        return mx.load(str(path))
    except (RuntimeError, ValueError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdapterError(f"{path}: cannot read safetensors ({reason})") from None


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
