"""Small helpers for the course notebooks.

``show(obj)`` renders the real source of a lora_course function or class, so a
notebook never keeps a second copy of library code (a lesson from courses whose
notebook copies drifted from their package). ``render_source(obj)`` is the text it
displays; tests/test_listings.py re-renders every listing a notebook saved with it,
so a stale listing fails. ``versions()`` is every notebook's first cell.
"""

from __future__ import annotations

import inspect
import os
import platform
from pathlib import Path

from lora_course import blas
from lora_course.version import __version__

PACKAGE = Path(__file__).resolve().parent


def source_header(obj) -> str:
    """The listing's header: "`lora_course/<path>` — `<qualname>`" (no machine path in it)."""
    where = Path(inspect.getsourcefile(obj)).resolve().relative_to(PACKAGE).as_posix()
    name = getattr(obj, "__qualname__", getattr(obj, "__name__", "source"))
    return f"`lora_course/{where}` — `{name}`"


def render_source(obj) -> str:
    """The Markdown ``show`` displays: the header, then the source in a python code block."""
    return f"{source_header(obj)}\n```python\n{inspect.getsource(obj)}```"


def show(obj) -> None:
    """Display the source of ``obj`` as a highlighted code block (plain text outside Jupyter)."""
    try:
        from IPython.display import Markdown, display
    except ImportError:
        print(inspect.getsource(obj))
        return
    display(Markdown(render_source(obj)))


def versions() -> None:
    """Print the versions that matter for reproducing a notebook's outputs.

    The BLAS is printed by file name only: its folder is a path on the machine that
    ran the notebook, which means nothing to a reader.
    """

    import mlx.core as mx
    import numpy as np

    print(
        f"python {platform.python_version()} | lora_course {__version__} | "
        f"mlx {mx.__version__} | numpy {np.__version__}"
    )
    used, loaded = blas.blas_in_use(), blas.STATE["loaded"]
    if loaded:  # "MKL: /…/lib/libmkl_rt.so.2" -> "MKL: libmkl_rt.so.2"
        used = used.replace(loaded, os.path.basename(loaded))
    print(f"device: {mx.default_device()} | blas: {used}")
