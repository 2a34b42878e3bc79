"""Optimizers chosen by name, their extra settings checked, and LoRA+.

Every update rule is ``mlx.optimizers``' own; this module only maps a name to a class
and checks the settings before a run starts:

    sgd       Robbins & Monro (1951); momentum and Nesterov in optimizer_config
    rmsprop   Tieleman & Hinton (2012)
    adagrad   Duchi, Hazan & Singer (2011)
    adadelta  Zeiler (2012); its learning rate multiplies an already scaled step, ~1.0
    adam      Kingma & Ba (2015)
    adamw     Loshchilov & Hutter (2019): Adam with decoupled weight decay
    adamax    Kingma & Ba (2015), the infinity-norm variant of Adam
    lion      Chen et al. (2023): the sign of a momentum; use ~3-10x smaller rates than Adam
    adafactor Shazeer & Stern (2018): factored second moments
    muon      Jordan et al. (2024): momentum, orthogonalized by Newton-Schulz for matrices

``weight_decay`` goes to the optimizers that have it (sgd, adamw, lion, adafactor, muon);
asking another one for weight decay is an error rather than a silent no-op. Anything
else an optimizer takes (``betas``, ``eps``, ``momentum``, ...) goes in ``optimizer_config``,
checked against the class's own signature.

LoRA+ (Hayou, Ghosh & Yu, 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models")
gives B a learning rate ``ratio`` times A's: ``B`` starts at zero and must move further.
It is two optimizers of the same kind, one for every ``lora_b`` and one for the rest,
joined by ``mlx.optimizers.MultiOptimizer``. Taught in notebook 10.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import mlx.core as mx
import mlx.optimizers as optim

OPTIMIZERS = {
    "sgd": optim.SGD,
    "rmsprop": optim.RMSprop,
    "adagrad": optim.Adagrad,
    "adadelta": optim.AdaDelta,
    "adam": optim.Adam,
    "adamw": optim.AdamW,
    "adamax": optim.Adamax,
    "lion": optim.Lion,
    "adafactor": optim.Adafactor,
    "muon": optim.Muon,
}
# Our schedule drives Adafactor's step size, so its own relative step and scaling are off.
DEFAULTS = {"adafactor": {"relative_step": False, "scale_parameter": False}}


def _settable(name: str) -> list[str]:
    """The keyword arguments of optimizer ``name`` besides learning_rate and weight_decay."""
    params = inspect.signature(OPTIMIZERS[name].__init__).parameters
    return [p for p in params if p not in ("self", "learning_rate", "weight_decay")]


def has_weight_decay(name: str) -> bool:
    return "weight_decay" in inspect.signature(OPTIMIZERS[name].__init__).parameters


def check_optimizer_settings(name: str, weight_decay: float, config: dict | None) -> None:
    """Raise a ValueError naming the problem if ``name`` cannot take these settings."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer: unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if weight_decay and not has_weight_decay(name):
        with_wd = [n for n in OPTIMIZERS if has_weight_decay(n)]
        raise ValueError(
            f"weight_decay={weight_decay}: {name} has no weight decay; set it to 0 or choose one of "
            f"{', '.join(with_wd)}"
        )
    for key, value in (config or {}).items():
        if key not in _settable(name):
            raise ValueError(
                f"optimizer_config: {name} has no setting {key!r}; it takes {', '.join(_settable(name))}"
                + (" (weight_decay is its own option)" if key == "weight_decay" else "")
            )
        numbers = value if isinstance(value, (list, tuple)) else [value]
        if not all(isinstance(v, (int, float, bool)) or v is None for v in numbers):
            raise ValueError(
                f"optimizer_config: {key}={value!r} must be a number, true/false or a list of numbers"
            )


def _one(name: str, learning_rate, weight_decay: float, config: dict | None) -> optim.Optimizer:
    kwargs = {**DEFAULTS.get(name, {}), **(config or {})}
    if has_weight_decay(name):
        kwargs["weight_decay"] = weight_decay  # mlx's AdamW/Muon default 0.01; ours is explicit
    return OPTIMIZERS[name](learning_rate=learning_rate, **kwargs)


def is_lora_b(path: str, _=None) -> bool:
    """True for the B matrix of a LoRA/DoRA layer (path such as ``model.layers.0.mlp.up_proj.lora_b``)."""
    return path.rsplit(".", 1)[-1] == "lora_b"


def scaled(learning_rate: float | Callable, ratio: float) -> float | Callable:
    """``ratio`` times a learning rate or a schedule."""
    if callable(learning_rate):
        return lambda step: ratio * learning_rate(step)
    return ratio * learning_rate


def build_optimizer(
    name: str,
    learning_rate: float | Callable[[mx.array], mx.array],
    weight_decay: float = 0.0,
    config: dict | None = None,
    lora_plus_ratio: float | None = None,
) -> optim.Optimizer:
    """An ``mlx.optimizers`` optimizer by name; ``learning_rate`` may be a schedule.

    With ``lora_plus_ratio`` every ``lora_b`` learns at ``ratio x learning_rate`` (LoRA+);
    the result's ``learning_rate`` is the base (A's) rate.
    """
    check_optimizer_settings(name, weight_decay, config)
    base = _one(name, learning_rate, weight_decay, config)
    if lora_plus_ratio is None:
        return base
    if not lora_plus_ratio > 0:
        raise ValueError(f"lora_plus_ratio={lora_plus_ratio!r} must be positive (or None: off)")
    fast = _one(name, scaled(learning_rate, lora_plus_ratio), weight_decay, config)
    # MultiOptimizer's last optimizer takes what no filter claimed; its learning_rate is the first's.
    return optim.MultiOptimizer([base, fast], [lambda path, g: not is_lora_b(path)])
