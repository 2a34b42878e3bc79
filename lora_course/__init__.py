"""lora_course: learn LoRA and QLoRA by building them, then fine-tune real models with MLX.

Importing this package first loads an optimized BLAS for MLX on Linux (see
``lora_course/blas.py``); set ``LORA_COURSE_NO_BLAS=1`` to opt out.

The folders follow the course, and imports point only downward:
foundation (``tree``, ``atomic``, ``config``, ``blas``) -> ``model``, ``quant``, ``tokenizer``
-> ``checkpoint``, ``adapters``, ``data`` -> ``training`` -> ``recipes`` (and the CLI).
``__all__`` below is the public face; everything in it is importable as ``lc.<name>``.
"""

from lora_course import blas

blas.load_optimized_blas()  # must run before mlx.core is imported anywhere

# ruff: noqa: E402  (every import below needs the BLAS loaded first)
from lora_course.adapters.apply import (
    LoRAConfig,
    apply_lora,
    count_parameters,
    fuse,
    print_trainable_parameters,
)
from lora_course.adapters.dora import DoRALinear
from lora_course.adapters.files import convert_peft_adapter, load_adapters, save_adapters
from lora_course.adapters.format import AdapterError
from lora_course.adapters.lora import LoRALinear
from lora_course.checkpoint.files import CheckpointError
from lora_course.checkpoint.load import load
from lora_course.checkpoint.save import save
from lora_course.data.batching import iterate_batches
from lora_course.data.datasets import DatasetSplits, TokenizedDataset, load_dataset
from lora_course.data.docstrings import build_docstring_dataset
from lora_course.data.records import DatasetError
from lora_course.model.args import ModelArgs
from lora_course.model.attention import Attention, KVCache
from lora_course.model.generate import generate, stream_generate
from lora_course.model.norm import RMSNorm
from lora_course.model.transformer import FeedForward, Model, Transformer, TransformerBlock, make_cache
from lora_course.quant.dequant import DequantEmbedding, DequantLinear, dequant_matmul
from lora_course.quant.layers import quantize_model, use_dequant_layers
from lora_course.quant.quantize import QuantizationError, dequantize, quantize
from lora_course.quant.size import ModelSize, model_size
from lora_course.recipes.convert import convert
from lora_course.recipes.finetune import FineTuneConfig, FineTuneResult, finetune
from lora_course.tokenizer.spm import Tokenizer
from lora_course.tokenizer.train import train_tokenizer
from lora_course.training.args import TrainingArgs
from lora_course.training.evaluate import evaluate, loss
from lora_course.training.losses import js_div_loss, kl_div_loss
from lora_course.training.run import TrainingHistory
from lora_course.training.trainer import train
from lora_course.tree import tree_flatten, tree_map, tree_unflatten
from lora_course.version import __version__

__all__ = [
    "__version__",
    # tree utilities (notebook 01)
    "tree_flatten",
    "tree_map",
    "tree_unflatten",
    # the model (notebooks 02-03 and the model notebook)
    "ModelArgs",
    "RMSNorm",
    "Attention",
    "KVCache",
    "FeedForward",
    "TransformerBlock",
    "Transformer",
    "Model",
    "make_cache",
    # tokenizers, checkpoints and generation (notebook 04)
    "Tokenizer",
    "train_tokenizer",
    "CheckpointError",
    "load",
    "save",
    "convert",
    "generate",
    "stream_generate",
    # LoRA and DoRA (notebooks 05-06)
    "LoRALinear",
    "DoRALinear",
    "LoRAConfig",
    "apply_lora",
    "fuse",
    "count_parameters",
    "print_trainable_parameters",
    # adapters on disk (notebook 06)
    "AdapterError",
    "load_adapters",
    "save_adapters",
    "convert_peft_adapter",
    # quantization and QLoRA (notebooks 07-08)
    "quantize",
    "dequantize",
    "QuantizationError",
    "quantize_model",
    "use_dequant_layers",
    "DequantLinear",
    "DequantEmbedding",
    "dequant_matmul",
    "ModelSize",
    "model_size",
    # data (notebook 09)
    "DatasetError",
    "DatasetSplits",
    "TokenizedDataset",
    "load_dataset",
    "build_docstring_dataset",
    "iterate_batches",
    # training (notebooks 10-11)
    "TrainingArgs",
    "TrainingHistory",
    "train",
    "evaluate",
    "loss",
    "kl_div_loss",
    "js_div_loss",
    # one call (notebook 13)
    "FineTuneConfig",
    "FineTuneResult",
    "finetune",
]
