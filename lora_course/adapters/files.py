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

import math
from pathlib import Path

from lora_course import atomic
from lora_course.adapters.apply import LoRAConfig, apply_lora
from lora_course.adapters.format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PEFT_WEIGHTS,
    AdapterError,
    as_dict,
    check_same_save,
    parse_config,
    read_json,
    read_safetensors,
    write_pair,
)
from lora_course.adapters.peft import read_peft, save_peft, write_peft
from lora_course.tree import tree_flatten

import mlx.core as mx
import mlx.nn as nn


def save_adapters(model: nn.Module, path, config=None, format: str = "mlx") -> Path:
    """Write the model's trainable tensors and adapter_config.json to directory ``path``.

    ``config`` (a dict, dataclass or argparse namespace, e.g. the training arguments)
    is stored in adapter_config.json too; the adapter's own fields come from
    ``model.lora_config`` and win over same-named entries of ``config``.
    ``format="peft"`` writes Hugging Face PEFT's layout instead (``peft.py``);
    ``config`` may then carry ``base_model_name_or_path``.
    """
    if format == "peft":
        return save_peft(model, path, as_dict(config or {}).get("base_model_name_or_path"))
    if format != "mlx":
        raise AdapterError(f"save_adapters: format must be 'mlx' or 'peft', got {format!r}")
    lora_config = getattr(model, "lora_config", None)
    if lora_config is None:
        raise AdapterError(
            "save_adapters: the model has no adapters; call "
            "lora_course.apply_lora(model, ...) or load_adapters first"
        )
    weights = dict(tree_flatten(model.trainable_parameters()))
    if not weights:
        raise AdapterError("save_adapters: the model has no trainable parameters to save")
    data = {**as_dict(config), **lora_config.to_dict()}
    path = Path(path)
    write_pair(path, weights, data, "; any previous adapters there are unchanged")
    return path


def read_adapter(path) -> tuple[LoRAConfig, dict[str, mx.array], Path]:
    """(config, tensors, weights file) of an mlx-lm or PEFT adapter directory, not yet applied."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"{path}: no such adapter directory")
    cfg_file = path / ADAPTER_CONFIG
    if not cfg_file.exists() and not cfg_file.is_symlink():  # (a FIFO or device: safe_io says so)
        raise AdapterError(
            f"{path}: no {ADAPTER_CONFIG} in this directory; an adapter directory "
            f"holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (or PEFT's {PEFT_WEIGHTS})"
        )
    with atomic.locked(path, shared=True):  # no save may swap files while we read
        raw = read_json(cfg_file)
        if "peft_type" in raw or ("r" in raw and "lora_alpha" in raw):
            return read_peft(raw, path)
        cfg = parse_config(raw, cfg_file)
        tensors, metadata = read_safetensors(path / ADAPTER_WEIGHTS)
    check_same_save(raw, metadata, cfg_file, path / ADAPTER_WEIGHTS)
    return cfg, tensors, path / ADAPTER_WEIGHTS


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


def convert_peft_adapter(peft_dir, out_dir) -> Path:
    """Rewrite a PEFT LoRA/DoRA adapter directory in our (mlx-lm's) format; returns ``out_dir``.

    lora_A (r, in) becomes lora_a (in, r), lora_B (out, r) becomes lora_b (r, out),
    and ``scale = lora_alpha / r`` (``/ sqrt(r)`` with use_rslora).
    """
    raw = read_json(Path(peft_dir) / ADAPTER_CONFIG) if (Path(peft_dir) / ADAPTER_CONFIG).is_file() else None
    if raw is None or not ("peft_type" in raw or "lora_alpha" in raw):
        raise AdapterError(
            f"{peft_dir}: not a PEFT adapter directory (adapter_config.json with "
            "peft_type, r and lora_alpha, plus adapter_model.safetensors)"
        )
    cfg, tensors, _ = read_peft(raw, Path(peft_dir))
    out = Path(out_dir)
    write_pair(out, tensors, cfg.to_dict())
    return out


def export_peft(adapter_path, save_path, base_model: str | None = None) -> Path:
    """Rewrite an adapter directory of ours (or mlx-lm's) in PEFT's format; no model needed."""
    cfg, tensors, _ = read_adapter(adapter_path)
    return write_peft(save_path, cfg, tensors, base_model)
