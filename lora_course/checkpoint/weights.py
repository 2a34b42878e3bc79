"""Filling a model from tensors: every name, shape and dtype checked before use.

``build`` makes a model with lazy random weights (its quantized layers in place) and
``load_weights`` fills it one file at a time, so there is never a second full copy.
"""

from __future__ import annotations

import re
from pathlib import Path

from lora_course.checkpoint.files import CheckpointError, dtype_name, mx_load
from lora_course.model.args import ModelArgs
from lora_course.model.transformer import Model
from lora_course.quant.layers import use_dequant_layers
from lora_course.quant.quantize import QuantizationError, check_params
from lora_course.tree import tree_flatten

import mlx.core as mx
import mlx.nn as nn

FLOATS = (mx.float16, mx.bfloat16, mx.float32)


QUANT_MODES = ("affine", "mxfp4", "mxfp8", "nvfp4")  # what nn.quantize accepts


IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$|^rope\.freqs$")  # recomputed, not learned


def quantized_paths(files: list[Path]) -> set[str]:
    """Module paths that have ``.scales`` tensors, i.e. that were saved quantized."""
    paths = set()
    for f in files:
        paths |= {k[: -len(".scales")] for k in mx_load(f) if k.endswith(".scales")}
    return paths


def build(args: ModelArgs, quantized: set[str], config_path: Path) -> Model:
    """A model with random lazy weights (never computed), its quantized layers in place."""
    model = Model(args)
    if quantized:
        q = dict(args.quantization or {})
        if "group_size" not in q or "bits" not in q:
            raise CheckpointError(
                f"{config_path}: the weights are quantized (found "
                f"'{sorted(quantized)[0]}.scales') but there is no "
                "'quantization' entry with group_size and bits"
            )

        _check_quantization(q, config_path, "quantization")
        for path in quantized:  # per-layer overrides: {"model.layers.0.mlp.up_proj": {...}}
            if isinstance(q.get(path), dict):
                _check_quantization({**q, **q[path]}, config_path, f"quantization.{path}")

        def predicate(path, module):
            if path not in quantized or not hasattr(module, "to_quantized"):
                return False
            return q[path] if isinstance(q.get(path), dict) else True

        try:
            nn.quantize(
                model, q["group_size"], q["bits"], mode=q.get("mode", "affine"), class_predicate=predicate
            )
        except ValueError as e:  # MLX's own check (e.g. a width that group_size does not divide)
            raise CheckpointError(f"{config_path}: key 'quantization': {e}") from None
        use_dequant_layers(model)  # the same layer classes quantize_model makes (fast on CPU)
    return model


def _check_quantization(q: dict, config_path: Path, key: str) -> None:
    """group_size, bits and mode checked here: a group size of 0 reaching MLX's kernel
    kills the process (SIGFPE) at the first matmul."""
    mode = q.get("mode", "affine")
    if mode not in QUANT_MODES:
        raise CheckpointError(
            f"{config_path}: key '{key}': mode {mode!r} is not one of {', '.join(QUANT_MODES)}"
        )
    try:
        if mode == "affine":
            check_params(q.get("group_size"), q.get("bits"))
        elif not (q.get("group_size") in (16, 32, 64, 128) and q.get("bits") in (4, 8)):
            raise QuantizationError(
                f"group_size={q.get('group_size')!r}, bits={q.get('bits')!r} do not fit mode {mode!r}"
            )
    except QuantizationError as e:
        raise CheckpointError(f"{config_path}: key '{key}': {e}") from None


def load_weights(model: Model, sources, where, lazy: bool = True) -> None:
    """Fill ``model`` from ``sources``: pairs ``(file, {name: array})``, one file at a time.

    Every tensor is checked (known name, shape, dtype) before it is used, and every
    parameter must be filled; the first problem raises a :class:`CheckpointError`.
    """
    expected = dict(tree_flatten(model.parameters()))
    args, seen = model.args, set()
    for file, tensors in sources:
        items = []
        for name, value in tensors.items():
            if IGNORED.search(name) or (name == "lm_head.weight" and args.tie_word_embeddings):
                continue
            _check_tensor(file, name, value, expected.get(name), args)
            items.append((name, value))
            seen.add(name)
        model.load_weights(items, strict=False)
        if not lazy:
            mx.eval([v for _, v in items])
        del items, tensors  # drop this file's references before opening the next
    missing = [k for k in expected if k not in seen]
    if missing:
        hint = ""
        if missing[0] == "lm_head.weight":
            hint = "; if the model reuses its embedding as output head, set tie_word_embeddings: true"
        raise CheckpointError(
            f"{where}: tensor '{missing[0]}' (shape {tuple(expected[missing[0]].shape)}) is missing "
            f"from the checkpoint ({len(missing)} missing in all){hint}"
        )


def _check_tensor(file, name: str, value: mx.array, want: mx.array | None, args: ModelArgs) -> None:
    if want is None:
        raise CheckpointError(
            f"{file}: unexpected tensor '{name}' (shape {tuple(value.shape)}); a {args.model_type} "
            f"model with {args.n_layers} layers and tie_word_embeddings={args.tie_word_embeddings} "
            "has no such parameter; does config.json belong to these weights?"
        )
    if want.dtype == mx.uint32:
        ok, expect = value.dtype == mx.uint32, "uint32 (quantized)"
    else:
        ok, expect = value.dtype in FLOATS, "float16, bfloat16 or float32"
    if not ok:
        raise CheckpointError(
            f"{file}: tensor '{name}' has dtype {dtype_name(value.dtype)}, expected {expect}; "
            "re-save the checkpoint with a supported dtype"
        )
    if tuple(value.shape) != tuple(want.shape):
        if (
            name in ("model.embed_tokens.weight", "lm_head.weight")
            and value.ndim == 2
            and value.shape[0] != args.vocab_size
        ):
            raise CheckpointError(
                f"{file}: tensor '{name}' has {value.shape[0]} rows (shape {tuple(value.shape)}) but "
                f"config vocab_size is {args.vocab_size} (expects {tuple(want.shape)}); fix "
                "vocab_size in the config to match the embedding"
            )
        raise CheckpointError(
            f"{file}: tensor '{name}' has shape {tuple(value.shape)}, but the "
            f"model built from the config expects {tuple(want.shape)}"
        )
