"""Chat templates: read from beside a model and rendered in a sandbox with bounded work.

A chat template is Jinja code written by a checkpoint's author (``chat_template.jinja``
or the ``chat_template`` of ``tokenizer_config.json``). It is untrusted: it renders in
Jinja's ``ImmutableSandboxedEnvironment`` (no attribute tricks, no mutation), within
``limits.TEMPLATE_SECONDS`` and ``limits.TEMPLATE_CHARS`` of output. Taught in notebook 04.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lora_course.limits import MAX_TOKENIZER_BYTES, TEMPLATE_CHARS, TEMPLATE_SECONDS
from lora_course.safe_io import InputError, read_bytes, read_json_object, read_text


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used; the message names the file."""


def read_file(path: Path) -> bytes:
    """A tokenizer file's bytes: a regular file of bounded size (never /dev/zero or a FIFO)."""
    try:
        return read_bytes(path, MAX_TOKENIZER_BYTES)
    except InputError as e:
        raise TokenizerError(str(e)) from None


def read_chat_template(folder: Path) -> str | None:
    """A chat template stored beside the model: chat_template.jinja or tokenizer_config.json."""
    jinja, config = folder / "chat_template.jinja", folder / "tokenizer_config.json"
    try:
        if jinja.exists():
            return read_text(jinja)
        if not config.exists():
            return None
        template = read_json_object(config).get("chat_template")
    except InputError as e:
        raise TokenizerError(str(e)) from None
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class _Bounded(ImmutableSandboxedEnvironment):
    # "x" * 10**9 or 10 ** 10**6 would take the memory or the time in one step
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(right, int) and abs(right) > 64:
            raise TokenizerError(f"chat template: exponent {right} is too large")
        if operator == "*" and any(isinstance(x, int) and abs(x) > TEMPLATE_CHARS for x in (left, right)):
            raise TokenizerError("chat template: repeats something too many times")
        return super().call_binop(context, operator, left, right)


def render_chat_template(template: str, source: str = "chat template", **variables) -> str:
    """Render ``template`` with ``variables`` in the sandbox; bounded in time and output.

    Any failure (a Jinja error, ``raise_exception``, a limit) is one ``TokenizerError``.
    """

    def raise_exception(message):
        raise TokenizerError(f"{source}: chat template: {message}")

    env = _Bounded(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    deadline = time.monotonic() + TEMPLATE_SECONDS

    # Jinja compiles a template to Python code named "<template>". A line tracer on those
    # frames alone sees every loop iteration, even of a loop that writes nothing.
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
