"""Small helpers for the course notebooks.

``show(obj)`` renders the real source of a lora_course function or class, so a
notebook never keeps a second copy of library code (a lesson from courses whose
notebook copies drifted from their package). ``versions()`` is every notebook's
first cell.
"""

from __future__ import annotations

import inspect
import platform

from lora_course import blas
from lora_course.version import __version__


def show(obj) -> None:
    """Display the source of ``obj`` as a highlighted code block (plain text outside Jupyter)."""
    source = inspect.getsource(obj)
    where = f"{inspect.getsourcefile(obj).split('lora_course')[-1].lstrip('/')}"
    name = getattr(obj, "__qualname__", getattr(obj, "__name__", "source"))
    try:
        from IPython.display import Markdown, display

        display(Markdown(f"`lora_course/{where}` — `{name}`\n```python\n{source}```"))
    except ImportError:
        print(source)


def versions() -> None:
    """Print the versions that matter for reproducing a notebook's outputs."""

    import mlx.core as mx
    import numpy as np

    print(
        f"python {platform.python_version()} | lora_course {__version__} | "
        f"mlx {mx.__version__} | numpy {np.__version__}"
    )
    print(f"device: {mx.default_device()} | blas: {blas.blas_in_use()}")
