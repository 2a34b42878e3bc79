"""Crash-safe training checkpoints: the state needed for exact resume, saved atomically.

A file is never written in place. Through ``lora_course.atomic`` it goes to a
temporary name in the same directory, is flushed to disk (``fsync``), and is then
renamed over the old one with ``os.replace``, which POSIX makes atomic. A run killed
at any instant (even by SIGKILL) leaves either the old file or the new one, never
half of one.

Exact resume needs everything the next step depends on, in ONE file so that it
cannot be torn: ``training_state.safetensors`` holds the trainable parameters, the
optimizer state (moments, step count) and, in its metadata, the step, how many
micro-batches were consumed (which fixes the data order position) and the
early-stopping bookkeeping. Randomness needs no saved state: the trainer reseeds
from (seed, micro-batch index) before every micro-batch and the data order is a
pure function of (seed, epoch). Taught in notebook 10.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

from lora_course.adapters.files import save_adapters
from lora_course.adapters.format import ADAPTER_WEIGHTS
from lora_course.atomic import (
    remove_stale_temporaries,  # noqa: F401  (the trainer calls it from here)
    temp_path,
)
from lora_course.atomic import (
    save_safetensors as atomic_save_safetensors,  # this module's writes: one name
)
from lora_course.limits import is_int, is_number
from lora_course.safe_io import InputError, check_safetensors
from lora_course.tree import tree_flatten, tree_unflatten

import mlx.core as mx
import mlx.nn as nn

STATE_FILE = "training_state.safetensors"
_STATE_KEY = "lora_course_training_state"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the previous one is left untouched."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.errno = code


def check_writable(directory) -> Path:
    """Create ``directory`` if needed and prove we can write there, before any training."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = temp_path(directory / "write-probe")
        try:
            with open(probe, "wb") as f:
                f.write(b"ok")
        finally:  # a full disk creates the file, then fails the write: leave nothing behind
            probe.unlink(missing_ok=True)
    except OSError as e:
        raise CheckpointWriteError(
            f"adapter path {str(directory)!r} is not writable ({e.strerror or e}); "
            "choose another --adapter-path or fix its permissions",
            e.errno,
        ) from e
    return directory


def describe_write_error(e: Exception, directory, step: int, last_good: int | None) -> CheckpointWriteError:
    """Turn a failed save into one line saying where, why, and what survived."""
    code = getattr(e, "errno", None)
    why = getattr(e, "strerror", None) or str(e)
    if code == errno.ENOSPC or "No space left" in why:
        hint = "free some disk space or choose another --adapter-path"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS) or "ermission denied" in why or "Read-only" in why:
        hint = "the directory is read-only; choose another --adapter-path"
    else:
        hint = "check the disk and the --adapter-path"
    kept = (
        f"the previous checkpoint (step {last_good}) is intact"
        if last_good is not None
        else "no earlier checkpoint existed"
    )
    return CheckpointWriteError(
        f"could not write the step-{step} checkpoint to {str(directory)!r}: {why}; {kept}; {hint}", code
    )


# ----------------------------------------------------------------------------- training state


