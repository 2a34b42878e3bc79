"""Converting checkpoints: Hugging Face or Meta / Mistral originals to MLX, optionally quantized.

``convert`` is ``load`` (any layout ``checkpoint.py`` reads), an optional cast of the
float weights, an optional quantization with ``lora_course.quant`` (group-wise affine,
as QLoRA's base models need; Dettmers et al. 2023, arXiv:2305.14314), then ``save`` in
the MLX layout. ``lora-course convert`` is its command line. Taught in notebook 04
(checkpoints, tokenizers and sampling); quantization itself in notebooks 07-08.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from lora_course.checkpoint import DEFAULT_SHARD_MB, FLOATS, CheckpointError, _quantized_modules, load, save
from lora_course.model import Model
from lora_course.quant import quantize_model
from lora_course.tree import tree_map


def _quantize(model: Model, group_size: int = 64, bits: int = 4) -> Model:
    """Quantize with lora_course.quant (the seed's rule: every Linear but the output head)."""
    quantize_model(model, group_size=group_size, bits=bits)
    model.args.quantization = {"group_size": group_size, "bits": bits}
    return model


def convert(torch_path=None, hf_path=None, mlx_path="mlx_model", quantize: bool = False,
            q_group_size: int = 64, q_bits: int = 4, dtype: str | None = None,
            shard_size_mb: float = DEFAULT_SHARD_MB) -> Path:
    """Convert a Meta (``torch_path``) or HF (``hf_path``) checkpoint to MLX format at ``mlx_path``.

    ``dtype`` (``"float16"``, ``"bfloat16"``, ``"float32"``) casts the float weights;
    ``None`` keeps the stored dtype. ``quantize`` then quantizes with ``q_group_size``
    and ``q_bits``.
    """
    if (torch_path is None) == (hf_path is None):
        raise CheckpointError("convert: give exactly one source, torch_path or hf_path")
    if dtype is not None and dtype not in ("float16", "bfloat16", "float32"):
        raise CheckpointError(f"convert: dtype must be float16, bfloat16 or float32, got {dtype!r}")
    source = torch_path if torch_path is not None else hf_path
    model, tokenizer = load(source, lazy=True)
    if dtype is not None:
        target = getattr(mx, dtype)
        model.update(tree_map(lambda a: a.astype(target) if a.dtype in FLOATS else a,
                              model.parameters()))
    if quantize:
        if _quantized_modules(model):
            raise CheckpointError(f"{source}: the checkpoint is already quantized; convert it "
                                  "without -q, or start from an unquantized checkpoint")
        _quantize(model, q_group_size, q_bits)
    return save(model, tokenizer, mlx_path, format="mlx", shard_size_mb=shard_size_mb)


def add_convert_command(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert a Hugging Face or Meta checkpoint to MLX format, optionally quantized",
        description="Convert a Hugging Face (--hf-path) or original Meta/Mistral (--torch-path) "
                    "checkpoint into an MLX checkpoint directory (--mlx-path).")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--torch-path", help="directory with params.json and consolidated.*.pth")
    source.add_argument("--hf-path", help="directory with config.json and *.safetensors")
    p.add_argument("--mlx-path", default="mlx_model", help="output directory (default: mlx_model)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the weights")
    p.add_argument("--q-group-size", type=int, default=64, help="quantization group size (default 64)")
    p.add_argument("--q-bits", type=int, default=4, help="bits per quantized weight (default 4)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="cast float weights to this dtype (default: keep the stored dtype)")
    p.add_argument("--shard-size-mb", type=float, default=DEFAULT_SHARD_MB,
                   help=f"largest safetensors file in MiB (default {DEFAULT_SHARD_MB})")
    p.set_defaults(func=_convert_cli)


def _convert_cli(args) -> int:
    out = convert(torch_path=args.torch_path, hf_path=args.hf_path, mlx_path=args.mlx_path,
                  quantize=args.quantize, q_group_size=args.q_group_size, q_bits=args.q_bits,
                  dtype=args.dtype, shard_size_mb=args.shard_size_mb)
    print(f"saved {out}")
    return 0
