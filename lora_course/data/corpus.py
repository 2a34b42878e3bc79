"""The pretraining corpus: documentation text of installed packages, built offline.

The course's base model (``lora_course/assets/base/``) learned English and the shape
of API documentation from this corpus alone. It is the docstring walk of the MLX LoRA
example's dataset script, pointed at different packages and written as plain text instead of
Q/A pairs: every public module, class, function and method of Python's standard
library and of numpy, matplotlib, PyYAML and tqdm (the runtime dependencies of this
package, so every install can rebuild it), plus the language-reference topics that
``pydoc`` ships in ``pydoc_data``. One document per object:

    numpy.linalg.norm(x, ord=None, axis=None, keepdims=False)

    Matrix or vector norm.
    ...

``mlx`` and ``mlx_lm`` are held out on purpose: ``lora-course quickstart`` fine-tunes
on mlx's docstrings, so the base model must not have seen them.

The recipe is deterministic for a given environment: modules are walked in sorted
order, identical docstrings are kept once (first in that order), memory addresses in
signatures are erased, default values longer than 40 characters are written as
``...`` (a default such as ``environ=os.environ`` would otherwise copy the process's
environment variables into the corpus), and the held-out split is a seeded
permutation of documents.
Different package versions give a different (equally valid) corpus; the shipped
model's ``training_log.json`` records the versions and the corpus hash.

Taught in notebook 12 ("pretraining the course's base model").
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from lora_course import atomic
from lora_course.data.walker import import_quietly, public

import numpy as np

# "stdlib" stands for every module in sys.stdlib_module_names.
DEFAULT_PACKAGES = ("stdlib", "numpy", "matplotlib", "yaml", "tqdm")
# Fine-tuning data of the quickstart; never part of the pretraining corpus.
HELD_OUT = ("mlx", "mlx_lm")
# Modules that do something when imported (open a browser, print, start a GUI or a
# REPL), that only exist on other platforms, or whose text is generated boilerplate.
SKIP_MODULES = {
    "antigravity",
    "this",
    "idlelib",
    "tkinter",
    "turtle",
    "turtledemo",
    "test",
    "lib2to3",
    "ensurepip",
    "pydoc_data",
    "encodings",
    "msilib",
    "winreg",
    "winsound",
    "nt",
    "msvcrt",
    "_winapi",
    "sitecustomize",
    "usercustomize",
    "distutils",
    "numpy.f2py",
    "numpy.distutils",
    "matplotlib.testing",
    "matplotlib.backends",
    "tqdm.contrib",
}
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
MAX_DEFAULT_REPR = 40  # longer default values in signatures are written as "..."


@dataclass
class Corpus:
    """Documents split into train and valid, and how they were made."""

    train: list[str]  # documents the model learns from
    valid: list[str]  # held-out documents, for perplexity
    stats: dict = field(default_factory=dict)  # modules walked, failures, chars, sha256

    def text(self, split: str = "train") -> str:
        """The split as one string, documents separated by blank lines."""
        return "\n\n".join(getattr(self, split))


def _skipped(name: str, held_out) -> bool:
    parts = name.split(".")
    if parts[0] in held_out or any(p.startswith("_") or p in ("tests", "conftest") for p in parts):
        return True
    return any(name == s or name.startswith(s + ".") for s in SKIP_MODULES)


def module_names(package: str, held_out=HELD_OUT) -> list[str]:
    """Public module names of ``package`` ("stdlib" for the standard library), sorted."""
    if package.split(".")[0] in held_out:
        raise ValueError(
            f"corpus: package {package!r} is held out of the pretraining corpus "
            "(the quickstart fine-tunes on it); remove it from --packages"
        )
    tops = sorted(sys.stdlib_module_names) if package == "stdlib" else [package]
    names = []
    for top in tops:
        if _skipped(top, held_out):
            continue
        names.append(top)
        mod = import_quietly(top)
        if mod is None or not hasattr(mod, "__path__"):
            continue
        for info in pkgutil.walk_packages(mod.__path__, top + ".", onerror=lambda _: None):
            if not _skipped(info.name, held_out):
                names.append(info.name)
    return sorted(dict.fromkeys(names))


class _Elided:
    def __repr__(self) -> str:
        return "..."


def _signature(obj) -> str:
    """The signature, with long default values elided: some defaults are evaluated at
    import time and would put this process's state into the corpus (``cgi``'s
    ``environ=os.environ`` prints every environment variable)."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return ""
    params = []
    for p in sig.parameters.values():
        default = p.default
        if default is not p.empty and _machine_specific(default):
            p = p.replace(default=_Elided())
        params.append(p)
    try:
        text = str(sig.replace(parameters=params))
    except ValueError:
        return ""
    return _ADDRESS.sub("", text)


