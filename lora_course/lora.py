"""LoRA: train a low-rank update beside a frozen linear layer, then merge it back.

Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv:2106.09685).
A frozen weight W (out, in) is adapted by a product of two thin matrices,

    y = x W^T + scale * (x A) B        A: (in, r) "lora_a",  B: (r, out) "lora_b"

with r much smaller than in and out. B starts at zero, so a freshly wrapped layer is
exactly the base layer; A starts uniform in +-1/sqrt(in). ``scale = alpha / r`` keeps
the update's size steady when you change r (rsLoRA, Kalajdzievski 2023, arXiv:2312.03732,
uses ``alpha / sqrt(r)``). After training, ``W + scale * (A B)^T`` is a plain weight
again (``fuse``), so the adapted model runs at the base model's speed.

This module has the layer (``LoRALinear``), the model surgery (``apply_lora``,
``fuse``) and the parameter counts. DoRA lives in ``dora.py``; adapter files in
``adapters.py``. Taught in notebook 05 (LoRA from the math up) and 06 (DoRA, full
fine-tuning and merging).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from lora_course.tree import tree_flatten, tree_unflatten

KINDS = ("lora", "dora", "full")  # what apply_lora can do to a block

# ----------------------------------------------------------------------------- helpers


def is_quantized(layer: nn.Module) -> bool:
    """True for nn.QuantizedLinear / QuantizedEmbedding and their subclasses."""
    return isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding))


def linear_dims(linear: nn.Module) -> tuple[int, int]:
    """(out, in) of a linear layer; a packed quantized weight holds 32 / bits inputs per word."""
    out_dims, in_dims = linear.weight.shape
    if is_quantized(linear):
        in_dims = in_dims * 32 // linear.bits  # (out, in * bits / 32) uint32 -> in
    return out_dims, in_dims


def dense_weight(layer: nn.Module) -> mx.array:
    """The layer's weight as a float matrix (out, in), dequantized if it is stored packed."""
    if is_quantized(layer):
        return mx.dequantize(
            layer.weight, layer.scales, layer.get("biases"),
            group_size=layer.group_size, bits=layer.bits, mode=getattr(layer, "mode", "affine"),
        )
    return layer.weight


def quantize_like(linear: nn.Linear, like: nn.Module) -> nn.Module:
    """Quantize ``linear`` like the quantized layer ``like``: same class, group size, bits, mode."""
    kw = dict(group_size=like.group_size, bits=like.bits, mode=getattr(like, "mode", "affine"))
    try:  # keep a subclass such as quant.DequantLinear (the fast CPU path)
        return type(like).from_linear(linear, **kw)
    except TypeError:  # a subclass whose constructor differs: MLX's own class will do
        return nn.QuantizedLinear.from_linear(linear, **kw)


def lora_scale(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """alpha / r (LoRA) or alpha / sqrt(r) (rsLoRA): the factor in front of (x A) B."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _check_hyper(rank: int, alpha: float, dropout: float) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha)):
        raise ValueError(f"LoRA alpha must be a finite number, got {alpha!r}")
    if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


# ----------------------------------------------------------------------------- the layer


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update: y = base(x) + scale * (x A) B."""

    @classmethod
    def from_linear(cls, linear: nn.Module, rank: int = 8, alpha: float = 16.0,
                    dropout: float = 0.0, use_rslora: bool = False) -> "LoRALinear":
        """Wrap an ``nn.Linear`` or ``nn.QuantizedLinear`` (the base is frozen, not copied)."""
        if not isinstance(linear, (nn.Linear, nn.QuantizedLinear)):
            raise TypeError(f"{cls.__name__}.from_linear needs nn.Linear or nn.QuantizedLinear, "
                            f"got {type(linear).__name__}")
        out_dims, in_dims = linear_dims(linear)
        layer = cls(in_dims, out_dims, rank, alpha, dropout, use_rslora)
        layer.linear = linear  # replaces the placeholder built in __init__
        layer.linear.freeze()
        return layer

    def __init__(self, input_dims: int, output_dims: int, rank: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0, use_rslora: bool = False, bias: bool = False):
        super().__init__()
        _check_hyper(rank, alpha, dropout)
        self.input_dims, self.output_dims = input_dims, output_dims
        self.linear = nn.Linear(input_dims, output_dims, bias=bias)  # the base; from_linear swaps it
        self.linear.freeze()
        self.dropout = nn.Dropout(p=dropout)
        self.dropout_p = float(dropout)
        self.rank, self.alpha, self.use_rslora = rank, float(alpha), use_rslora
        self.scale = lora_scale(self.alpha, rank, use_rslora)
        bound = 1.0 / math.sqrt(input_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (input_dims, rank))  # (in, r)
        self.lora_b = mx.zeros((rank, output_dims))  # (r, out): zero, so we start at the base

    def _extra_repr(self) -> str:
        rs = ", rslora" if self.use_rslora else ""
        return (f"input_dims={self.input_dims}, output_dims={self.output_dims}, rank={self.rank}, "
                f"alpha={self.alpha:g}, scale={self.scale:g}, dropout={self.dropout_p:g}{rs}")

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)  # (..., out): the frozen base, bias included
        h = self.dropout(x) @ self.lora_a  # (..., r): through the narrow middle first
        # y + scale * h @ B as one GEMM that accumulates into y (no extra pass over (..., out)).
        return mx.addmm(y, h, self.lora_b, alpha=self.scale).astype(x.dtype)

    def reference(self, x: mx.array) -> mx.array:
        """The same forward in plain ops, without dropout (tests check the two agree)."""
        return self.linear(x) + self.scale * ((x @ self.lora_a) @ self.lora_b)

    def delta_weight(self) -> mx.array:
        """scale * (A B)^T, the update as a full (out, in) matrix, as fusing adds it to W."""
        return (self.scale * self.lora_b.T) @ self.lora_a.T  # (out, r) @ (r, in)

    def fuse(self, de_quantize: bool = False) -> nn.Module:
        """A plain layer with W + scale * (A B)^T; re-quantized like the base unless de_quantize."""
        w = dense_weight(self.linear)  # (out, in)
        return self._rebuild(w + self.delta_weight().astype(w.dtype), de_quantize)

    def _rebuild(self, w: mx.array, de_quantize: bool) -> nn.Module:
        has_bias = "bias" in self.linear
        fused = nn.Linear(self.input_dims, self.output_dims, bias=has_bias)
        fused.weight = w
        if has_bias:
            fused.bias = self.linear.bias
        if is_quantized(self.linear) and not de_quantize:
            return quantize_like(fused, self.linear)
        return fused


