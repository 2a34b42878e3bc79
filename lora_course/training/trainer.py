"""The training loop, ``train`` (the loss is in evaluate.py, batches come from data/batching.py).

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
from collections.abc import Callable

from lora_course.data.batching import iterate_batches
from lora_course.training import resume as ckpt
from lora_course.training.args import TrainingArgs
from lora_course.training.chunked_loss import default_loss
from lora_course.training.losses import distillation_loss
from lora_course.training.optimizers import build_optimizer
from lora_course.training.run import Run, TrainingHistory, count_iterations
from lora_course.training.schedules import build_schedule
from lora_course.training.step import enable_grad_checkpoint, make_step
from lora_course.tree import tree_unflatten

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from tqdm.auto import tqdm


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


def train(
    model: nn.Module,
    train_set,
    val_set=None,
    args: TrainingArgs | dict | None = None,
    *,
    optimizer=None,
    loss_fn: Callable | None = None,
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

    ``loss_fn(model, inputs, targets, mask) -> (loss, ntoks)`` is the objective (default:
    the cross-entropy, chunked over positions for a large vocabulary, see
    ``chunked_loss.py`` and ``args.loss_chunk_size``); with a
    ``teacher`` it becomes a distillation loss (``distill`` "kl" or "js", see training/losses.py).
    ``resume=True`` continues from ``args.adapter_path``'s training state (or from the
    directory given as ``resume``). ``adapter_config`` goes into ``adapter_config.json``.
    Under ``mlx.launch`` every process runs this with the same arguments; batches are
    split across processes and only rank 0 writes files or prints.
    """
    args = args if isinstance(args, TrainingArgs) else TrainingArgs.from_dict(args or {})
    if teacher is not None:
        loss_fn = distillation_loss(teacher, kind=distill, temperature=temperature)
    elif loss_fn is None:
        loss_fn = default_loss(model, args.loss_chunk_size)
    size = mx.distributed.init().size()
    iters, per_epoch = count_iterations(model, train_set, args, size)
    if optimizer is None:
        schedule = build_schedule(
            args.lr_schedule, args.learning_rate, iters, args.warmup, args.min_learning_rate
        )
        optimizer = build_optimizer(
            args.optimizer, schedule, args.weight_decay, args.optimizer_config, args.lora_plus_ratio
        )
    optimizer.init(model.trainable_parameters())

    run = Run(model, optimizer, args, val_set, loss_fn, list(callbacks or []), adapter_config, verbose)
    if run.main:
        ckpt.check_writable(run.out)
        ckpt.remove_stale_temporaries(run.out)
    if resume:
        run.resume(resume)
    hist = run.hist
    hist.start_step = hist.step = run.step

    model.train()
    undo_checkpointing = enable_grad_checkpoint(model) if args.grad_checkpoint else None
    accumulate, update = make_step(model, optimizer, loss_fn, args.grad_clip, size)
    state = [model.state, optimizer.state, mx.random.state]
    if args.compile:
        inputs = state + ([teacher.state] if teacher is not None else [])
        mx.eval(inputs)  # compile captures arrays; lazy, never-evaluated ones would break it
        accumulate = mx.compile(accumulate, inputs=inputs, outputs=state)
        update = mx.compile(update, inputs=inputs, outputs=state)

    if progress and run.main:
        run.bar = tqdm(total=iters, initial=run.step, desc="train", unit="step")
    hist.stop_reason = "nothing to do" if run.step >= iters else "finished"
    window = dict(loss=0.0, toks=0.0, steps=0, time=0.0)
    try:
        if run.last_good is None:  # from the first moment, adapter_path holds a complete checkpoint
            run.save_checkpoint()
        if run.step == 0 and val_set is not None and args.steps_per_eval:
            run.run_eval()
        batches = _batch_stream(train_set, args, run.micro, run.rank, size)
        while run.step < iters:
            tic = time.perf_counter()
            acc = None
            for k in range(args.grad_accumulation_steps):
                batch = next(batches)
                mx.random.seed(_micro_seed(args.seed, run.micro, run.rank))
                run.micro += 1
                if k + 1 < args.grad_accumulation_steps:
                    acc = accumulate(*batch, acc)
                    mx.eval(acc)
                else:
                    value, ntoks, gnorm = update(*batch, acc)
            mx.eval(state, value, ntoks, gnorm)
            run.step += 1
            loss_f, ntoks_f, gnorm_f = value.item(), ntoks.item(), gnorm.item()
            window["time"] += time.perf_counter() - tic
            if not (math.isfinite(loss_f) and math.isfinite(gnorm_f)):
                run.diverged(f"the loss is {loss_f} and the gradient norm {gnorm_f}")
            hist.losses.append(loss_f)
            hist.step = run.step
            run.trained_tokens += int(ntoks_f)
            window["loss"] += loss_f * ntoks_f
            window["toks"] += ntoks_f
            window["steps"] += 1
            if run.bar is not None:
                run.bar.update(1)
            if run.step % args.steps_per_report == 0 or run.step == iters:
                run.report(window, per_epoch, gnorm_f)
                window = dict(loss=0.0, toks=0.0, steps=0, time=0.0)
            evaluate_now = args.steps_per_eval and (run.step % args.steps_per_eval == 0 or run.step == iters)
            if val_set is not None and evaluate_now and run.run_eval():
                hist.stop_reason = "early stopping"
                run.say(
                    f"early stopping at step {run.step}: no better val loss than "
                    f"{hist.best_val_loss:.4f} (step {hist.best_step}) for {run.bad_evals} evals"
                )
                break
            if args.save_every and run.step % args.save_every == 0:
                run.save_checkpoint()
    finally:
        if run.bar is not None:
            run.bar.close()
        if undo_checkpointing is not None:
            undo_checkpointing()

    if run.last_good != run.step:
        run.save_checkpoint()
    if run.best_params is not None and hist.best_step != run.step:
        # With early stopping the result is the best validated adapter, not the last one.
        model.update(tree_unflatten(list(run.best_params.items())))
        if run.main:
            ckpt.save_adapter_files(model, run.out, adapter_config)
    return hist