def _machine_specific(default) -> bool:
    """Long reprs, the environment, and paths of this installation, home or cwd."""
    text = _safe_repr(default)
    if isinstance(default, os._Environ) or len(text) > MAX_DEFAULT_REPR:
        return True
    places = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.expanduser("~"), os.getcwd()}
    return any(p in text for p in places if p and p != os.sep)


def _safe_repr(value) -> str:
    try:
        return repr(value)
    except Exception:  # noqa: BLE001  (a broken __repr__ must not stop the walk)
        return "?" * (MAX_DEFAULT_REPR + 1)


def _doc(obj) -> str:
    doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else None
    return inspect.cleandoc(doc) if doc else ""


def module_documents(mod) -> list[tuple[str, str]]:
    """(name, text) for the module and its public classes, functions and methods
    that are defined in it (things merely imported into it are documented at home)."""
    docs = []
    name = mod.__name__
    if _doc(mod):
        docs.append((name, f"{name}\n\n{_doc(mod)}"))
    for attr in public(getattr(mod, "__all__", None) or dir(mod)):
        obj = getattr(mod, attr, None)
        if getattr(obj, "__module__", None) != name or inspect.ismodule(obj):
            continue
        if inspect.isclass(obj) or callable(obj):
            qual = f"{name}.{attr}"
            if _doc(obj):
                docs.append((qual, f"{qual}{_signature(obj)}\n\n{_doc(obj)}"))
        if inspect.isclass(obj):
            for member in public(vars(obj)):
                value = vars(obj)[member]
                target = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
                if not (callable(target) or isinstance(target, property)) or not _doc(target):
                    continue
                sig = "" if isinstance(target, property) else _signature(target)
                docs.append((f"{qual}.{member}", f"{qual}.{member}{sig}\n\n{_doc(target)}"))
    return docs


