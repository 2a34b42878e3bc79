"""What every tokenizer shares: its error type, and chat templates read and rendered safely.

A chat template is Jinja code written by a checkpoint's author and shipped beside its
weights (``chat_template.jinja`` or ``tokenizer_config.json``). It is untrusted, so it
renders in Jinja's sandbox with bounded time and output. Taught in notebook 04.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used; the message names the file."""


def read_chat_template(folder: Path) -> str | None:
    """A chat template stored beside the model: chat_template.jinja or tokenizer_config.json."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        try:
            template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        except (ValueError, AttributeError) as e:
            raise TokenizerError(f"{config}: not a JSON object ({e})") from None
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        return template if isinstance(template, str) else None
    return None


# Bounds on one chat-template rendering: a template is code from the checkpoint's author.
TEMPLATE_SECONDS = 1.0


TEMPLATE_CHARS = 16_000_000


def render_chat_template(template: str, source: str, **variables) -> str:
    """Render a Jinja chat template in a sandbox with bounded time and output.

    The environment is the one Hugging Face's ``apply_chat_template`` documents: an
    ``ImmutableSandboxedEnvironment`` with ``trim_blocks``/``lstrip_blocks``, ``break`` and
    ``continue``, ``raise_exception``, ``strftime_now`` and a ``tojson`` that keeps
    non-ASCII text. Any failure is one ``TokenizerError`` line naming ``source``.
    """

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, int) and abs(right) > 64:
                raise TokenizerError(f"{source}: chat template: exponent {right} is too large")
            if operator == "*" and any(isinstance(x, int) and abs(x) > TEMPLATE_CHARS for x in (left, right)):
                raise TokenizerError(f"{source}: chat template: repeats something too many times")
            return super().call_binop(context, operator, left, right)

    def raise_exception(message):
        raise TokenizerError(f"{source}: chat template: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = Bounded(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
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
                raise TokenizerError(f"{source}: chat template wrote more than {TEMPLATE_CHARS} characters")
    except TemplateError as e:
        where = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
        raise TokenizerError(f"{source}: chat template{where}: {e.message or type(e).__name__}") from None
    finally:
        sys.settrace(previous)
    return "".join(chunks)


def read_json_object(path: Path) -> dict:
    """A JSON object from ``path``, or {} if the file is absent."""
    if not path.is_file():
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj
