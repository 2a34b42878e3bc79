"""Consistency checks for the book in book/ that need no Jupyter Book and no browser.

The build itself and the rendered pages are tested in tests/test_browser.py.
"""

import fnmatch
import importlib
import re
from pathlib import Path

import lora_course  # noqa: F401  (preloads the BLAS before anything imports mlx.core)

import yaml

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"


def toc_entries(node, files, globs):
    """Collect `file:` and `glob:` entries from a nested _toc.yml structure."""
    if isinstance(node, dict):
        if "file" in node:
            files.append(node["file"])
        if "glob" in node:
            globs.append(node["glob"])
        for value in node.values():
            toc_entries(value, files, globs)
    elif isinstance(node, list):
        for item in node:
            toc_entries(item, files, globs)


def load_toc():
    toc = yaml.safe_load((BOOK / "_toc.yml").read_text())
    files, globs = [toc["root"]], []
    toc_entries(toc, files, globs)
    return files, globs


def test_toc_lists_every_notebook():
    files, globs = load_toc()
    notebooks = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
    missing = [
        nb
        for nb in notebooks
        if f"notebooks/{nb}" not in files
        and not any(fnmatch.fnmatchcase(f"notebooks/{nb}", g) for g in globs)
    ]
    assert not missing, (
        f"book/_toc.yml does not include notebooks {missing}; name them notebooks/NN_title.ipynb "
        f"so the glob {globs} picks them up, or add a `file:` entry"
    )


def test_toc_files_exist():
    files, _ = load_toc()
    assert "sidebars/lora-made-easy" in files
    for name in files:
        found = [p for p in (BOOK / f"{name}.md", BOOK / f"{name}.ipynb") if p.exists()]
        assert found, f"book/_toc.yml lists {name!r} but book/{name}.md or .ipynb does not exist"


def test_notebooks_link_points_at_the_notebooks():
    link = BOOK / "notebooks"
    assert link.is_symlink(), "book/notebooks must be a symlink to ../notebooks"
    assert link.resolve() == (ROOT / "notebooks").resolve()


def test_config_loads_only_vendored_files():
    text = (BOOK / "_config.yml").read_text()
    config = yaml.safe_load(text)
    assert "://" not in text, "book/_config.yml must not point at any remote URL"
    assert config["execute"]["execute_notebooks"] == "off"
    sphinx = config["sphinx"]["config"]
    assert sphinx["html_static_path"] == ["vendor"]
    assets = [sphinx["mathjax_path"], *sphinx["nb_ipywidgets_js"]]
    for asset in assets:
        assert (BOOK / "vendor" / asset).is_file(), f"book/vendor/{asset} is missing"
    # Jupyter Book loads every .js in book/_static on every page: keep vendored files out of it.
    assert not list(BOOK.glob("_static/**/*.js")), "move JavaScript from book/_static to book/vendor"


def test_library_names_in_the_book_exist():
    """Every `lora_course.a.b...` the pages mention must be a real module or name."""
    pages = [BOOK / "intro.md", *sorted((BOOK / "sidebars").glob("*.md"))]
    names = set()
    for page in pages:
        names.update(re.findall(r"`(lora_course(?:\.\w+)+)`", page.read_text()))
    assert len(names) >= 10
    missing = []
    for dotted in sorted(names):
        parts = dotted.split(".")
        # the longest importable prefix, then attributes
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
                break
            except ModuleNotFoundError:
                continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                missing.append(dotted)
                break
            obj = getattr(obj, attr)
    assert not missing, f"the book mentions names the library does not have: {missing}"
