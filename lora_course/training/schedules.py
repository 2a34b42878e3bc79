"""Learning-rate schedules with warmup (the optimizers by name are in ``optimizers.py``).

Thin: the curves are ``mlx.optimizers``' own (``linear_schedule``, ``cosine_decay``,
``join_schedules``). What this module adds is the recipe the trainer uses:

    warmup (linear, 0 -> lr over ``warmup`` steps)  then  one of
      constant:  lr
      linear:    lr -> min_lr, straight line over the remaining steps
      cosine:    min_lr + (lr - min_lr) * (1 + cos(pi * t / T)) / 2   (Loshchilov & Hutter, 2017)

Notebook 10 plots every schedule.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.optimizers as optim

SCHEDULES = ("constant", "linear", "cosine")


def build_schedule(
    name: str, learning_rate: float, total_steps: int, warmup: int = 0, min_lr: float = 0.0
) -> Callable[[mx.array], mx.array]:
    """The learning rate as a function of the optimizer step (0-based), warmup included."""
    if name not in SCHEDULES:
        raise ValueError(f"lr_schedule: unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    if warmup < 0 or warmup > total_steps:
        raise ValueError(f"warmup={warmup} must be between 0 and the number of steps ({total_steps})")
    decay_steps = max(total_steps - warmup, 1)
    if name == "constant":
        main = lambda step: mx.array(learning_rate, dtype=mx.float32)  # noqa: E731
    elif name == "linear":
        main = optim.linear_schedule(learning_rate, min_lr, decay_steps)
    else:
        main = optim.cosine_decay(learning_rate, decay_steps, min_lr)
    if warmup == 0:
        return main
    # Step 0 of warmup has lr 0: the first update only initializes the optimizer's moments.
    ramp = optim.linear_schedule(0.0, learning_rate, warmup)
    return optim.join_schedules([ramp, main], [warmup])
