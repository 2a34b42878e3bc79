"""Adapters on disk, in mlx-lm's format, and PEFT's LoRA directories read in.

An adapter directory holds two files, laid out as mlx-lm writes them so either library
reads the other's adapters:

- ``adapters.safetensors``: only the trained tensors, named by their place in the model
  (``model.layers.7.self_attn.q_proj.lora_a`` (in, r), ``...lora_b`` (r, out), ``...m``
  for DoRA; whole-block weights for full fine-tuning);
- ``adapter_config.json``: ``fine_tune_type``, ``num_layers`` and ``lora_parameters``
  (``rank``, ``scale``, ``dropout``, ``keys``), plus our ``alpha`` and ``use_rslora``.

Hugging Face PEFT stores LoRA differently (``adapter_model.safetensors``, tensors named
``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`` with torch's
(out, in) convention, so PEFT's ``lora_A`` (r, in) is our ``lora_a`` transposed, and
``scale = lora_alpha / r``). :func:`load_adapters` reads such a directory directly and
:func:`convert_peft_adapter` rewrites it in our format.

Loading never runs code from the files (JSON and safetensors only) and never follows
a path named inside a config. Saving is atomic: both files are written beside their final
names and flushed, and only then renamed into place. Taught in notebook 06.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from lora_course import atomic
from lora_course.adapters.apply import KINDS, LoRAConfig, apply_lora
from lora_course.tree import tree_flatten

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


# ----------------------------------------------------------------------------- saving


def _as_dict(config) -> dict[str, Any]:
    if config is None:
        return {}
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    return dict(config if isinstance(config, dict) else vars(config))


def save_adapters(model: nn.Module, path, config=None) -> Path:
    """Write the model's trainable tensors and adapter_config.json to directory ``path``.

    ``config`` (a dict, dataclass or argparse namespace, e.g. the training arguments)
    is stored in adapter_config.json too; the adapter's own fields come from
    ``model.lora_config`` and win over same-named entries of ``config``.
    """
    lora_config = getattr(model, "lora_config", None)
    if lora_config is None:
        raise AdapterError(
            "save_adapters: the model has no adapters; call "
            "lora_course.apply_lora(model, ...) or load_adapters first"
        )
    weights = dict(tree_flatten(model.trainable_parameters()))
    if not weights:
        raise AdapterError("save_adapters: the model has no trainable parameters to save")
    data = {**_as_dict(config), **lora_config.to_dict()}
    text = json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
    path = Path(path)
    _write_pair(path, weights, text, "; any previous adapters there are unchanged")
    return path


def _write_pair(folder: Path, tensors: dict[str, mx.array], config_text: str, note: str = "") -> None:
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


# ----------------------------------------------------------------------------- reading


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise AdapterError(f"{path}: not UTF-8 text; adapter_config.json must be JSON") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_safetensors(path: Path) -> dict[str, mx.array]:
    if not path.is_file():
        raise AdapterError(
            f"{path.parent}: no {path.name} next to {ADAPTER_CONFIG}; copy the weights file too"
        )
    try:
        return mx.load(str(path))
    except (RuntimeError, ValueError, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdapterError(f"{path}: cannot read safetensors ({reason})") from None


def _parse_config(raw: dict[str, Any], file: Path) -> LoRAConfig:
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


def read_adapter(path) -> tuple[LoRAConfig, dict[str, mx.array], Path]:
    """(config, tensors, weights file) of an mlx-lm or PEFT adapter directory, not yet applied."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"{path}: no such adapter directory")
    cfg_file = path / ADAPTER_CONFIG
    if not cfg_file.is_file():
        raise AdapterError(
            f"{path}: no {ADAPTER_CONFIG} in this directory; an adapter directory "
            f"holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (or PEFT's {PEFT_WEIGHTS})"
        )
    raw = _read_json(cfg_file)
    if "peft_type" in raw or ("r" in raw and "lora_alpha" in raw):
        return _read_peft(raw, path)
    return _parse_config(raw, cfg_file), _read_safetensors(path / ADAPTER_WEIGHTS), path / ADAPTER_WEIGHTS


