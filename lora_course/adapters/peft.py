"""PEFT's LoRA directories (``adapter_config.json`` + ``adapter_model.safetensors``).

PEFT (the Hugging Face library) stores ``lora_A`` as (r, in) and ``lora_B`` as (out, r),
named by their place in the transformers model; ours are the transposes, named as in
mlx-lm. This module reads PEFT's layout into ours and writes ours as PEFT's, so
``peft.PeftModel.from_pretrained`` applies an adapter trained here. Taught in notebook 06.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from lora_course import atomic
from lora_course.adapters.apply import LoRAConfig
from lora_course.adapters.format import (
    ADAPTER_CONFIG,
    PEFT_TENSOR,
    PEFT_WEIGHTS,
    AdapterError,
    read_safetensors,
)
from lora_course.tree import tree_flatten

import mlx.core as mx
import mlx.nn as nn


def read_peft(raw: dict[str, Any], path: Path) -> tuple[LoRAConfig, dict[str, mx.array], Path]:
    """A PEFT LoRA/DoRA directory as (our config, our tensors, its weights file)."""
    cfg_file, wfile = path / ADAPTER_CONFIG, path / PEFT_WEIGHTS
    if raw.get("peft_type", "LORA") != "LORA":
        raise AdapterError(
            f"{cfg_file}: peft_type {raw['peft_type']!r} is not LoRA; only LoRA and "
            "DoRA adapters can be imported"
        )
    unsupported = {
        "bias": "none",
        "lora_bias": False,
        "fan_in_fan_out": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "layer_replication": None,
    }
    for key, ok in unsupported.items():
        if raw.get(key, ok) not in (ok, None, {}, [], False, "none"):
            raise AdapterError(
                f"{cfg_file}: '{key}': {raw[key]!r} is not supported by lora_course (it needs {key} = {ok!r})"
            )
    if not wfile.is_file() and (path / "adapter_model.bin").is_file():
        raise AdapterError(
            f"{path}: only adapter_model.bin (a pickle) is there; lora_course does "
            "not unpickle files: re-save the adapter with safe_serialization=True"
        )
    r, alpha = raw.get("r"), raw.get("lora_alpha", raw.get("r"))
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise AdapterError(f"{cfg_file}: 'r' must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise AdapterError(f"{cfg_file}: 'lora_alpha' must be a number, got {alpha!r}")
    kind = "dora" if raw.get("use_dora") else "lora"
    ours, layers, keys = {}, set(), set()
    for name, value in read_safetensors(wfile)[0].items():
        m = PEFT_TENSOR.fullmatch(name)
        if m is None:
            raise AdapterError(
                f"{wfile}: tensor '{name}' is not a LoRA tensor of a transformer "
                "block (model.layers.N...); lora_course imports only those"
            )
        layer, key, part = int(m.group(1)), m.group(2), m.group(3)
        base = f"model.layers.{layer}.{key}"
        if part == "lora_A.weight":
            ours[f"{base}.lora_a"] = value.T  # (r, in) -> (in, r)
        elif part == "lora_B.weight":
            ours[f"{base}.lora_b"] = value.T  # (out, r) -> (r, out)
        else:
            ours[f"{base}.m"] = value.reshape(-1)  # (out,)
        layers.add(layer)
        keys.add(key)
    if not ours:
        raise AdapterError(f"{wfile}: holds no LoRA tensors")
    first, last = min(layers), max(layers)
    if layers != set(range(first, last + 1)):
        raise AdapterError(
            f"{wfile}: adapts layers {sorted(layers)}, not a contiguous run; "
            "lora_course adapts the last num_layers blocks"
        )
    cfg = LoRAConfig(
        kind,
        len(layers),
        sorted(keys),
        r,
        float(alpha),
        float(raw.get("lora_dropout") or 0.0),
        bool(raw.get("use_rslora")),
        extra={
            "converted_from": "peft",
            "peft_last_layer": last,
            "base_model_name_or_path": raw.get("base_model_name_or_path"),
        },
    )
    return cfg, ours, wfile


OUR_TENSOR = re.compile(r"model\.layers\.(\d+)\.([A-Za-z0-9_.]+)\.(lora_a|lora_b|m)")


def peft_tensors(tensors: dict[str, mx.array]) -> dict[str, mx.array]:
    """Our adapter tensors renamed and transposed to PEFT's layout."""
    out = {}
    for name, value in tensors.items():
        m = OUR_TENSOR.fullmatch(name)
        if m is None:
            raise AdapterError(
                f"save_adapters: tensor '{name}' is not a LoRA/DoRA tensor of a "
                "transformer block; PEFT's format holds only those"
            )
        base = f"base_model.model.model.layers.{m.group(1)}.{m.group(2)}"
        if m.group(3) == "lora_a":
            out[f"{base}.lora_A.weight"] = value.T  # (in, r) -> (r, in)
        elif m.group(3) == "lora_b":
            out[f"{base}.lora_B.weight"] = value.T  # (r, out) -> (out, r)
        else:
            out[f"{base}.lora_magnitude_vector"] = value  # (out,)
    return out


def peft_config(cfg: LoRAConfig, layers: list[int], base_model: str | None = None) -> dict:
    """PEFT's adapter_config.json for ``cfg`` applied to blocks ``layers``."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.use_rslora,
        "use_dora": cfg.fine_tune_type == "dora",
        "target_modules": sorted(cfg.keys),  # e.g. "self_attn.q_proj": PEFT matches name suffixes
        "layers_to_transform": layers,
        "layers_pattern": "layers",
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
    }


def _check_kind(cfg: LoRAConfig) -> None:
    if cfg.fine_tune_type == "full":
        raise AdapterError(
            "save_adapters: full fine-tuning has no PEFT adapter form; save the "
            "model with lora_course.save(..., format='hf') instead"
        )


def write_peft(path, cfg: LoRAConfig, tensors: dict[str, mx.array], base_model: str | None = None) -> Path:
    """Write our adapter (``cfg`` + tensors named as in the model) as a PEFT directory."""
    _check_kind(cfg)
    layers = sorted({int(m.group(1)) for k in tensors if (m := OUR_TENSOR.fullmatch(k))})
    weights = peft_tensors(tensors)
    base_model = base_model or cfg.extra.get("base_model_name_or_path")
    text = json.dumps(peft_config(cfg, layers, base_model), indent=2, sort_keys=True) + "\n"
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with atomic.FileSet() as files:
            files.write(
                path / PEFT_WEIGHTS, lambda f: mx.save_safetensors(f, weights, metadata={"format": "pt"})
            )
            files.write(path / ADAPTER_CONFIG, text)
    except (OSError, RuntimeError) as e:
        why = getattr(e, "strerror", None) or e
        raise AdapterError(f"{path}: cannot write the PEFT adapter ({why})") from None
    return path


def save_peft(model: nn.Module, path, base_model: str | None = None) -> Path:
    """The model's LoRA/DoRA adapters as a PEFT directory at ``path``."""
    cfg = getattr(model, "lora_config", None)
    if cfg is None:
        raise AdapterError(
            "save_adapters: the model has no adapters; call "
            "lora_course.apply_lora(model, ...) or load_adapters first"
        )
    _check_kind(cfg)
    tensors = {k: v for k, v in tree_flatten(model.parameters()) if OUR_TENSOR.fullmatch(k)}
    if not tensors:
        raise AdapterError("save_adapters: the model has no LoRA/DoRA tensors to save")
    return write_peft(path, cfg, tensors, base_model)
