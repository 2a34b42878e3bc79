"""Walking an installed package: its public modules, imported, and their documented objects.

Both datasets the course builds from installed documentation start here: the Q/A
records of ``docstrings.py`` (the quickstart's fine-tuning data) and the plain-text
pretraining corpus of ``corpus.py``. What counts as public (no leading underscore),
how a module is imported without letting it print or crash the walk, and how a
docstring is cleaned are decided once, in this module. Taught in notebooks 09 and 12.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import pkgutil
import re
import types
import warnings


def is_public(name: str) -> bool:
    return not name.startswith("_")


def public(names) -> list[str]:
    """The public names among ``names``, sorted."""
    return sorted(n for n in names if isinstance(n, str) and is_public(n))


def import_quietly(name: str):
    """Import quietly; None when it fails (missing extras, other platforms)."""
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except BaseException:  # noqa: BLE001  (SystemExit and friends from odd modules too)
            return None


def walk_modules(package: str, failures: list[str]) -> list[types.ModuleType]:
    """The package and its public submodules, imported in sorted order."""
    try:
        root = importlib.import_module(package)
    except (Exception, SystemExit) as e:  # the package itself is not optional: say so
        raise ValueError(
            f"cannot import package {package!r} ({type(e).__name__}: {e}); "
            "is it installed in this environment?"
        ) from None
    modules, seen = [], set()

    def visit(module: types.ModuleType) -> None:
        if module.__name__ in seen:
            return
        seen.add(module.__name__)
        modules.append(module)
        children = {info.name for info in pkgutil.iter_modules(getattr(module, "__path__", []))}
        # compiled extensions keep submodules as attributes (mlx.core.random)
        children |= {
            name
            for name, value in vars(module).items()
            if isinstance(value, types.ModuleType) and value.__name__ == f"{module.__name__}.{name}"
        }
        for child in sorted(filter(is_public, children)):
            full = f"{module.__name__}.{child}"
            try:
                sub = importlib.import_module(full)
            except (Exception, SystemExit):  # a missing optional dependency, a broken module
                failures.append(full)
                continue
            visit(sub)

    visit(root)
    return modules


def documented(obj) -> bool:
    """Classes and functions (Python or compiled) defined somewhere we would name."""
    return isinstance(obj, type) or (
        callable(obj) and hasattr(obj, "__name__") and not isinstance(obj, types.ModuleType)
    )


def clean_docstring(doc) -> str:
    """Dedent, strip trailing spaces, keep at most one blank line between paragraphs."""
    if not isinstance(doc, str):
        return ""
    doc = inspect.cleandoc(doc)
    doc = "\n".join(line.rstrip() for line in doc.splitlines())
    return re.sub(r"\n{3,}", "\n\n", doc).strip()
