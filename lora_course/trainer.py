"""The training loop: the loss, evaluation and ``train`` (batches come from batching.py).

Fine-tuning is ordinary next-token training (Radford et al., 2018) restricted to
the parameters left trainable (LoRA's ``lora_a``/``lora_b``, Hu et al., 2021). One
optimizer step is:

    for each of the k micro-batches:   g += grad( sum of token losses )     (accumulate)
    g /= number of loss tokens over all micro-batches (and all processes)
    g  = clip(g, max_norm);  params = optimizer(params, g, lr(step))

Dividing by the total token count (not averaging per-batch means) makes k
micro-batches of size B exactly the same update as one batch of size k*B, and the
same holds across data-parallel processes (``mx.distributed``): 2 processes x B
equal 1 process x 2B. The whole step, forward, backward, all-reduce and update,
is one ``mx.compile``d function. Checkpoints are atomic and hold all the state the
next step depends on, so a killed run resumes bitwise (``checkpointing.py``).

Taught in notebook 10 (the training loop) and notebook 11 (scaling out).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from lora_course import checkpointing as ckpt
from lora_course.adapters import AdapterError
from lora_course.batching import iterate_batches
from lora_course.config import ConfigError, checked_fields  # noqa: F401
from lora_course.fastmath import cross_entropy
from lora_course.schedules import OPTIMIZERS, SCHEDULES, build_optimizer, build_schedule
from lora_course.step import enable_grad_checkpoint, make_step
from lora_course.tree import tree_flatten, tree_unflatten


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
    optimizer: str = "adam"  # "adam", "adamw", "sgd" or "adafactor"
    weight_decay: float = 0.0  # decoupled weight decay (adamw, sgd, adafactor)
    grad_clip: float | None = None  # clip the global gradient norm to this; None: no clipping
    max_seq_length: int = 2048  # longer examples are truncated (with a warning)
    steps_per_report: int = 10  # print / call on_report every N steps
    steps_per_eval: int = 200  # validate every N steps (and at the start and end); 0: never
    val_batches: int = 25  # validation batches per evaluation; -1: the whole set
    save_every: int = 100  # checkpoint every N steps (and at the start and end); 0: only those
    adapter_path: str = "adapters"  # directory for adapters, checkpoints and training state
    early_stopping_patience: int | None = None  # stop after N evals without a better val loss
    grad_checkpoint: bool = False  # recompute each block in the backward pass to save memory
    seed: int = 0  # fixes data order and dropout; the same seed gives the same run
    compile: bool = True  # mx.compile the whole step (faster; off only to debug)

    def __post_init__(self):
        def need(ok, key, what):
            if not ok:
                raise ValueError(f"{key}={getattr(self, key)!r}: {what}")

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
        need(self.early_stopping_patience is None or self.early_stopping_patience >= 1,
             "early_stopping_patience", "must be at least 1 (or None)")
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


class TrainingDivergedError(ValueError):
    """The loss or the gradient became NaN/inf; ``.history`` holds the run so far."""


# ----------------------------------------------------------------------------- loss


def loss(model: nn.Module, inputs: mx.array, targets: mx.array, mask: mx.array):
    """Mean cross-entropy over the tokens where ``mask`` is 1 -> (loss, ntoks).

    inputs, targets: (B, L) int32, targets = inputs shifted left by one;
    mask: (B, L), 0 on padding and on prompt tokens that carry no loss.
    """
    logits = model(inputs).astype(mx.float32)  # (B, L, V), float32 for a stable logsumexp
    ce = cross_entropy(logits, targets)  # (B, L): logsumexp(logits) - logits[target]; fastmath.py
    ntoks = mask.sum()
    return (ce * mask).sum() / mx.maximum(ntoks, 1), ntoks


# ----------------------------------------------------------------------------- evaluation


def check_token_ids(dataset, vocab_size: int, what: str) -> None:
    """Every token id must index the embedding. MLX does not bounds-check that lookup, so
    an id >= vocab_size (data tokenized for another model) would read past the table:
    garbage losses, or a crash. One pass; ``max`` and ``min`` of a list run in C."""
    flat = getattr(dataset, "_tokens", None)  # a TokenizedDataset keeps every id in one array
    if isinstance(flat, np.ndarray) and (flat.size == 0 or (flat.min() >= 0 and flat.max() < vocab_size)):
        return
    for i in range(len(dataset)):
        item = dataset[i]
        tokens = item[0] if isinstance(item, tuple) else item
        if len(tokens) and not (0 <= min(tokens) and max(tokens) < vocab_size):
            bad = next(int(t) for t in tokens if not 0 <= t < vocab_size)
            raise ValueError(f"{getattr(dataset, 'path', None) or what}: sample {i} has token id {bad}, "
                             f"outside the model's vocabulary (vocab_size={vocab_size}); was it "
                             "tokenized with another model's tokenizer?")


def evaluate(
    model: nn.Module, dataset, batch_size: int, num_batches: int = -1, max_seq_length: int = 2048,
    loss_fn: Callable = loss,
) -> tuple[float, float]:
    """Token-weighted mean loss over ``num_batches`` batches (-1: all) -> (loss, perplexity).

    The batches come in a fixed shuffled order (seed 0), so the first ``num_batches`` are a
    fair sample of lengths rather than the shortest examples, and the same ones every time.
    """
    if dataset is None or len(dataset) == 0:
        raise ValueError("evaluate: the dataset is empty")
    if getattr(getattr(model, "args", None), "vocab_size", None):
        check_token_ids(dataset, model.args.vocab_size, "evaluate: the dataset")
    world = mx.distributed.init()
    was_training = model.training
    model.eval()
    total, ntoks = mx.array(0.0), mx.array(0.0)
    batches = iterate_batches(dataset, batch_size, max_seq_length, shuffle=True, rank=world.rank(),
                              world_size=world.size(), limit=None if num_batches < 0 else num_batches)
    for batch in batches:
        value, n = loss_fn(model, *batch)
        total, ntoks = total + value * n, ntoks + n
        mx.eval(total, ntoks)
    model.train(was_training)
    if world.size() > 1:
        total, ntoks = mx.distributed.all_sum(mx.stack([total, ntoks]), stream=mx.cpu)
    if ntoks.item() == 0:
        raise ValueError("evaluate: no token in the evaluated batches carries loss (check the mask)")
    mean = (total / ntoks).item()
    return mean, math.exp(min(mean, 700.0))


# ----------------------------------------------------------------------------- train


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
_TRAJECTORY_KEYS = ("batch_size", "grad_accumulation_steps", "learning_rate", "lr_schedule", "warmup",
                    "min_learning_rate", "optimizer", "weight_decay", "grad_clip", "max_seq_length", "seed")


def _micro_seed(seed: int, micro: int, rank: int) -> int:
    # Dropout noise of micro-batch `micro` depends on nothing else: resume needs no RNG state.
    return int(np.random.SeedSequence([seed, micro, rank]).generate_state(1, np.uint64)[0])


def _batch_stream(dataset, args: TrainingArgs, micro: int, rank: int, world_size: int):
    """Training batches forever, starting at global micro-batch ``micro``."""
    per_epoch = len(dataset) // args.batch_size
    epoch, start = divmod(micro, per_epoch)
    while True:
        yield from iterate_batches(dataset, args.batch_size, args.max_seq_length, train=True, seed=args.seed,
                                   epoch=epoch, start=start, rank=rank, world_size=world_size)
        epoch, start = epoch + 1, 0


def _call(callbacks, hook: str, info: dict) -> None:
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(info)


def train(
    model: nn.Module, train_set, val_set=None, args: TrainingArgs | dict | None = None, *,
    optimizer=None, loss_fn: Callable = loss, callbacks=None, teacher: nn.Module | None = None,
    distill: str = "kl", temperature: float = 1.0, resume: bool | str = False,
    adapter_config: dict | None = None, progress: bool = True, verbose: bool = True,
) -> TrainingHistory:
    """Train ``model``'s trainable parameters on ``train_set``; see ``TrainingArgs`` for options.

    ``loss_fn(model, inputs, targets, mask) -> (loss, ntoks)`` is the objective; with a
    ``teacher`` it becomes a distillation loss (``distill`` "kl" or "js", see losses.py).
    ``resume=True`` continues from ``args.adapter_path``'s training state (or from the
    directory given as ``resume``). ``adapter_config`` goes into ``adapter_config.json``.
    Under ``mlx.launch`` every process runs this with the same arguments; batches are
    split across processes and only rank 0 writes files or prints.
    """
    args = args if isinstance(args, TrainingArgs) else TrainingArgs.from_dict(args or {})
    callbacks = list(callbacks or [])
    world = mx.distributed.init()
    rank, size = world.rank(), world.size()
    main = rank == 0
    if teacher is not None:
        from lora_course.losses import distillation_loss

        loss_fn = distillation_loss(teacher, kind=distill, temperature=temperature)
    if train_set is None or len(train_set) == 0:
        raise ValueError("train: the training set is empty")
    if getattr(getattr(model, "args", None), "vocab_size", None):
        check_token_ids(train_set, model.args.vocab_size, "train: the training set")
    if args.batch_size > len(train_set):
        raise ValueError(f"batch_size={args.batch_size} is larger than the training set "
                         f"({len(train_set)} examples); use a batch size of at most {len(train_set)}")
    if args.batch_size % size:
        raise ValueError(f"batch_size={args.batch_size} must be divisible by the {size} processes")
    per_epoch = len(train_set) // args.batch_size
    iters = args.iters if args.epochs is None else max(args.epochs * per_epoch // args.grad_accumulation_steps, 1)
    if not tree_flatten(model.trainable_parameters()):
        raise ValueError("train: the model has no trainable parameters; call apply_lora(model, ...) first")
    if optimizer is None:
        schedule = build_schedule(args.lr_schedule, args.learning_rate, iters, args.warmup, args.min_learning_rate)
        optimizer = build_optimizer(args.optimizer, schedule, args.weight_decay)
    optimizer.init(model.trainable_parameters())

    out = Path(args.adapter_path)
    if main:
        ckpt.check_writable(out)
        ckpt.remove_stale_temporaries(out)
    hist = TrainingHistory(adapter_path=str(out))
    step = micro = trained_tokens = bad_evals = 0
    best_params, last_good = None, None
    if resume:
        src = out if resume is True else Path(resume)
        params, opt_state, meta, best = ckpt.load_training_state(src)
        ckpt.restore_training_state(model, optimizer, params, opt_state, src)
        step, micro, trained_tokens = meta["step"], meta["micro_batches"], meta["trained_tokens"]
        hist.best_val_loss, hist.best_step = meta["best_val_loss"], meta["best_step"]
        bad_evals, best_params = meta["evals_without_improvement"], best or None
        last_good = step if src.resolve() == out.resolve() else None  # else out/ gets one below
        changed = [f"{k} {meta['args'].get(k)!r} -> {getattr(args, k)!r}" for k in _TRAJECTORY_KEYS
                   if meta["args"].get(k) != getattr(args, k)]
        if changed and main:
            warnings.warn(f"resuming {src} with changed settings ({'; '.join(changed)}): "
                          "the run will not reproduce the original trajectory", stacklevel=2)
    hist.start_step = hist.step = step

    def say(line: str) -> None:
        if verbose and main:
            (bar.write if bar is not None else print)(line)

    def save_checkpoint(at_step: int) -> None:
        nonlocal last_good
        if not main:
            return
        arrays = ckpt.trainable_arrays(model)
        if not all(mx.all(mx.isfinite(a)).item() for a in arrays.values()):
            diverged(at_step, "a trainable parameter is NaN/inf")
        meta = dict(step=at_step, micro_batches=micro, trained_tokens=trained_tokens,
                    best_val_loss=hist.best_val_loss, best_step=hist.best_step,
                    evals_without_improvement=bad_evals, world_size=size, args=asdict(args))
        try:
            ckpt.save_training_state(out, model, optimizer, meta, best=best_params)
            ckpt.save_adapter_files(model, out, adapter_config)
        except (OSError, AdapterError) as e:
            raise ckpt.describe_write_error(e, out, at_step, last_good) from e
        last_good = at_step

    def diverged(at_step: int, what: str):
        msg = f"training diverged at step {at_step}: {what}."
        if last_good is not None and (out / ckpt.STATE_FILE).exists():
            params, opt_state, _, _ = ckpt.load_training_state(out)
            ckpt.restore_training_state(model, optimizer, params, opt_state, out)
            msg += f" The last good checkpoint (step {last_good}) in {out}/ is intact and was loaded back."
        else:
            msg += " No checkpoint had been written yet."
        msg += (f" Lower the learning rate (now {args.learning_rate:g}), set grad_clip, "
                f"or check the data near micro-batch {micro}.")
        hist.stop_reason = "diverged"
        err = TrainingDivergedError(msg)
        err.history = hist
        raise err

    def run_eval(at_step: int) -> bool:
        """Validate; returns True when early stopping should end the run."""
        nonlocal bad_evals, best_params
        tic = time.perf_counter()
        val_loss, ppl = evaluate(model, val_set, args.batch_size, args.val_batches, args.max_seq_length, loss_fn)
        if hist.best_val_loss is None or val_loss < hist.best_val_loss:
            hist.best_val_loss, hist.best_step, bad_evals = val_loss, at_step, 0
            if args.early_stopping_patience is not None:
                best_params = ckpt.trainable_arrays(model)  # arrays are immutable: no copy needed
                if main:
                    (out / "best").mkdir(exist_ok=True)
                    ckpt.save_adapter_files(model, out / "best", adapter_config)
        else:
            bad_evals += 1
        info = dict(step=at_step, val_loss=val_loss, val_perplexity=ppl, val_time=time.perf_counter() - tic,
                    best_val_loss=hist.best_val_loss, best_step=hist.best_step)
        hist.evals.append(info)
        say(f"step {at_step}: val loss {val_loss:.4f}, val ppl {ppl:.2f} ({info['val_time']:.1f}s)")
        if main:
            _call(callbacks, "on_eval", info)
        patience = args.early_stopping_patience
        return patience is not None and bad_evals >= patience

    model.train()
    undo_checkpointing = enable_grad_checkpoint(model) if args.grad_checkpoint else None
    accumulate, update = make_step(model, optimizer, loss_fn, args.grad_clip, size)
    state = [model.state, optimizer.state, mx.random.state]
    if args.compile:
        inputs = state + ([teacher.state] if teacher is not None else [])
        mx.eval(inputs)  # compile captures arrays; lazy, never-evaluated ones would break it
        accumulate = mx.compile(accumulate, inputs=inputs, outputs=state)
        update = mx.compile(update, inputs=inputs, outputs=state)

    from tqdm.auto import tqdm

    bar = tqdm(total=iters, initial=step, desc="train", unit="step", disable=not (progress and main)) \
        if progress and main else None
    hist.stop_reason = "nothing to do" if step >= iters else "finished"
    window = dict(loss=0.0, toks=0.0, steps=0, time=0.0)
    try:
        if last_good is None:  # from the first moment, adapter_path holds a complete checkpoint
            save_checkpoint(step)
        if step == 0 and val_set is not None and args.steps_per_eval:
            run_eval(0)
        batches = _batch_stream(train_set, args, micro, rank, size)
        while step < iters:
            tic = time.perf_counter()
            acc = None
            for k in range(args.grad_accumulation_steps):
                batch = next(batches)
                mx.random.seed(_micro_seed(args.seed, micro, rank))
                micro += 1
                if k + 1 < args.grad_accumulation_steps:
                    acc = accumulate(*batch, acc)
                    mx.eval(acc)
                else:
                    value, ntoks, gnorm = update(*batch, acc)
            mx.eval(state, value, ntoks, gnorm)
            step += 1
            loss_f, ntoks_f, gnorm_f = value.item(), ntoks.item(), gnorm.item()
            window["time"] += time.perf_counter() - tic
            if not (math.isfinite(loss_f) and math.isfinite(gnorm_f)):
                diverged(step, f"the loss is {loss_f} and the gradient norm {gnorm_f}")
            hist.losses.append(loss_f)
            hist.step = step
            trained_tokens += int(ntoks_f)
            window["loss"] += loss_f * ntoks_f
            window["toks"] += ntoks_f
            window["steps"] += 1
            if bar is not None:
                bar.update(1)
            if step % args.steps_per_report == 0 or step == iters:
                secs = max(window["time"], 1e-9)
                info = dict(step=step, epoch=micro / per_epoch, train_loss=window["loss"] / max(window["toks"], 1),
                            learning_rate=optimizer.learning_rate.item(), iterations_per_second=window["steps"] / secs,
                            tokens_per_second=window["toks"] / secs, trained_tokens=trained_tokens,
                            peak_memory_gb=mx.get_peak_memory() / 1e9, grad_norm=gnorm_f)
                hist.reports.append(info)
                if bar is not None:
                    bar.set_postfix(loss=f"{info['train_loss']:.3f}")
                say(f"step {step}: train loss {info['train_loss']:.4f}, lr {info['learning_rate']:.2e}, "
                    f"{info['iterations_per_second']:.2f} it/s, {info['tokens_per_second']:.0f} tok/s, "
                    f"peak mem {info['peak_memory_gb']:.3f} GB")
                if main:
                    _call(callbacks, "on_report", info)
                window = dict(loss=0.0, toks=0.0, steps=0, time=0.0)
            if val_set is not None and args.steps_per_eval and (step % args.steps_per_eval == 0 or step == iters):
                if run_eval(step):
                    hist.stop_reason = "early stopping"
                    say(f"early stopping at step {step}: no better val loss than "
                        f"{hist.best_val_loss:.4f} (step {hist.best_step}) for {bad_evals} evals")
                    break
            if args.save_every and step % args.save_every == 0:
                save_checkpoint(step)
    finally:
        if bar is not None:
            bar.close()
        if undo_checkpointing is not None:
            undo_checkpointing()

    if last_good != step:
        save_checkpoint(step)
    if best_params is not None and hist.best_step != step:
        # With early stopping the result is the best validated adapter, not the last one.
        model.update(tree_unflatten(list(best_params.items())))
        if main:
            ckpt.save_adapter_files(model, out, adapter_config)
    return hist
