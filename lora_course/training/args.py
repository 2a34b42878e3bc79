"""TrainingArgs: every setting of a training run, checked when it is made.

A dataclass with a comment on every field; ``from_dict`` reads a YAML file's dict and
fails on unknown keys and wrong types (``lora_course.config``). Taught in notebook 10.
"""

from __future__ import annotations

import reprlib
from dataclasses import asdict, dataclass, fields
from typing import Any

from lora_course import limits
from lora_course.config import checked_fields
from lora_course.training.optimizers import OPTIMIZERS, check_optimizer_settings
from lora_course.training.schedules import SCHEDULES


@dataclass
class TrainingArgs:
    iters: int = 1000  # optimizer steps to run (ignored when epochs is set)
    epochs: int | None = None  # passes over the training set; sets iters when given
    batch_size: int = 4  # examples per optimizer step per micro-batch, over ALL processes
    grad_accumulation_steps: int = 1  # micro-batches summed into one optimizer step
    learning_rate: float = 1e-5  # peak learning rate (after warmup)
    lr_schedule: str = "constant"  # "constant", "linear" or "cosine" decay after warmup
    warmup: int = 0  # steps of linear warmup from 0 to learning_rate
    min_learning_rate: float = 0.0  # where linear/cosine decay ends
    optimizer: str = "adam"  # sgd, rmsprop, adagrad, adadelta, adam, adamw, adamax, lion, adafactor, muon
    weight_decay: float = 0.0  # weight decay (sgd, adamw, lion, adafactor, muon; others: must be 0)
    optimizer_config: dict | None = None  # the optimizer's other settings, e.g. {"betas": [0.9, 0.95]}
    lora_plus_ratio: float | None = None  # LoRA+: lora_b learns this many times faster; None: off
    grad_clip: float | None = None  # clip the global gradient norm to this; None: no clipping
    max_seq_length: int = 2048  # longer examples are truncated (with a warning)
    steps_per_report: int = 10  # print / call on_report every N steps
    steps_per_eval: int = 200  # validate every N steps (and at the start and end); 0: never
    val_batches: int = 25  # validation batches per evaluation; -1: the whole set
    save_every: int = 100  # checkpoint every N steps (and at the start and end); 0: only those
    adapter_path: str = "adapters"  # directory for adapters, checkpoints and training state
    early_stopping_patience: int | None = None  # stop after N evals without a better val loss
    # positions per cross-entropy chunk (training/chunked_loss.py); None: auto, chunked
    # from a 32k vocabulary up, about 64 MiB of logits per chunk; 0: the plain loss
    loss_chunk_size: int | None = None
    grad_checkpoint: bool = False  # recompute each block in the backward pass to save memory
    seed: int = 0  # fixes data order and dropout; the same seed gives the same run
    compile: bool = True  # mx.compile the whole step (faster; off only to debug)

    def __post_init__(self):
        def need(ok, key, what):
            if not ok:
                raise ValueError(f"{key}={reprlib.repr(getattr(self, key))}: {what}")

        # Types first (a dataclass built directly is not checked by from_dict), then ranges.
        for f in fields(self):
            value, kind = getattr(self, f.name), str(f.type)
            optional = "None" in kind and value is None
            if kind.startswith("int") and not optional:
                need(limits.is_int(value), f.name, "must be an integer")
            elif kind.startswith("float") and not optional:
                need(limits.is_number(value), f.name, "must be a finite number")
            elif kind == "bool":
                need(isinstance(value, bool), f.name, "must be true or false")
        need(
            self.max_seq_length <= limits.MAX_SEQ_LENGTH,
            "max_seq_length",
            f"is above {limits.MAX_SEQ_LENGTH}",
        )
        need(self.batch_size <= limits.MAX_BATCH, "batch_size", f"is above {limits.MAX_BATCH}")
        need(self.seed <= limits.MAX_SEED, "seed", "must fit in 63 bits")

        for key in ("batch_size", "grad_accumulation_steps", "steps_per_report", "max_seq_length"):
            need(getattr(self, key) >= 1, key, "must be at least 1")
        for key in ("iters", "warmup", "steps_per_eval", "save_every"):
            need(getattr(self, key) >= 0, key, "must be 0 or more")
        need(self.epochs is None or self.epochs >= 1, "epochs", "must be at least 1 (or None)")
        need(self.val_batches == -1 or self.val_batches >= 1, "val_batches", "must be -1 or at least 1")
        need(self.learning_rate >= 0, "learning_rate", "must not be negative")
        need(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "must be positive (or None)")
        need(self.lr_schedule in SCHEDULES, "lr_schedule", f"choose one of {', '.join(SCHEDULES)}")
        need(self.optimizer in OPTIMIZERS, "optimizer", f"choose one of {', '.join(OPTIMIZERS)}")
        check_optimizer_settings(self.optimizer, self.weight_decay, self.optimizer_config)
        need(
            self.lora_plus_ratio is None or self.lora_plus_ratio > 0,
            "lora_plus_ratio",
            "must be positive (or None)",
        )
        need(
            self.loss_chunk_size is None or self.loss_chunk_size >= 0,
            "loss_chunk_size",
            "must be 0 or more (or None)",
        )
        need(
            self.early_stopping_patience is None or self.early_stopping_patience >= 1,
            "early_stopping_patience",
            "must be at least 1 (or None)",
        )
        need(self.seed >= 0, "seed", "must be 0 or more")

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str = "config", strict: bool = True):
        """Build from a dict such as a parsed YAML file.

        With ``strict`` (the default) an unknown key or a value of the wrong type is a
        ``ConfigError`` naming the key: a misspelt option that is silently ignored costs
        a whole training run. ``strict=False`` ignores unknown keys instead.
        """
        return cls(**checked_fields(cls, config, source, strict))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
