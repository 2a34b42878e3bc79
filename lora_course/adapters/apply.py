"""Model surgery: wrap a model's linear layers in adapters, merge them back, count parameters.

``apply_lora`` freezes a model and wraps the linears of its last blocks in
``LoRALinear`` or ``DoRALinear`` (or unfreezes whole blocks for full fine-tuning);
``fuse`` merges every adapter into a plain weight; ``count_parameters`` and
``print_trainable_parameters`` say what is trained. The layer modules below this one
(``lora.py``, ``dora.py``) know nothing of each other's dispatch: this module picks.
Taught in notebooks 05 (LoRA from the math up) and 06 (DoRA, full fine-tuning, merging).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from lora_course.adapters.dora import DoRALinear
from lora_course.adapters.lora import LoRALinear, check_hyper, lora_scale
from lora_course.limits import memory_problem
from lora_course.quant.layers import dequantized, is_quantized, linear_dims
from lora_course.tree import tree_flatten, tree_unflatten

import mlx.core as mx
import mlx.nn as nn

KINDS = ("lora", "dora", "full")  # what apply_lora can do to a block ("full": mlx-lm's name)
# The name that says what "full" does; both spellings work, files record mlx-lm's "full".
FULL_FINE_TUNING = "full_fine_tuning"


@dataclass
class LoRAConfig:
    """What apply_lora did to a model; files.py writes it as mlx-lm's adapter_config.json."""

    fine_tune_type: str = "lora"  # "lora", "dora" or "full"
    num_layers: int = 16  # how many of the last blocks are adapted (resolved: never -1 here)
    keys: list[str] | None = None  # module paths inside a block; None for "full" (whole blocks)
    rank: int = 8  # r: width of the low-rank middle
    alpha: float = 16.0  # numerator of scale
    dropout: float = 0.0  # dropout on the adapter's input during training
    use_rslora: bool = False  # scale = alpha / sqrt(r) instead of alpha / r
    extra: dict = field(default_factory=dict)  # anything else to keep in adapter_config.json

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, self.use_rslora)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoRAConfig:
        """Flat or mlx-lm's nested ``lora_parameters`` form; unknown keys are ignored.

        mlx-lm stores only ``scale``; alpha is then scale * r (or scale * sqrt(r)).
        """
        flat = {**d, **(d.get("lora_parameters") or {})}
        known = {f.name for f in fields(cls)} - {"extra"}
        kw = {k: flat[k] for k in known if flat.get(k) is not None}
        if "alpha" not in kw and flat.get("scale") is not None:
            r = kw.get("rank", cls.rank)
            kw["alpha"] = flat["scale"] * (math.sqrt(r) if kw.get("use_rslora") else r)
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """mlx-lm's adapter_config.json layout, plus our alpha and use_rslora."""
        params = None
        if self.fine_tune_type != "full":
            params = {
                "rank": self.rank,
                "scale": self.scale,
                "dropout": self.dropout,
                "keys": list(self.keys),
                "alpha": self.alpha,
                "use_rslora": self.use_rslora,
            }
        return {
            **self.extra,
            "fine_tune_type": self.fine_tune_type,
            "num_layers": self.num_layers,
            "lora_parameters": params,
        }


def _linear_paths(block: nn.Module) -> list[str]:
    """Paths of the linear layers inside one block, e.g. ["mlp.down_proj", ..., "self_attn.q_proj"]."""
    return sorted(name for name, m in block.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear)))


