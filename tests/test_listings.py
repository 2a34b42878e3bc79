"""Every library listing a notebook shows is the library's current source.

``show(obj)`` saves Markdown in the executed notebook: a header
"`lora_course/<path>.py` — `<qualname>`" and the source in a python code block. When
the library changes and the notebook is not re-executed, that listing goes stale and the
book shows code that no longer exists. This test reads the saved listings (without
executing anything), resolves each object from its header and re-renders it with the
same ``render_source`` that ``show`` uses.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

from lora_course.notebook import render_source

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEADER = re.compile(r"^`lora_course/(?P<path>[\w/]+)\.py` — `(?P<qualname>[\w.]+)`\n```python\n")


def saved_listings(notebook: Path):
    """(cell number, Markdown text) of every show() output saved in ``notebook``."""
    cells = json.loads(notebook.read_text())["cells"]
    for number, cell in enumerate(cells):
        for output in cell.get("outputs", []):
            text = output.get("data", {}).get("text/markdown")
            if text is not None:
                text = "".join(text) if isinstance(text, list) else text
                if text.startswith("`lora_course/"):
                    yield number, text


def resolve(path: str, qualname: str):
    """The object named by a listing's header: its module from the path, then the qualname."""
    module = "lora_course." + path.replace("/", ".").removesuffix(".__init__")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]*_*.ipynb"))  # 03a_... too


def test_notebooks_have_listings():
    found = sum(1 for nb in NOTEBOOKS for _ in saved_listings(nb))
    assert found >= 10, f"expected the notebooks to show library code, found {found} listings"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_listings_are_current(notebook):
    stale = []
    for number, text in saved_listings(notebook):
        header = HEADER.match(text)
        assert header, f"{notebook.name} cell {number}: a listing without the show() header: {text[:80]!r}"
        try:
            obj = resolve(header["path"], header["qualname"])
        except (ImportError, AttributeError) as error:
            stale.append(
                f"cell {number}: {header['path']}.py {header['qualname']} no longer exists ({error})"
            )
            continue
        if render_source(obj) != text:
            stale.append(f"cell {number}: {header['path']}.py {header['qualname']} changed since it ran")
    assert not stale, (
        f"{notebook.name} shows stale library code; re-execute it "
        f"(jupyter nbconvert --execute --inplace --ExecutePreprocessor.store_widget_state=True):\n  "
        + "\n  ".join(stale)
    )