def trainable_arrays(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def save_training_state(directory, model: nn.Module, optimizer, meta: dict[str, Any], best=None) -> None:
    """Parameters + optimizer state + ``meta`` (JSON) in one atomic safetensors file.
    ``best`` (name -> array) holds the best-validated parameters for early stopping."""
    arrays = {f"params.{k}": v for k, v in trainable_arrays(model).items()}
    arrays.update({f"optimizer.{k}": v for k, v in tree_flatten(optimizer.state)})
    arrays.update({f"best.{k}": v for k, v in (best or {}).items()})
    atomic_save_safetensors(Path(directory) / STATE_FILE, arrays, {_STATE_KEY: json.dumps(meta)})


def load_training_state(directory):
    """Read ``training_state.safetensors`` -> (params, optimizer state tree, meta, best params)."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"nothing to resume: {str(path)!r} does not exist (a run writes it at every checkpoint)"
        )
    try:
        check_safetensors(path)
        arrays, metadata = mx.load(str(path), return_metadata=True)
        meta = json.loads(metadata[_STATE_KEY])
    except InputError as e:
        raise ValueError(str(e)) from None
    except (RuntimeError, ValueError, KeyError, RecursionError) as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a lora_course training state ({reason})") from None
    check_state(path, arrays, meta)
    params = {k[len("params.") :]: v for k, v in arrays.items() if k.startswith("params.")}
    opt = tree_unflatten(
        [(k[len("optimizer.") :], v) for k, v in arrays.items() if k.startswith("optimizer.")]
    )
    best = {k[len("best.") :]: v for k, v in arrays.items() if k.startswith("best.")}
    return params, opt, meta, best


# What the trainer reads back from the metadata, and what each must hold.
META_KEYS = {
    "step": "count",
    "micro_batches": "count",
    "trained_tokens": "count",
    "evals_without_improvement": "count",
    "best_val_loss": "number or null",
    "best_step": "count or null",
    "args": "object",
}


def check_state(path, arrays: dict, meta) -> None:
    """A training state must be complete and sound: every metadata key, finite float tensors."""
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: the training-state metadata is not a JSON object")
    for key, kind in META_KEYS.items():
        value = meta.get(key)
        ok = {
            "count": is_int(value) and value >= 0,
            "number or null": value is None or is_number(value),
            "count or null": value is None or (is_int(value) and value >= 0),
            "object": isinstance(value, dict),
        }[kind]
        if key not in meta or not ok:
            got = "missing" if key not in meta else f"got {repr(value)[:60]}"
            raise ValueError(
                f"{path}: training-state key '{key}' must be a {kind} ({got}); the state is incomplete"
            )
    if not any(k.startswith("params.") for k in arrays):
        raise ValueError(f"{path}: the training state holds no parameters (params.*)")
    for name, value in arrays.items():
        if name.startswith(("params.", "best.")) and value.dtype not in (mx.float16, mx.bfloat16, mx.float32):
            raise ValueError(
                f"{path}: tensor '{name}' has dtype {str(value.dtype).split('.')[-1]}, not a float"
            )
        if mx.issubdtype(value.dtype, mx.floating) and not mx.all(mx.isfinite(value)).item():
            raise ValueError(f"{path}: tensor '{name}' holds NaN or inf; this state cannot be resumed")


def restore_training_state(model: nn.Module, optimizer, params: dict, opt_state: dict, where) -> None:
    """Load saved trainable parameters and optimizer state into a live model/optimizer."""
    current = trainable_arrays(model)
    missing = sorted(set(current) - set(params))
    extra = sorted(set(params) - set(current))
    if missing or extra:
        name = (missing or extra)[0]
        raise ValueError(
            f"{where}: the saved training state does not match the model's trainable parameters "
            f"({len(missing)} missing, {len(extra)} unexpected, e.g. {name!r}); "
            "resume with the same LoRA settings (rank, keys, num_layers, fine_tune_type)"
        )
    for k, v in params.items():
        if v.shape != current[k].shape:
            raise ValueError(
                f"{where}: tensor {k!r} has shape {tuple(v.shape)} but the model expects "
                f"{tuple(current[k].shape)}; resume with the same LoRA rank"
            )
    saved = dict(tree_flatten(opt_state))
    for k, v in tree_flatten(optimizer.state):  # every moment and counter the optimizer keeps
        if k not in saved:
            raise ValueError(
                f"{where}: the saved optimizer state lacks '{k}'; resuming without it would "
                "silently change the run (resume with the same optimizer, or start afresh)"
            )
        if saved[k].shape != v.shape:
            raise ValueError(
                f"{where}: optimizer state '{k}' has shape {tuple(saved[k].shape)}, expected {tuple(v.shape)}"
            )
    model.update(tree_unflatten(list(params.items())))
    # Merged in place: the saved tree lacks the empty entries of frozen modules, and a
    # compiled step that captured optimizer.state must see the new arrays.
    _merge(optimizer.state, opt_state)
    mx.eval(model.parameters(), optimizer.state)


def _merge(dst, src) -> None:
    for k, v in src.items() if isinstance(src, dict) else enumerate(src):
        if isinstance(v, (dict, list)) and isinstance(dst[k], (dict, list)):
            _merge(dst[k], v)
        else:
            dst[k] = v


# ----------------------------------------------------------------------------- adapters


def save_adapter_files(model: nn.Module, directory, config: dict | None) -> None:
    """The user-facing result: ``adapters.safetensors`` + ``adapter_config.json`` through
    ``lora_course.save_adapters`` (atomic per file). A model trained without
    ``apply_lora`` (parameters unfrozen by hand) gets the weights file only."""

    if getattr(model, "lora_config", None) is None:
        atomic_save_safetensors(Path(directory) / ADAPTER_WEIGHTS, trainable_arrays(model))
    else:
        save_adapters(model, directory, config)
