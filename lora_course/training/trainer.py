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
next step depends on, so a killed run resumes bitwise (``resume.py``).

Taught in notebook 10 (the training loop) and notebook 11 (scaling out).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from lora_course.adapters.files import AdapterError
from lora_course.data.batching import iterate_batches
from lora_course.training import resume as ckpt
from lora_course.training.args import TrainingArgs
from lora_course.training.evaluate import check_token_ids, evaluate, loss
from lora_course.training.losses import distillation_loss
from lora_course.training.schedules import build_optimizer, build_schedule
from lora_course.training.step import enable_grad_checkpoint, make_step
from lora_course.tree import tree_flatten, tree_unflatten


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
_TRAJECTORY_KEYS = (
    "batch_size",
    "grad_accumulation_steps",
    "learning_rate",
    "lr_schedule",
    "warmup",
    "min_learning_rate",
    "optimizer",
    "weight_decay",
    "grad_clip",
    "max_seq_length",
    "seed",
)


def _micro_seed(seed: int, micro: int, rank: int) -> int:
    # Dropout noise of micro-batch `micro` depends on nothing else: resume needs no RNG state.
    return int(np.random.SeedSequence([seed, micro, rank]).generate_state(1, np.uint64)[0])


def _batch_stream(dataset, args: TrainingArgs, micro: int, rank: int, world_size: int):
    """Training batches forever, starting at global micro-batch ``micro``."""
    per_epoch = len(dataset) // args.batch_size
    epoch, start = divmod(micro, per_epoch)
    while True:
        yield from iterate_batches(
            dataset,
            args.batch_size,
            args.max_seq_length,
            train=True,
            seed=args.seed,
            epoch=epoch,
            start=start,
            rank=rank,
            world_size=world_size,
        )
        epoch, start = epoch + 1, 0


def _call(callbacks, hook: str, info: dict) -> None:
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(info)


def train(
    model: nn.Module,
    train_set,
    val_set=None,
    args: TrainingArgs | dict | None = None,
    *,
    optimizer=None,
    loss_fn: Callable = loss,
    callbacks=None,
    teacher: nn.Module | None = None,
    distill: str = "kl",
    temperature: float = 1.0,
    resume: bool | str = False,
    adapter_config: dict | None = None,
    progress: bool = True,
    verbose: bool = True,
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
        loss_fn = distillation_loss(teacher, kind=distill, temperature=temperature)
    if train_set is None or len(train_set) == 0:
        raise ValueError("train: the training set is empty")
    if getattr(getattr(model, "args", None), "vocab_size", None):
        check_token_ids(train_set, model.args.vocab_size, "train: the training set")
    if args.batch_size > len(train_set):
        raise ValueError(
            f"batch_size={args.batch_size} is larger than the training set "
            f"({len(train_set)} examples); use a batch size of at most {len(train_set)}"
        )
    if args.batch_size % size:
        raise ValueError(f"batch_size={args.batch_size} must be divisible by the {size} processes")
    per_epoch = len(train_set) // args.batch_size
    iters = (
        args.iters if args.epochs is None else max(args.epochs * per_epoch // args.grad_accumulation_steps, 1)
    )
    if not tree_flatten(model.trainable_parameters()):
        raise ValueError("train: the model has no trainable parameters; call apply_lora(model, ...) first")
    if optimizer is None:
        schedule = build_schedule(
            args.lr_schedule, args.learning_rate, iters, args.warmup, args.min_learning_rate
        )
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
        changed = [
            f"{k} {meta['args'].get(k)!r} -> {getattr(args, k)!r}"
            for k in _TRAJECTORY_KEYS
            if meta["args"].get(k) != getattr(args, k)
        ]
        if changed and main:
            warnings.warn(
                f"resuming {src} with changed settings ({'; '.join(changed)}): "
                "the run will not reproduce the original trajectory",
                stacklevel=2,
            )
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
        meta = dict(
            step=at_step,
            micro_batches=micro,
            trained_tokens=trained_tokens,
            best_val_loss=hist.best_val_loss,
            best_step=hist.best_step,
            evals_without_improvement=bad_evals,
            world_size=size,
            args=asdict(args),
        )
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
        msg += (
            f" Lower the learning rate (now {args.learning_rate:g}), set grad_clip, "
            f"or check the data near micro-batch {micro}."
        )
        hist.stop_reason = "diverged"
        err = TrainingDivergedError(msg)
        err.history = hist
        raise err

    def run_eval(at_step: int) -> bool:
        """Validate; returns True when early stopping should end the run."""
        nonlocal bad_evals, best_params
        tic = time.perf_counter()
        val_loss, ppl = evaluate(
            model, val_set, args.batch_size, args.val_batches, args.max_seq_length, loss_fn
        )
        if hist.best_val_loss is None or val_loss < hist.best_val_loss:
            hist.best_val_loss, hist.best_step, bad_evals = val_loss, at_step, 0
            if args.early_stopping_patience is not None:
                best_params = ckpt.trainable_arrays(model)  # arrays are immutable: no copy needed
                if main:
                    (out / "best").mkdir(exist_ok=True)
                    ckpt.save_adapter_files(model, out / "best", adapter_config)
        else:
            bad_evals += 1
        info = dict(
            step=at_step,
            val_loss=val_loss,
            val_perplexity=ppl,
            val_time=time.perf_counter() - tic,
            best_val_loss=hist.best_val_loss,
            best_step=hist.best_step,
        )
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

    bar = (
        tqdm(total=iters, initial=step, desc="train", unit="step", disable=not (progress and main))
        if progress and main
        else None
    )
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
                info = dict(
                    step=step,
                    epoch=micro / per_epoch,
                    train_loss=window["loss"] / max(window["toks"], 1),
                    learning_rate=optimizer.learning_rate.item(),
                    iterations_per_second=window["steps"] / secs,
                    tokens_per_second=window["toks"] / secs,
                    trained_tokens=trained_tokens,
                    peak_memory_gb=mx.get_peak_memory() / 1e9,
                    grad_norm=gnorm_f,
                )
                hist.reports.append(info)
                if bar is not None:
                    bar.set_postfix(loss=f"{info['train_loss']:.3f}")
                say(
                    f"step {step}: train loss {info['train_loss']:.4f}, lr {info['learning_rate']:.2e}, "
                    f"{info['iterations_per_second']:.2f} it/s, {info['tokens_per_second']:.0f} tok/s, "
                    f"peak mem {info['peak_memory_gb']:.3f} GB"
                )
                if main:
                    _call(callbacks, "on_report", info)
                window = dict(loss=0.0, toks=0.0, steps=0, time=0.0)
            if (
                val_set is not None
                and args.steps_per_eval
                and (step % args.steps_per_eval == 0 or step == iters)
            ):
                if run_eval(step):
                    hist.stop_reason = "early stopping"
                    say(
                        f"early stopping at step {step}: no better val loss than "
                        f"{hist.best_val_loss:.4f} (step {hist.best_step}) for {bad_evals} evals"
                    )
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