def _pydoc_topics() -> list[tuple[str, str]]:
    """The language reference pages that ``help("if")`` shows."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return []
    return [(f"topic {k}", topics[k].strip()) for k in sorted(topics)]


def build_corpus(
    packages=DEFAULT_PACKAGES,
    valid_fraction: float = 0.05,
    seed: int = 0,
    held_out=HELD_OUT,
    max_doc_chars: int = 6000,
    isolated: bool = True,
) -> Corpus:
    """Walk ``packages`` and return their documentation, split into train and valid.

    ``max_doc_chars`` cuts very long pages (a few module docstrings are whole manuals)
    at a paragraph boundary, so no single page dominates the corpus. With ``isolated``
    (the default) the modules are imported in a fresh Python process: the caller's own
    imports and patches cannot change the text (IPython, for one, replaces ``input``
    and ``pdb``), and the caller is not left holding hundreds of imported modules.
    """
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"corpus: valid_fraction={valid_fraction} must be between 0 and 1")
    packages, held_out = list(packages), list(held_out)
    for package in packages:
        if package.split(".")[0] in held_out:
            module_names(package, held_out)  # raises the "held out" error
    if isolated:
        sources, walked, failed = _walk_in_fresh_interpreter(packages, held_out)
    else:
        sources, walked, failed = walk(packages, held_out)
    seen, docs = set(), []
    for _, text in sources:
        text = _truncate(text, max_doc_chars)
        key = text.split("\n\n", 1)[-1]  # the docstring itself: inherited copies go
        if key in seen:
            continue
        seen.add(key)
        docs.append(text)
    order = np.random.default_rng(seed).permutation(len(docs))
    n_valid = max(1, int(round(valid_fraction * len(docs))))
    valid = [docs[i] for i in sorted(order[:n_valid])]
    train = [docs[i] for i in sorted(order[n_valid:])]
    digest = hashlib.sha256("\x00".join(docs).encode()).hexdigest()
    stats = {
        "packages": packages,
        "held_out": held_out,
        "modules": walked,
        "import_failures": len(failed),
        "documents": len(docs),
        "train_documents": len(train),
        "valid_documents": len(valid),
        "train_chars": sum(map(len, train)),
        "valid_chars": sum(map(len, valid)),
        "sha256": digest,
        "seed": seed,
    }
    return Corpus(train=train, valid=valid, stats=stats)


def walk(packages, held_out=HELD_OUT) -> tuple[list[tuple[str, str]], int, list[str]]:
    """(name, document) pairs of ``packages`` in this process, modules imported, failures."""
    sources, failed, walked = [], [], 0
    for package in packages:
        for name in module_names(package, held_out):
            mod = import_quietly(name)
            if mod is None:
                failed.append(name)
                continue
            walked += 1
            sources += module_documents(mod)
        if package == "stdlib":
            sources += _pydoc_topics()
    return sources, walked, failed


def _walk_in_fresh_interpreter(packages, held_out):
    """``walk`` in a new ``python`` process; the result comes back as a JSON file."""
    root = str(Path(__file__).resolve().parent.parent)  # the directory holding lora_course/
    child = (
        "import json, os, sys; "
        "sys.path[:] = [sys.argv[1]] + [p for p in sys.path if p not in ('', os.getcwd())]; "
        "from lora_course.data.corpus import walk; "
        "args = json.loads(sys.argv[2]); result = walk(args['packages'], args['held_out']); "
        "open(sys.argv[3], 'w', encoding='utf-8').write(json.dumps(result))"
    )
    with tempfile.TemporaryDirectory(prefix="lora-course-corpus-") as tmp:
        out = Path(tmp) / "sources.json"
        env = {**os.environ, "PYTHONHASHSEED": "0", "LORA_COURSE_NO_BLAS": "1"}  # no MLX work here
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                child,
                root,
                json.dumps({"packages": packages, "held_out": held_out}),
                str(out),
            ],
            env=env,
            cwd=tmp,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0 or not out.is_file():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(
                f"corpus: walking {', '.join(packages)} in a fresh Python failed ({last}); "
                "try build_corpus(..., isolated=False) to see the full error"
            )
        sources, walked, failed = json.loads(out.read_text(encoding="utf-8"))
    return [tuple(s) for s in sources], walked, failed


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text.rfind("\n\n", 0, limit)
    return text[: cut if cut > 0 else limit].rstrip()


def save_corpus(corpus: Corpus, out_dir: str) -> None:
    """Write ``train.jsonl`` / ``valid.jsonl`` ({"text": document} per line, the shape
    ``load_dataset`` reads) and ``stats.json``; each file written atomically."""

    os.makedirs(out_dir, exist_ok=True)
    for split in ("train", "valid"):
        lines = "".join(json.dumps({"text": d}) + "\n" for d in getattr(corpus, split))
        atomic.write_text(os.path.join(out_dir, f"{split}.jsonl"), lines)
    atomic.write_text(os.path.join(out_dir, "stats.json"), json.dumps(corpus.stats, indent=2) + "\n")
