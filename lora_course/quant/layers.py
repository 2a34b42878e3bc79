"""Quantized layers inside a model: quantize a whole model, recognise and undo it.

:func:`quantize_model` swaps eligible ``nn.Linear`` layers for :class:`DequantLinear`
built with our :func:`quantize`; :func:`use_dequant_layers` gives a model loaded with
MLX's own quantized classes the fast CPU path; the helpers below tell LoRA and the
checkpoint code what a (possibly packed) layer holds. Taught in notebooks 07-08.
"""

from __future__ import annotations

from lora_course.quant.dequant import DequantEmbedding, DequantLinear
from lora_course.quant.quantize import QuantizationError, check_params, quantize
from lora_course.tree import tree_unflatten

import mlx.core as mx
import mlx.nn as nn

QUANTIZED_CLASSES = (nn.QuantizedLinear, nn.QuantizedEmbedding)


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
            layer.weight,
            layer.scales,
            layer.get("biases"),
            group_size=layer.group_size,
            bits=layer.bits,
            mode=getattr(layer, "mode", "affine"),
        )
    return layer.weight


def quantize_like(linear: nn.Linear, like: nn.Module) -> nn.Module:
    """Quantize ``linear`` like the quantized layer ``like``: same class, group size, bits, mode."""
    kw = dict(group_size=like.group_size, bits=like.bits, mode=getattr(like, "mode", "affine"))
    try:  # keep a subclass such as quant.DequantLinear (the fast CPU path)
        return type(like).from_linear(linear, **kw)
    except TypeError:  # a subclass whose constructor differs: MLX's own class will do
        return nn.QuantizedLinear.from_linear(linear, **kw)


def default_predicate(vocab_size: int | None, group_size: int):
    """The MLX LoRA example's rule: quantize a Linear unless it produces the vocabulary (the output
    head) or its input width does not divide into groups. Embeddings: width must divide."""

    def predicate(path: str, module: nn.Module) -> bool:
        in_dims = module.weight.shape[-1]
        if isinstance(module, nn.Embedding):
            return in_dims % group_size == 0
        return module.weight.shape[0] != vocab_size and in_dims % group_size == 0

    return predicate


def _quantized_twin(module: nn.Module, group_size: int, bits: int, linear_class, embedding_class):
    """A quantized layer holding our quantize(module.weight), bias carried over."""
    rows, cols = module.weight.shape
    if cols % group_size:  # checked before the layer classes run mx.quantize on their own
        raise QuantizationError(
            f"its width {cols} is not divisible by group_size={group_size}; "
            "choose a group size that divides it, or leave the layer out (predicate=)"
        )
    if isinstance(module, nn.Embedding):
        layer = embedding_class(rows, cols, group_size=group_size, bits=bits)
    else:
        layer = linear_class(cols, rows, bias="bias" in module, group_size=group_size, bits=bits)
        if "bias" in module:
            layer.bias = module.bias
    layer.weight, layer.scales, layer.biases = quantize(module.weight, group_size, bits)
    return layer


def quantize_model(
    model: nn.Module,
    group_size: int = 64,
    bits: int = 4,
    predicate=None,
    quantize_embedding: bool = False,
    linear_class: type = DequantLinear,
) -> nn.Module:
    """Quantize ``model``'s eligible layers in place with :func:`quantize`; returns the model.

    ``predicate(path, module) -> bool`` picks the ``nn.Linear`` layers (and, with
    ``quantize_embedding=True``, ``nn.Embedding`` layers); the default is
    :func:`default_predicate`. Linear layers become ``linear_class`` (default
    :class:`DequantLinear`, fast on CPU; pass ``nn.QuantizedLinear`` for MLX's own).
    ``model.args.quantization`` records ``{"group_size", "bits"}`` so that
    ``checkpoint.save`` / ``load`` round trip.
    """
    check_params(group_size, bits)
    args = getattr(model, "args", None)
    predicate = predicate or default_predicate(getattr(args, "vocab_size", None), group_size)
    kinds = (nn.Linear, nn.Embedding) if quantize_embedding else (nn.Linear,)
    swaps = []
    for path, module in model.named_modules():
        if isinstance(module, kinds) and predicate(path, module):
            try:
                twin = _quantized_twin(module, group_size, bits, linear_class, DequantEmbedding)
            except QuantizationError as e:
                raise QuantizationError(f"layer '{path}': {e}") from None
            swaps.append((path, twin))
    if swaps:
        model.update_modules(tree_unflatten(swaps))
        if args is not None and hasattr(args, "quantization"):
            args.quantization = {"group_size": group_size, "bits": bits}
    return model


def use_dequant_layers(model: nn.Module) -> nn.Module:
    """Swap every affine ``nn.QuantizedLinear`` / ``QuantizedEmbedding`` (for example from
    ``checkpoint.load``) for :class:`DequantLinear` / :class:`DequantEmbedding`, in place.
    The packed arrays are shared, nothing is re-quantized."""
    swaps = []
    for path, m in model.named_modules():
        if type(m) not in QUANTIZED_CLASSES or getattr(m, "mode", "affine") != "affine":
            continue
        rows, cols = m.weight.shape[0], m.weight.shape[1] * 32 // m.bits  # unpacked (out, in)
        if isinstance(m, nn.QuantizedEmbedding):
            twin = DequantEmbedding(rows, cols, group_size=m.group_size, bits=m.bits)
        else:
            twin = DequantLinear(cols, rows, "bias" in m, group_size=m.group_size, bits=m.bits)
        twin.update(m.parameters())  # the same arrays (weight, scales, biases, bias)
        swaps.append((path, twin))
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return model


def dequantized(layer: nn.Module) -> nn.Module:
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
