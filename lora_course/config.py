"""Configuration dictionaries checked against a dataclass: unknown keys and wrong types.

A YAML file or a keyword argument that misspells an option should fail at once,
naming the key, instead of being ignored for a whole training run. ``checked_fields``
does that for any dataclass (``TrainingArgs``, ``FineTuneConfig``), using the field
annotations as the schema. Used by notebook 10 and the ``lora-course train`` CLI.
"""

from __future__ import annotations

import difflib
import math
import reprlib
import types
import typing
from dataclasses import fields
from typing import Any


def checked_fields(
    cls, config: dict[str, Any], source: str = "config", strict: bool = True
) -> dict[str, Any]:
    """``config``'s entries, each checked (and, for floats, converted) against ``cls``'s fields."""
    if not isinstance(config, dict):
        raise ConfigError(
            f"{source}: expected a mapping of option names to values, got {type(config).__name__}"
        )
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    kwargs = {}
    for key, value in config.items():
        name = str(key).replace("-", "_")
        if name not in known:
            if not strict:
                continue
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{source}: unknown key {reprlib.repr(key)[:60]}{hint}", key=key)
        kwargs[name] = _coerce(value, hints[name], f"{source}: key {reprlib.repr(key)}", key)
    return kwargs


class ConfigError(ValueError):
    """A configuration key that is unknown or has the wrong type; ``.key`` names it."""

    def __init__(self, message: str, key=None):
        super().__init__(message)
        self.key = key


def _type_name(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(typing.get_args(hint)[0]).split(' ', 1)[-1]}s"
    names = {
        int: "an integer",
        float: "a finite number",
        str: "a string",
        bool: "true/false",
        type(None): "null",
        dict: "a mapping",
    }
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _coerce(value, hint, where: str, key):
    """``value`` checked against the type ``hint`` (a float field also takes an int, and
    a string such as "1e-5", which YAML 1.1 does not read as a number)."""
    origin, arms = typing.get_origin(hint), typing.get_args(hint)
    ok, out = False, value
    if origin in (typing.Union, types.UnionType):
        for arm in arms:
            try:
                return _coerce(value, arm, where, key)
            except ConfigError:
                pass
    elif hint is type(None):
        ok = value is None
    elif hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:  # finite only: NaN or inf in a setting is never meant
        try:
            if isinstance(value, (int, float, str)) and not isinstance(value, bool):
                out = float(value)
                ok = math.isfinite(out)
        except (ValueError, OverflowError):
            pass
    elif hint is str:
        ok = isinstance(value, str)
    elif origin is list:
        if isinstance(value, (list, tuple)):
            ok, out = True, [_coerce(v, arms[0], where, key) for v in value]
    elif hint is dict or origin is dict:
        ok = isinstance(value, dict)
    if not ok:
        got = "null" if value is None else type(value).__name__
        shown = reprlib.repr(value)[:60]  # bounded work and length, whatever the value
        raise ConfigError(f"{where} must be {_type_name(hint)}, got {got} {shown}", key=key)
    return out
