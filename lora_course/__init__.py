"""lora_course: learn LoRA and QLoRA by building them, then fine-tune real models with MLX.

Importing this package first loads an optimized BLAS for MLX on Linux (see
``lora_course/_blas.py``); set ``LORA_COURSE_NO_BLAS=1`` to opt out.
"""

from lora_course import _blas

_blas.load_optimized_blas()  # must run before mlx.core is imported anywhere

__version__ = "0.1.0"

# -- tree utilities (notebook 01)
from lora_course.tree import tree_flatten, tree_map, tree_unflatten
# -- model (notebooks 02-03)
from lora_course.model import (
    Attention,
    FeedForward,
    KVCache,
    Model,
    ModelArgs,
    RMSNorm,
    Transformer,
    TransformerBlock,
    make_cache,
)
# -- tokenizer and checkpoints (notebook 04)
from lora_course.checkpoint import CheckpointError, convert, load, save
from lora_course.tokenizer import Tokenizer, train_tokenizer
# -- generation (notebook 04)
from lora_course.generate import generate, stream_generate
# -- LoRA and DoRA (notebooks 05-06)
from lora_course.lora import (
    LoRALinear,
    apply_lora,
    count_parameters,
    fuse,
    print_trainable_parameters,
)
from lora_course.dora import DoRALinear
# -- adapters on disk (notebook 06)
from lora_course.adapters import AdapterError, convert_peft_adapter, load_adapters, save_adapters
# -- quantization and QLoRA (notebooks 07-08)
from lora_course.quant import (
    DequantEmbedding,
    DequantLinear,
    ModelSize,
    QuantizationError,
    dequant_matmul,
    dequantize,
    model_size,
    quantize,
    quantize_model,
    use_dequant_layers,
)
# -- data (notebook 09)
from lora_course.data import DatasetError, DatasetSplits, TokenizedDataset, load_dataset
from lora_course.docstrings import build_docstring_dataset
# -- trainer and losses (notebook 10)
from lora_course.trainer import TrainingArgs, TrainingHistory, evaluate, iterate_batches, loss, train
from lora_course.losses import js_div_loss, kl_div_loss
# -- one-call API (notebook 13)
from lora_course.finetune import FineTuneConfig, FineTuneResult, finetune