# ----------------------------------------------------------------------------- the model


@dataclass
class LoRAConfig:
    """What apply_lora did to a model; adapters.py writes it as mlx-lm's adapter_config.json."""

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
    def from_dict(cls, d: dict[str, Any]) -> "LoRAConfig":
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
            params = {"rank": self.rank, "scale": self.scale, "dropout": self.dropout,
                      "keys": list(self.keys), "alpha": self.alpha, "use_rslora": self.use_rslora}
        return {**self.extra, "fine_tune_type": self.fine_tune_type,
                "num_layers": self.num_layers, "lora_parameters": params}


def _linear_paths(block: nn.Module) -> list[str]:
    """Paths of the linear layers inside one block, e.g. ["mlp.down_proj", ..., "self_attn.q_proj"]."""
    return sorted(name for name, m in block.named_modules()
                  if isinstance(m, (nn.Linear, nn.QuantizedLinear)))


def apply_lora(model: nn.Module, num_layers: int = 16, keys: list[str] | None = None,
               rank: int = 8, alpha: float = 16.0, dropout: float = 0.0, kind: str = "lora",
               use_rslora: bool = False) -> nn.Module:
    """Freeze ``model`` and make the last ``num_layers`` blocks trainable (in place).

    ``kind="lora"`` / ``"dora"`` wraps the linears named by ``keys`` (paths inside a
    block such as ``"self_attn.q_proj"``; default all of them) in LoRALinear / DoRALinear.
    ``kind="full"`` unfreezes those blocks instead. ``num_layers=-1`` means every block.
    What was done is recorded as ``model.lora_config`` (a LoRAConfig).
    """
    from lora_course.dora import DoRALinear

    # Check everything first, so that a bad argument leaves the model untouched.
    if kind not in KINDS:
        raise ValueError(f"apply_lora: kind={kind!r} is not one of {', '.join(KINDS)}")
    if getattr(model, "lora_config", None) is not None:
        raise ValueError("apply_lora: this model already has adapters "
                         f"({model.lora_config.fine_tune_type}); fuse them or load a fresh model")
    n = len(model.layers)
    if num_layers == -1:
        num_layers = n
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or not 1 <= num_layers <= n:
        raise ValueError(f"apply_lora: num_layers={num_layers} but the model has {n} layers; "
                         f"use 1..{n}, or -1 for all")
    _check_hyper(rank, alpha, dropout)
    blocks = model.layers[n - num_layers:]
    if any(isinstance(m, LoRALinear) for b in blocks for _, m in b.named_modules()):
        raise ValueError("apply_lora: the model already contains LoRA layers; fuse them first")
    if kind == "full":
        if keys is not None:
            raise ValueError("apply_lora: keys select layers for lora/dora; kind='full' trains "
                             "whole blocks, so leave keys=None")
        if any(is_quantized(m) for b in blocks for _, m in b.named_modules()):
            raise ValueError("apply_lora: kind='full' needs float weights but the model is "
                             "quantized; use kind='lora' (QLoRA) or a de-quantized model")
    else:
        valid = _linear_paths(blocks[0])
        keys = valid if keys is None else [keys] if isinstance(keys, str) else list(keys)
        for key in keys:
            if key not in valid:
                raise ValueError(f"apply_lora: key {key!r} is not a linear layer in a block; "
                                 f"valid keys: {', '.join(valid)}")
        keys = [k for k in valid if k in set(keys)]  # one canonical order

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
    merged = [(name, m.fuse(de_quantize)) for name, m in model.named_modules()
              if isinstance(m, LoRALinear)]
    if merged:
        model.update_modules(tree_unflatten(merged))
    if de_quantize:
        floats = [(name, _dequantized(m)) for name, m in model.named_modules() if is_quantized(m)]
        if floats:
            model.update_modules(tree_unflatten(floats))
        if getattr(getattr(model, "args", None), "quantization", None):
            model.args.quantization = None
    model.lora_config = None
    return model


def _dequantized(layer: nn.Module) -> nn.Module:
    """The float twin of a quantized linear or embedding layer."""
    w = dense_weight(layer)
    if isinstance(layer, nn.QuantizedEmbedding):
        float_layer = nn.Embedding(*w.shape)
    else:
        float_layer = nn.Linear(w.shape[1], w.shape[0], bias="bias" in layer)
        if "bias" in layer:
            float_layer.bias = layer.bias
    float_layer.weight = w
    return float_layer


# ----------------------------------------------------------------------------- counting


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
    line = (f"trainable params: {c['trainable']:,} || all params: {c['total']:,} || "
            f"trainable%: {c['trainable_percent']:.4f}")
    if c["quantized"]:
        line += (f" (quantized weights counted at their logical size: {c['quantized_params']:,}; "
                 "their scales and biases are not counted)")
    print(line)
    return c