def apply_lora(
    model: nn.Module,
    num_layers: int = 16,
    keys: list[str] | None = None,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    kind: str = "lora",
    use_rslora: bool = False,
) -> nn.Module:
    """Freeze ``model`` and make the last ``num_layers`` blocks trainable (in place).

    ``kind="lora"`` / ``"dora"`` wraps the linears named by ``keys`` (paths inside a
    block such as ``"self_attn.q_proj"``; default all of them) in LoRALinear / DoRALinear.
    ``kind="full_fine_tuning"`` (or mlx-lm's spelling ``"full"``) unfreezes those blocks
    instead: full fine-tuning of the last ``num_layers`` blocks, no adapter layers.
    ``num_layers=-1`` means every block.
    What was done is recorded as ``model.lora_config`` (a LoRAConfig).
    """

    # Check everything first, so that a bad argument leaves the model untouched.
    kind = "full" if kind == FULL_FINE_TUNING else kind
    if kind not in KINDS:
        raise ValueError(f"apply_lora: kind={kind!r} is not one of lora, dora, {FULL_FINE_TUNING} (or full)")
    if getattr(model, "lora_config", None) is not None:
        raise ValueError(
            "apply_lora: this model already has adapters "
            f"({model.lora_config.fine_tune_type}); fuse them or load a fresh model"
        )
    n = len(model.layers)
    if num_layers == -1:
        num_layers = n
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or not 1 <= num_layers <= n:
        raise ValueError(
            f"apply_lora: num_layers={num_layers} but the model has {n} layers; use 1..{n}, or -1 for all"
        )
    check_hyper(rank, alpha, dropout)
    blocks = model.layers[n - num_layers :]
    if any(isinstance(m, LoRALinear) for b in blocks for _, m in b.named_modules()):
        raise ValueError("apply_lora: the model already contains LoRA layers; fuse them first")
    if kind == "full":
        if keys is not None:
            raise ValueError(
                "apply_lora: keys select layers for lora/dora; kind='full' trains "
                "whole blocks, so leave keys=None"
            )
        if any(is_quantized(m) for b in blocks for _, m in b.named_modules()):
            raise ValueError(
                "apply_lora: kind='full' needs float weights but the model is "
                "quantized; use kind='lora' (QLoRA) or a de-quantized model"
            )
    else:
        valid = _linear_paths(blocks[0])
        keys = valid if keys is None else [keys] if isinstance(keys, str) else list(keys)
        for key in keys:
            if key not in valid:
                raise ValueError(
                    f"apply_lora: key {key!r} is not a linear layer in a block; "
                    f"valid keys: {', '.join(valid)}"
                )
        keys = [k for k in valid if k in set(keys)]  # one canonical order
        modules = dict(blocks[0].named_modules())
        per_block = sum(rank * sum(linear_dims(modules[k])) for k in keys)
        # float32 adapters plus Adam's two moments: 12 bytes per parameter
        why = memory_problem(12.0 * per_block * num_layers, f"rank-{rank} adapters on {num_layers} blocks")
        if why:
            raise ValueError(f"apply_lora: {why}; use a smaller rank")

    model.freeze()
    if kind == "full":
        for block in blocks:
            block.unfreeze()
    else:
        cls = DoRALinear if kind == "dora" else LoRALinear
        for block in blocks:
            modules = dict(block.named_modules())
            wrapped = [(k, cls.from_linear(modules[k], rank, alpha, dropout, use_rslora)) for k in keys]
            block.update_modules(tree_unflatten(wrapped))
    model.lora_config = LoRAConfig(kind, num_layers, keys, rank, alpha, dropout, use_rslora)
    return model


def fuse(model: nn.Module, de_quantize: bool = False) -> nn.Module:
    """Merge every LoRA/DoRA layer into a plain (or re-quantized) linear, in place.

    ``de_quantize=True`` returns a float model: every other quantized layer is
    dequantized too, and ``model.args.quantization`` is cleared.
    """
    merged = [(name, m.fuse(de_quantize)) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    if merged:
        model.update_modules(tree_unflatten(merged))
    if de_quantize:
        floats = [(name, dequantized(m)) for name, m in model.named_modules() if is_quantized(m)]
        if floats:
            model.update_modules(tree_unflatten(floats))
        if getattr(getattr(model, "args", None), "quantization", None):
            model.args.quantization = None
    model.lora_config = None
    return model


def count_parameters(model: nn.Module) -> dict[str, Any]:
    """Trainable and total parameter counts, quantized weights at their logical size.

    A packed uint32 word of a b-bit weight holds 32 / b parameters; quantization
    scales and biases are bookkeeping, not parameters, and are not counted.
    Returns ``{"trainable", "total", "trainable_percent", "quantized",
    "quantized_params", "quantization_overhead"}`` (the last: scales + biases entries).
    """
    bits_of = {name: m.bits for name, m in model.named_modules() if is_quantized(m)}

    def logical(path: str, a: mx.array) -> tuple[int, int]:  # (params, overhead)
        owner, _, leaf = path.rpartition(".")
        if owner in bits_of:
            if leaf == "weight":
                return a.size * 32 // bits_of[owner], 0
            if leaf in ("scales", "biases"):
                return 0, a.size
        return a.size, 0

    total = quantized = overhead = 0
    for path, a in tree_flatten(model.parameters()):
        n, o = logical(path, a)
        total, overhead = total + n, overhead + o
        if o == 0 and path.rpartition(".")[0] in bits_of and path.endswith(".weight"):
            quantized += n
    trainable = sum(logical(p, a)[0] for p, a in tree_flatten(model.trainable_parameters()))
    return {
        "trainable": trainable,
        "total": total,
        "trainable_percent": 100.0 * trainable / total if total else 0.0,
        "quantized": bool(bits_of),
        "quantized_params": quantized,
        "quantization_overhead": overhead,
    }


def print_trainable_parameters(model: nn.Module) -> dict[str, Any]:
    """Print ``trainable params: X || all params: Y || trainable%: Z`` and return the counts."""
    c = count_parameters(model)
    line = (
        f"trainable params: {c['trainable']:,} || all params: {c['total']:,} || "
        f"trainable%: {c['trainable_percent']:.4f}"
    )
    if c["quantized"]:
        line += (
            f" (quantized weights counted at their logical size: {c['quantized_params']:,}; "
            "their scales and biases are not counted)"
        )
    print(line)
    return c