def load_adapters(model: nn.Module, path) -> nn.Module:
    """Rebuild the adapter layers described in ``path``/adapter_config.json and load the weights.

    Works for directories written by :func:`save_adapters`, by mlx-lm, and by PEFT
    (LoRA and DoRA). A model that already carries the same adapter layout (e.g. when
    resuming) just gets the new weights. Returns the model.
    """
    cfg, tensors, wfile = read_adapter(path)
    cfg_file = Path(path) / ADAPTER_CONFIG
    last = cfg.extra.get("peft_last_layer")
    if last is not None and last != len(model.layers) - 1:
        raise AdapterError(
            f"{wfile}: the PEFT adapter's last adapted layer is {last}, but "
            f"lora_course adapts the last blocks of this {len(model.layers)}-layer "
            "model; was it trained for another model?"
        )
    have = getattr(model, "lora_config", None)
    if have is None:
        try:
            apply_lora(
                model,
                cfg.num_layers,
                cfg.keys,
                cfg.rank,
                cfg.alpha,
                cfg.dropout,
                cfg.fine_tune_type,
                cfg.use_rslora,
            )
        except ValueError as e:
            raise AdapterError(f"{cfg_file}: {e}") from None
    else:
        same = ("fine_tune_type", "num_layers", "keys", "rank")
        if any(getattr(have, f) != getattr(cfg, f) for f in same) or not math.isclose(
            have.scale, cfg.scale, rel_tol=1e-6
        ):
            raise AdapterError(
                f"{cfg_file}: the model already has different adapters ({have.fine_tune_type}, "
                f"rank {have.rank}, last {have.num_layers} blocks, keys {have.keys}) than this file "
                f"({cfg.fine_tune_type}, rank {cfg.rank}, last {cfg.num_layers} blocks, keys "
                f"{cfg.keys}); load it into a fresh model"
            )

    expected = dict(tree_flatten(model.trainable_parameters()))
    for name, value in tensors.items():
        want = expected.get(name)
        if want is None:
            raise AdapterError(
                f"{wfile}: tensor '{name}' is not an adapter parameter of this model "
                f"(adapted: last {cfg.num_layers} blocks, keys {cfg.keys}); "
                "was the adapter trained for another model?"
            )
        if tuple(value.shape) == tuple(want.shape):
            continue
        if name.endswith((".lora_a", ".lora_b")) and value.ndim == 2:
            r = value.shape[1] if name.endswith(".lora_a") else value.shape[0]
            if r != cfg.rank:
                raise AdapterError(
                    f"{wfile}: rank mismatch: tensor '{name}' has rank {r} (shape "
                    f"{tuple(value.shape)}) but {ADAPTER_CONFIG} says rank {cfg.rank}"
                )
        raise AdapterError(
            f"{wfile}: tensor '{name}' has shape {tuple(value.shape)}, but the "
            f"model expects {tuple(want.shape)}; was it trained for another model?"
        )
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise AdapterError(
            f"{wfile}: tensor '{missing[0]}' is missing ({len(missing)} of "
            f"{len(expected)} adapter tensors missing); the file is incomplete"
        )
    # strict=False: the file covers only the adapter tensors, all checked above
    model.load_weights([(k, v.astype(expected[k].dtype)) for k, v in tensors.items()], strict=False)
    return model


# ----------------------------------------------------------------------------- PEFT


def _read_peft(raw: dict[str, Any], path: Path) -> tuple[LoRAConfig, dict[str, mx.array], Path]:
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
    for name, value in _read_safetensors(wfile).items():
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


def convert_peft_adapter(peft_dir, out_dir) -> Path:
    """Rewrite a PEFT LoRA/DoRA adapter directory in our (mlx-lm's) format; returns ``out_dir``.

    lora_A (r, in) becomes lora_a (in, r), lora_B (out, r) becomes lora_b (r, out),
    and ``scale = lora_alpha / r`` (``/ sqrt(r)`` with use_rslora).
    """
    raw = _read_json(Path(peft_dir) / ADAPTER_CONFIG) if (Path(peft_dir) / ADAPTER_CONFIG).is_file() else None
    if raw is None or not ("peft_type" in raw or "lora_alpha" in raw):
        raise AdapterError(
            f"{peft_dir}: not a PEFT adapter directory (adapter_config.json with "
            "peft_type, r and lora_alpha, plus adapter_model.safetensors)"
        )
    cfg, tensors, _ = _read_peft(raw, Path(peft_dir))
    out = Path(out_dir)
    _write_pair(out, tensors, json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    return out
