"""A checkpoint's config: ``config.json`` or ``params.json`` checked, then ``ModelArgs``.

Required keys, types and ranges are checked here, at the boundary, so a bad value
fails naming the file and key instead of deep inside MLX.
"""

from __future__ import annotations

import math
from pathlib import Path

from lora_course.checkpoint.files import CheckpointError, detect_format, read_json
from lora_course.model.args import ModelArgs, memory_problem

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")  # one architecture, switched by ModelArgs' fields


# HF config.json keys without which the model cannot be built (ModelArgs' defaults are 7B's).
REQUIRED_HF = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
)


REQUIRED_META = ("dim", "n_layers", "n_heads")


# Optional keys (HF and Meta spellings) and what they must hold when present and not null.
OPTIONAL = {
    "num_key_value_heads": "int",
    "n_kv_heads": "int",
    "head_dim": "int",
    "max_position_embeddings": "int",
    "rms_norm_eps": "float",
    "norm_eps": "float",
    "rope_theta": "float",
    "tie_word_embeddings": "bool",
    "attention_bias": "bool",
    "mlp_bias": "bool",
    "rope_scaling": "dict",
    "sliding_window": "int",
    "rope_parameters": "dict",
}


def read_config(folder: Path) -> ModelArgs:
    """Build ``ModelArgs`` from ``config.json`` or ``params.json``, checking required keys."""
    fmt = detect_format(folder)
    path = folder / ("config.json" if fmt == "hf" else "params.json")
    config = read_json(path)
    for key in REQUIRED_HF if fmt == "hf" else REQUIRED_META:
        if key not in config:
            raise CheckpointError(f"{path}: missing required key '{key}'")
        value = config[key]
        if key != "model_type" and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise CheckpointError(f"{path}: key '{key}' must be a positive integer, got {value!r}")
    if fmt == "hf":
        unsupported = _unsupported(config)
        if unsupported:
            raise CheckpointError(f"{path}: {unsupported}")
    elif "sliding_window" in config:
        config.setdefault("model_type", "mistral")
    _check_optional(path, config)
    dim, heads = (
        (config["hidden_size"], config["num_attention_heads"])
        if fmt == "hf"
        else (config["dim"], config["n_heads"])
    )
    head_dim = config.get("head_dim") or dim // heads
    if head_dim < 2 or head_dim % 2:  # RoPE rotates pairs of features
        source = "key 'head_dim'" if config.get("head_dim") else f"{dim} / {heads} heads"
        raise CheckpointError(
            f"{path}: attention heads would be {head_dim} wide ({source}); "
            "RoPE needs an even head width of at least 2"
        )
    try:
        args = ModelArgs.from_dict(config)
    except (TypeError, ValueError, ArithmeticError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    why = memory_problem(args)  # before anything is allocated
    if why:
        raise CheckpointError(f"{path}: {why}; is this config.json right?")
    return args


def _unsupported(config: dict) -> str | None:
    """What in an HF config.json this architecture cannot compute, in a few words, or None."""
    kind = config["model_type"]
    if kind not in SUPPORTED_TYPES:
        return f"model_type {kind!r} is not supported (lora_course reads {', '.join(SUPPORTED_TYPES)})"
    act = config.get("hidden_act", "silu")
    if act != "silu":
        return f"hidden_act {act!r} is not supported (lora_course's feed-forward is SwiGLU: 'silu')"
    if kind == "qwen2" and config.get("use_sliding_window"):
        return "use_sliding_window: true (Qwen2's per-layer window) is not supported"
    layer_types = config.get("layer_types")
    others = set(map(str, layer_types)) - {"full_attention"} if isinstance(layer_types, list) else set()
    if kind != "mistral" and others:
        other = sorted(others)[0]
        return f"layer_types {other!r} is not supported (only 'full_attention' layers)"
    for place in ("rope_parameters", "rope_scaling"):
        rope = config.get(place)
        partial = rope.get("partial_rotary_factor", 1.0) if isinstance(rope, dict) else 1.0
        if partial != 1.0:
            return f"{place}.partial_rotary_factor {partial!r} is not supported (RoPE on every feature)"
    return None


def _check_optional(path: Path, config: dict) -> None:
    """Wrong types in optional keys fail here, naming the key, not deep inside the model."""
    wants = {
        "int": "a positive integer",
        "float": "a positive number",
        "bool": "true or false",
        "dict": "an object (or null)",
    }
    for key, kind in OPTIONAL.items():
        value = config.get(key)
        if value is None:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = {
            "int": number and isinstance(value, int) and value > 0,
            "float": number and math.isfinite(value) and value > 0,
            "bool": isinstance(value, bool),
            "dict": isinstance(value, dict),
        }[kind]
        if not ok:
            raise CheckpointError(f"{path}: key '{key}' must be {wants[kind]}, got {repr(value)[:60]}")
    theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and not (
        isinstance(theta, (int, float)) and not isinstance(theta, bool) and math.isfinite(theta) and theta > 0
    ):
        raise CheckpointError(
            f"{path}: key 'rope_parameters.rope_theta' must be a positive number, got {theta!r}"
        )
