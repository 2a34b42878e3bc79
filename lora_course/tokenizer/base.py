"""What every tokenizer shares: its error type, safe reads, and chat templates rendered safely.

A chat template is Jinja code written by a checkpoint's author and shipped beside its
weights (``chat_template.jinja`` or ``tokenizer_config.json``). It is untrusted, so it
renders in Jinja's ``ImmutableSandboxedEnvironment`` within ``limits.TEMPLATE_SECONDS``
and ``limits.TEMPLATE_CHARS`` of output. Tokenizer files are read only when they are
regular files of bounded size (``safe_io``). Taught in notebook 04.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from pathlib import Path

from lora_course import safe_io
from lora_course.limits import MAX_TOKENIZER_BYTES, TEMPLATE_CHARS, TEMPLATE_SECONDS

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used; the message names the file."""


def read_file(path: Path) -> bytes:
    """A tokenizer file's bytes: a regular file of bounded size (never /dev/zero or a FIFO)."""
    try:
        return safe_io.read_bytes(path, MAX_TOKENIZER_BYTES)
    except safe_io.InputError as e:
        raise TokenizerError(str(e)) from None


def read_json_object(path: Path) -> dict:
    """A JSON object from ``path`` (bounded, depth-capped), or {} if the file is absent."""
    if not path.exists():
        return {}
    try:
        return safe_io.read_json_object(path)
    except safe_io.InputError as e:
        raise TokenizerError(str(e)) from None


def read_chat_template(folder: Path) -> str | None:
    """A chat template stored beside the model: chat_template.jinja or tokenizer_config.json
    (a string, or named templates ``[{"name", "template"}]`` of which "default" is used)."""
    jinja, config = folder / "chat_template.jinja", folder / "tokenizer_config.json"
    try:
        if jinja.exists():
            return safe_io.read_text(jinja)
    except safe_io.InputError as e:
        raise TokenizerError(str(e)) from None
    template = read_json_object(config).get("chat_template")
    if isinstance(template, list):
        if not all(isinstance(t, dict) and isinstance(t.get("template"), str) for t in template):
            raise TokenizerError(
                f"{config}: key 'chat_template' must be a string or a list of {{'name', 'template'}} objects"
            )
        template = {t.get("name"): t["template"] for t in template}.get("default")
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{config}: key 'chat_template' must be a string, got {type(template).__name__}")
    return template


class _Bounded(ImmutableSandboxedEnvironment):
    # "x" * 10**9 or 10 ** 10**6 would take the memory or the time in one step
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(right, int) and abs(right) > 64:
            raise TokenizerError(f"chat template: exponent {right} is too large")
        if operator == "*" and any(isinstance(x, int) and abs(x) > TEMPLATE_CHARS for x in (left, right)):
            raise TokenizerError("chat template: repeats something too many times")
        return super().call_binop(context, operator, left, right)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson keeps non-ASCII text as it is (Jinja's own escapes it)
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def render_chat_template(template: str, source: str = "chat template", **variables) -> str:
    """Render a Jinja chat template in a sandbox with bounded time and output.

    The environment is the one Hugging Face's ``apply_chat_template`` documents:
    ``trim_blocks``/``lstrip_blocks``, ``break`` and ``continue``, ``raise_exception``,
    ``strftime_now`` and a ``tojson`` that keeps non-ASCII text. Any failure (a Jinja
    error, ``raise_exception``, a limit, an error inside the template's own code) is one
    ``TokenizerError`` line naming ``source``.
    """

    def raise_exception(message):
        raise TokenizerError(f"{source}: chat template: {message}")

    env = _Bounded(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    deadline = time.monotonic() + TEMPLATE_SECONDS

    # Jinja compiles a template to Python code named "<template>". A line tracer on those
    # frames alone is the one hook that sees every loop iteration, even of an empty loop.
    def trace(frame, event, arg):
        if frame.f_code.co_filename != "<template>":
            return None
        if time.monotonic() > deadline:
            raise TokenizerError(f"{source}: chat template ran longer than {TEMPLATE_SECONDS:g} s")
        return trace

    previous, chunks, size = sys.gettrace(), [], 0
    try:
        compiled = env.from_string(template)
        sys.settrace(trace)
        for chunk in compiled.generate(**variables):
            chunks.append(chunk)
            size += len(chunk)
            if size > TEMPLATE_CHARS:
                raise TokenizerError(f"{source}: chat template wrote more than {TEMPLATE_CHARS:,} characters")
    except TemplateError as e:
        where = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
        raise TokenizerError(f"{source}: chat template{where}: {e.message or type(e).__name__}") from None
    except TokenizerError as e:
        msg = str(e)
        raise TokenizerError(msg if msg.startswith(source) else f"{source}: {msg}") from None
    except Exception as e:  # noqa: BLE001  (TypeError, RecursionError ... from the template's code)
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise TokenizerError(f"{source}: chat template failed ({type(e).__name__}: {reason})") from None
    finally:
        sys.settrace(previous)
    return "".join(chunks)
