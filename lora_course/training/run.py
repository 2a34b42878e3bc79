"""The state of a training run: its history, checkpoints, evaluations and reports.

``train`` (trainer.py) is the loop; a :class:`Run` holds what the loop's steps share
(the counters, early-stopping bookkeeping, the last good checkpoint) and does what
happens between steps. Taught in notebook 10 (the training loop).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lora_course.adapters.format import AdapterError
from lora_course.training import resume as ckpt
from lora_course.training.args import TrainingArgs
from lora_course.training.evaluate import check_token_ids, evaluate
from lora_course.tree import tree_flatten

import mlx.core as mx
import mlx.nn as nn


class TrainingDivergedError(ValueError):
    """The loss or the gradient became NaN/inf; ``.history`` holds the run so far."""


@dataclass
class TrainingHistory:
    losses: list[float] = field(default_factory=list)  # train loss of each step after start_step
    reports: list[dict] = field(default_factory=list)  # what on_report received, in order
    evals: list[dict] = field(default_factory=list)  # what on_eval received, in order
    start_step: int = 0  # the step this run started from (> 0 after a resume)
    step: int = 0  # the last step completed
    stop_reason: str = ""  # "finished", "early stopping", "diverged" or "nothing to do"
    best_val_loss: float | None = None  # lowest validation loss seen
    best_step: int | None = None  # the step where it was seen
    adapter_path: str = ""  # where checkpoints were written


# Settings that change the trajectory; resuming with a different value warns.
TRAJECTORY_KEYS = (
    "batch_size",
    "grad_accumulation_steps",
    "learning_rate",
    "lr_schedule",
    "warmup",
    "min_learning_rate",
    "optimizer",
    "weight_decay",
    "optimizer_config",
    "lora_plus_ratio",
    "grad_clip",
    "max_seq_length",
    "seed",
)


def call_hooks(callbacks, hook: str, info: dict) -> None:
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(info)


def loss_tokens(dataset, max_seq_length: int) -> int:
    """Target tokens carrying loss in ``dataset`` (a TokenizedDataset, or (tokens, mask) pairs)."""
    if hasattr(dataset, "loss_tokens"):
        return dataset.loss_tokens(max_seq_length)
    total = 0
    for i in range(len(dataset)):
        item = dataset[i]
        tokens, mask = item if isinstance(item, tuple) else (item, None)
        n = min(len(tokens), max_seq_length)
        total += max(n - 1, 0) if mask is None else int(sum(mask[1:n]))
    return total


def count_iterations(model: nn.Module, train_set, args: TrainingArgs, world_size: int) -> tuple[int, int]:
    """Check what the run is given, before any work: -> (optimizer steps, batches per epoch)."""
    if train_set is None or len(train_set) == 0:
        raise ValueError("train: the training set is empty")
    if getattr(getattr(model, "args", None), "vocab_size", None):
        check_token_ids(train_set, model.args.vocab_size, "train: the training set")
    if args.batch_size > len(train_set):
        raise ValueError(
            f"batch_size={args.batch_size} is larger than the training set "
            f"({len(train_set)} examples); use a batch size of at most {len(train_set)}"
        )
    if args.batch_size % world_size:
        raise ValueError(f"batch_size={args.batch_size} must be divisible by the {world_size} processes")
    if not tree_flatten(model.trainable_parameters()):
        raise ValueError("train: the model has no trainable parameters; call apply_lora(model, ...) first")
    if loss_tokens(train_set, args.max_seq_length) == 0:  # the run would report loss 0 and learn nothing
        raise ValueError(
            f"train: no token of the training set carries loss within max_seq_length="
            f"{args.max_seq_length} (with mask_prompt, every completion starts after the cut); "
            "raise max_seq_length or shorten the prompts"
        )
    per_epoch = len(train_set) // args.batch_size
    if args.epochs is None:
        return args.iters, per_epoch
    return max(args.epochs * per_epoch // args.grad_accumulation_steps, 1), per_epoch


class Run:
    """The state of one training run and what happens at its checkpoints, evals and reports.

    ``train`` below is the loop; this class holds what the loop's steps share: the
    counters (step, micro-batches, tokens), early-stopping bookkeeping and the last
    checkpoint that is known to be good.
    """

    def __init__(self, model, optimizer, args, val_set, loss_fn, callbacks, adapter_config, verbose):
        world = mx.distributed.init()
        self.rank, self.size = world.rank(), world.size()
        self.main = self.rank == 0
        self.model, self.optimizer, self.args, self.val_set = model, optimizer, args, val_set
        self.loss_fn, self.callbacks, self.adapter_config, self.verbose = (
            loss_fn,
            callbacks,
            adapter_config,
            verbose,
        )
        self.out = Path(args.adapter_path)
        self.hist = TrainingHistory(adapter_path=str(self.out))
        self.step = self.micro = self.trained_tokens = self.bad_evals = 0
        self.best_params, self.last_good, self.bar = None, None, None

    def say(self, line: str) -> None:
        if self.verbose and self.main:
            (self.bar.write if self.bar is not None else print)(line)

    def resume(self, resume: bool | str) -> None:
        """Continue from a training state: ``True`` means the run's own adapter_path."""
        src = self.out if resume is True else Path(resume)
        params, opt_state, meta, best = ckpt.load_training_state(src)  # complete and finite, or refused
        ckpt.restore_training_state(self.model, self.optimizer, params, opt_state, src)
        self.step, self.micro, self.trained_tokens = (
            meta["step"],
            meta["micro_batches"],
            meta["trained_tokens"],
        )
        self.hist.best_val_loss, self.hist.best_step = meta["best_val_loss"], meta["best_step"]
        self.bad_evals, self.best_params = meta["evals_without_improvement"], best or None
        self.last_good = self.step if src.resolve() == self.out.resolve() else None  # else out/ gets one
        changed = [
            f"{k} {meta['args'].get(k)!r} -> {getattr(self.args, k)!r}"
            for k in TRAJECTORY_KEYS
            if meta["args"].get(k) != getattr(self.args, k)
        ]
        if changed and self.main:
            warnings.warn(
                f"resuming {src} with changed settings ({'; '.join(changed)}): "
                "the run will not reproduce the original trajectory",
                stacklevel=3,
            )

    def save_checkpoint(self) -> None:
        if not self.main:
            return
        arrays = ckpt.trainable_arrays(self.model)
        if not all(mx.all(mx.isfinite(a)).item() for a in arrays.values()):
            self.diverged("a trainable parameter is NaN/inf")
        moments = [v for _, v in tree_flatten(self.optimizer.state) if mx.issubdtype(v.dtype, mx.floating)]
        if not all(mx.all(mx.isfinite(v)).item() for v in moments):  # a checkpoint must be resumable
            self.diverged("an optimizer moment is NaN/inf")
        meta = dict(
            step=self.step,
            micro_batches=self.micro,
            trained_tokens=self.trained_tokens,
            best_val_loss=self.hist.best_val_loss,
            best_step=self.hist.best_step,
            evals_without_improvement=self.bad_evals,
            world_size=self.size,
            args=asdict(self.args),
        )
        try:
            ckpt.save_training_state(self.out, self.model, self.optimizer, meta, best=self.best_params)
            ckpt.save_adapter_files(self.model, self.out, self.adapter_config)
        except (OSError, AdapterError) as e:
            raise ckpt.describe_write_error(e, self.out, self.step, self.last_good) from e
        self.last_good = self.step

    def diverged(self, what: str):
        msg = f"training diverged at step {self.step}: {what}."
        if self.last_good is not None and (self.out / ckpt.STATE_FILE).exists():
            try:  # checked on load: complete and finite, or a ValueError saying why
                params, opt_state, _, _ = ckpt.load_training_state(self.out)
                ckpt.restore_training_state(self.model, self.optimizer, params, opt_state, self.out)
                msg += (
                    f" The last good checkpoint (step {self.last_good}) in {self.out}/ is intact "
                    "and was loaded back."
                )
            except ValueError as e:
                msg += f" The checkpoint in {self.out}/ could not be restored either ({e})."
        else:
            msg += " No checkpoint had been written yet."
        msg += (
            f" Lower the learning rate (now {self.args.learning_rate:g}), set grad_clip, "
            f"or check the data near micro-batch {self.micro}."
        )
        self.hist.stop_reason = "diverged"
        err = TrainingDivergedError(msg)
        err.history = self.hist
        raise err

    def run_eval(self) -> bool:
        """Validate; returns True when early stopping should end the run."""
        args, hist = self.args, self.hist
        tic = time.perf_counter()
        val_loss, ppl = evaluate(
            self.model, self.val_set, args.batch_size, args.val_batches, args.max_seq_length, self.loss_fn
        )
        if hist.best_val_loss is None or val_loss < hist.best_val_loss:
            hist.best_val_loss, hist.best_step, self.bad_evals = val_loss, self.step, 0
            if args.early_stopping_patience is not None:
                self.best_params = ckpt.trainable_arrays(self.model)  # immutable arrays: no copy needed
                if self.main:
                    (self.out / "best").mkdir(exist_ok=True)
                    ckpt.save_adapter_files(self.model, self.out / "best", self.adapter_config)
        else:
            self.bad_evals += 1
        info = dict(
            step=self.step,
            val_loss=val_loss,
            val_perplexity=ppl,
            val_time=time.perf_counter() - tic,
            best_val_loss=hist.best_val_loss,
            best_step=hist.best_step,
        )
        hist.evals.append(info)
        self.say(f"step {self.step}: val loss {val_loss:.4f}, val ppl {ppl:.2f} ({info['val_time']:.1f}s)")
        if self.main:
            call_hooks(self.callbacks, "on_eval", info)
        patience = args.early_stopping_patience
        return patience is not None and self.bad_evals >= patience

    def report(self, window: dict, per_epoch: int, grad_norm: float) -> None:
        secs = max(window["time"], 1e-9)
        info = dict(
            step=self.step,
            epoch=self.micro / per_epoch,
            train_loss=window["loss"] / max(window["toks"], 1),
            learning_rate=self.optimizer.learning_rate.item(),
            iterations_per_second=window["steps"] / secs,
            tokens_per_second=window["toks"] / secs,
            trained_tokens=self.trained_tokens,
            peak_memory_gb=mx.get_peak_memory() / 1e9,
            grad_norm=grad_norm,
        )
        self.hist.reports.append(info)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{info['train_loss']:.3f}")
        self.say(
            f"step {self.step}: train loss {info['train_loss']:.4f}, lr {info['learning_rate']:.2e}, "
            f"{info['iterations_per_second']:.2f} it/s, {info['tokens_per_second']:.0f} tok/s, "
            f"peak mem {info['peak_memory_gb']:.3f} GB"
        )
        if self.main:
            call_hooks(self.callbacks, "on_report", info)
