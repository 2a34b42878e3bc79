"""PEFT's LoRA directories (``adapter_config.json`` + ``adapter_model.safetensors``).

PEFT (the Hugging Face library) stores ``lora_A`` as (r, in) and ``lora_B`` as (out, r),
named by their place in the transformers model; ours are the transposes, named as in
mlx-lm. This module reads PEFT's layout into ours. Taught in notebook 06.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx

from lora_course.adapters.apply import LoRAConfig
from lora_course.adapters.format import (
    ADAPTER_CONFIG,
    PEFT_TENSOR,
    PEFT_WEIGHTS,
    AdapterError,
    read_safetensors,
)


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
