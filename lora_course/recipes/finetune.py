"""One call from a model and a dataset to a fine-tuned model: ``finetune``.

    result = lora_course.recipes.finetune(model="path/to/checkpoint", data="path/to/data",
                                  iters=200, rank=8, learning_rate=1e-4)
    print(result.generate("Q: What is RMSNorm?\\nA:"))
    result.fuse("my-model")

It is the course's pieces in order, nothing more: ``checkpoint.load`` ->
``quantize_model`` (QLoRA, Dettmers et al., 2023) -> ``apply_lora`` (Hu et al., 2021)
-> ``load_dataset`` -> ``train``. Every option is a field of ``FineTuneConfig``
(``TrainingArgs`` plus the adapter and quantization settings), the same keys the
``lora-course train`` CLI and its YAML files use. Taught in notebook 13.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lora_course.adapters.apply import apply_lora, fuse
from lora_course.adapters.files import load_adapters
from lora_course.adapters.lora import check_hyper
from lora_course.checkpoint.load import load
from lora_course.checkpoint.save import save
from lora_course.data.datasets import DatasetSplits, load_dataset
from lora_course.model.generate import generate
from lora_course.quant.layers import quantize_model
from lora_course.quant.quantize import check_params
from lora_course.training.args import TrainingArgs
from lora_course.training.resume import STATE_FILE
from lora_course.training.run import TrainingHistory
from lora_course.training.trainer import train

import mlx.core as mx
import mlx.nn as nn


@dataclass
class FineTuneConfig(TrainingArgs):
    fine_tune_type: str = "lora"  # "lora", "dora" (Liu et al., 2024) or "full" (whole blocks)
    num_layers: int | None = None  # adapt the last N blocks; -1: all; None: 16, or all of a smaller model
    rank: int = 8  # LoRA rank r
    alpha: float = 16.0  # LoRA alpha; the update is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapter input during training
    keys: list[str] | None = None  # linear layers to adapt, e.g. ["self_attn.q_proj"]; None: all
    mask_prompt: bool = False  # only completion / assistant tokens carry loss
    quantize: bool = False  # quantize the base model first (QLoRA)
    q_bits: int = 4  # bits per quantized weight
    q_group_size: int = 64  # weights sharing one scale and bias
    dtype: str | None = None  # cast float weights first ("float32" is fastest on CPU); None: keep
    resume_adapter_file: str | None = (
        None  # adapter dir to start from; exact resume if it holds a training state
    )

    def __post_init__(self):
        super().__post_init__()
        if self.fine_tune_type not in ("lora", "dora", "full"):
            raise ValueError(f"fine_tune_type={self.fine_tune_type!r}: choose lora, dora or full")
        if self.dtype not in (None, "float32", "float16", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r}: choose float32, float16 or bfloat16 (or None)")
        check_hyper(self.rank, self.alpha, self.dropout)  # rank within limits.MAX_RANK, before any work
        if self.quantize:
            check_params(self.q_group_size, self.q_bits)


@dataclass
class FineTuneResult:
    model: nn.Module  # the model with its trained adapters
    tokenizer: Any  # the tokenizer it was loaded with (None if none was given)
    adapter_path: Path  # adapters.safetensors + adapter_config.json + training_state.safetensors
    history: TrainingHistory  # per-step losses, reports, evaluations
    config: FineTuneConfig  # every setting used
    data: Any = None  # the DatasetSplits it trained on

    def generate(self, prompt: str, **kwargs) -> str:
        """``lora_course.model.generate`` with this model and tokenizer (max_tokens, temp, ...)."""

        if self.tokenizer is None:
            raise ValueError("generate: this result has no tokenizer; pass tokenizer= to finetune")
        return generate(self.model, self.tokenizer, prompt, **kwargs)

    def fuse(self, save_path, de_quantize: bool = False, format: str = "mlx") -> Path:
        """Merge the adapters into the weights (in place) and save a standalone checkpoint."""

        fuse(self.model, de_quantize=de_quantize)
        return save(self.model, self.tokenizer, save_path, format=format)


def load_model(model=None, tokenizer=None):
    """(model, tokenizer) from a checkpoint path, None (the course base model), a
    (model, tokenizer) pair, or a model object (with ``tokenizer`` given separately)."""
    if isinstance(model, nn.Module):
        return model, tokenizer
    if isinstance(model, tuple) and len(model) == 2:
        return model

    return load(model)


def prepare_base(model: nn.Module, cfg: FineTuneConfig) -> nn.Module:
    """Cast (``dtype``) and quantize (``quantize``) the base model as ``cfg`` says."""
    if cfg.dtype is not None:
        model.set_dtype(getattr(mx, cfg.dtype))
    if cfg.quantize:
        quantize_model(model, group_size=cfg.q_group_size, bits=cfg.q_bits)
    return model


def prepare_model(model: nn.Module, cfg: FineTuneConfig) -> tuple[nn.Module, Path | None]:
    """The base as ``prepare_base`` leaves it, plus adapters; returns the model and, when
    ``resume_adapter_file`` holds a training state, the directory to resume from."""
    prepare_base(model, cfg)
    resume_from = None
    if cfg.resume_adapter_file is not None:
        folder = Path(cfg.resume_adapter_file)
        folder = folder if folder.is_dir() else folder.parent
        if (folder / STATE_FILE).is_file():
            resume_from = folder
        else:  # adapters only: start from their weights, at step 0
            load_adapters(model, folder)
    if getattr(model, "lora_config", None) is None:
        mx.random.seed(cfg.seed)  # the LoRA init (lora_a) is part of the run: same seed, same run
        num_layers = min(16, len(model.layers)) if cfg.num_layers is None else cfg.num_layers
        apply_lora(
            model,
            num_layers=num_layers,
            keys=cfg.keys,
            rank=cfg.rank,
            alpha=cfg.alpha,
            dropout=cfg.dropout,
            kind=cfg.fine_tune_type,
        )
    return model, resume_from


def load_data(data, tokenizer, cfg: FineTuneConfig):
    """``DatasetSplits`` from a path, a DatasetSplits, a (train, valid[, test]) tuple, or one
    training dataset (anything with ``len`` and ``ds[i] -> (tokens, mask)``)."""

    if data is None:
        raise ValueError("finetune: no data; pass data='path/to/folder' (train.jsonl, valid.jsonl)")
    if isinstance(data, (str, Path)):
        if tokenizer is None:
            raise ValueError("finetune: a data path needs a tokenizer; pass tokenizer= or a model path")
        return load_dataset(data, tokenizer, max_seq_length=cfg.max_seq_length, mask_prompt=cfg.mask_prompt)
    if isinstance(data, DatasetSplits):
        return data
    if isinstance(data, tuple) and 1 <= len(data) <= 3:
        return DatasetSplits(*data, *[None] * (3 - len(data)))
    return DatasetSplits(data, None, None)


def finetune(
    model=None,
    data=None,
    *,
    tokenizer=None,
    callbacks=None,
    teacher=None,
    resume: bool = False,
    progress: bool = True,
    verbose: bool = True,
    **options,
) -> FineTuneResult:
    """Fine-tune ``model`` on ``data``; ``options`` are ``FineTuneConfig`` fields.

    ``model``: a checkpoint path, None for the course's embedded base model, a
    ``(model, tokenizer)`` pair, or a model (then pass ``tokenizer=``). ``data``: a
    dataset path, a ``DatasetSplits``, or ``(train, valid)``. An unknown option is an
    error naming it. ``resume=True`` continues an interrupted run in ``adapter_path``.
    """
    cfg = FineTuneConfig.from_dict(options, source="finetune()")
    model, tokenizer = load_model(model, tokenizer)
    model, resume_from = prepare_model(model, cfg)
    splits = load_data(data, tokenizer, cfg)
    if splits.train is None:
        raise ValueError("finetune: the data has no training split")
    resume = resume_from or resume
    history = train(
        model,
        splits.train,
        splits.valid,
        cfg,
        callbacks=callbacks,
        teacher=teacher,
        resume=resume if isinstance(resume, bool) else str(resume),
        adapter_config=asdict(cfg),
        progress=progress,
        verbose=verbose,
    )
    return FineTuneResult(model, tokenizer, Path(cfg.adapter_path), history, cfg, splits)
