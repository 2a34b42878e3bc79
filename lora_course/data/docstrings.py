"""A Q/A dataset made from the docstrings of installed packages.

The idea comes from the MLX LoRA example's walkthrough: a library's
docstrings are free, well-written training data about that library. For every public
class, function, method and property with a docstring we write one record,

    {"text": "Q: What is ReLU in mlx?\\nA: mlx.nn.ReLU Applies the Rectified Linear Unit..."}

named by its shortest public import path (``mlx.nn.ReLU``, not
``mlx.nn.layers.activations.ReLU``), and split the records into train/valid/test
jsonl files that ``load_dataset`` reads. With ``answer="summary"`` the answer is only
the name and the docstring's first sentence (``first_sentence``), a short fact that a
small model can learn in minutes (``"sentence"``: the first sentence alone). Taught in
notebook 09 (data).

Deterministic for a given environment: modules are walked in sorted order, records are
sorted by name, the split is shuffled by ``seed``. Submodules that fail to import are
skipped and counted; private modules (``_name``) are never imported.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from lora_course import atomic
from lora_course.data.walker import clean_docstring, documented, is_public, walk_modules

SPLITS = ("train", "valid", "test")


# a docstring that opens with its own signature (compiled functions: "sinh(a: array, /, ...) -> array")
_SIGNATURE = re.compile(r"^[A-Za-z_][\w.]*\(.*\)(\s*->.*)?$", re.S)
_SENTENCE_END = re.compile(r"(?<![.\s][a-z])(?<!\be\.g)(?<!\bi\.e)\.(\s|$)")


def first_sentence(doc: str) -> str:
    """The first sentence of a cleaned docstring, on one line; "" when there is none.

    A leading signature paragraph is skipped; the sentence ends at the first period that
    is followed by whitespace or the end of the first prose paragraph (a paragraph that
    ends without a period ends the sentence there).
    """
    paragraphs = [p for p in re.split(r"\n\s*\n", doc) if p.strip()]
    while paragraphs and _SIGNATURE.match(" ".join(paragraphs[0].split())):
        paragraphs.pop(0)
    if not paragraphs:
        return ""
    text = " ".join(paragraphs[0].split())
    m = _SENTENCE_END.search(text)
    return text[: m.start() + 1] if m else text


def _collect(package: str, answer: str = "docstring") -> tuple[list[tuple[str, str]], int, list[str]]:
    """(records as (path, text), modules imported, failed module names) for one package."""
    failures: list[str] = []
    modules = walk_modules(package, failures)
    top = package.split(".")[0]
    names: dict[int, list[tuple[str, str]]] = {}  # id(obj) -> [(module, attribute)]
    objects: dict[int, object] = {}
    for module in modules:
        public = getattr(module, "__all__", None) or [n for n in vars(module) if is_public(n)]
        for name in sorted(set(public)):
            obj = vars(module).get(name)
            home = getattr(obj, "__module__", None) or ""
            if obj is not None and documented(obj) and (home == top or home.startswith(top + ".")):
                names.setdefault(id(obj), []).append((module.__name__, name))
                objects[id(obj)] = obj
    records = []
    for key, aliases in names.items():
        # the shortest public path: fewest dots, then fewest characters, then alphabetical
        module, name = min(aliases, key=lambda a: (a[0].count("."), len(a[0]), a))
        obj = objects[key]
        entries = [(name, obj.__doc__)]
        if isinstance(obj, type):
            for attr, member in sorted(vars(obj).items()):
                if is_public(attr):
                    member = getattr(member, "__func__", member)  # staticmethod, classmethod
                    if isinstance(member, property) or documented(member):
                        entries.append((f"{name}.{attr}", member.__doc__))
            if getattr(obj, "__dataclass_fields__", None) and (obj.__doc__ or "").startswith(f"{name}("):
                entries.pop(0)  # the signature dataclasses write for themselves
        for qualname, doc in entries:
            doc = clean_docstring(doc)
            if answer != "docstring":
                doc = first_sentence(doc)
            if doc:
                name = "" if answer == "sentence" else f"{module}.{qualname} "
                text = f"Q: What is {qualname} in {top}?\nA: {name}{doc}"
                records.append((f"{module}.{qualname}", text))
    return records, len(modules), failures


def _split(records: list[str], test_fraction: float, seed: int) -> dict[str, list[str]]:
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_test = round(len(records) * test_fraction)
    if test_fraction > 0 and len(records) >= 3:
        n_test = max(1, n_test)
    test, valid, train = order[:n_test], order[n_test : 2 * n_test], order[2 * n_test :]
    return {
        "train": [records[i] for i in train],
        "valid": [records[i] for i in valid],
        "test": [records[i] for i in test],
    }


def _record(text: str, completion: bool) -> dict:
    if not completion:
        return {"text": text}
    question, answer = text.split("\nA:", 1)
    return {"prompt": question + "\nA:", "completion": answer}


def build_docstring_dataset(
    packages=("mlx",),
    out_dir="mlx-doc-data",
    seq_limit: int = 2048,
    test_fraction: float = 0.1,
    seed: int = 0,
    workers: int | None = None,
    answer: str = "docstring",
    completion: bool = False,
) -> dict:
    """Write ``train/valid/test.jsonl`` of docstring Q/A records into ``out_dir``.

    ``valid`` and ``test`` each get ``test_fraction`` of the records (at least one each
    when there are 3 or more); empty splits are not written. Each record's text is cut
    to ``seq_limit`` characters. ``workers > 1`` walks packages in that many spawned
    processes, one package each. Importing dominates the time and each process pays
    its own start-up, so on 2 cores it is slower (20 stdlib packages, 3,239 records:
    1.0 s in-process, 3.5 s with 2 spawned workers, 1.6 s even with fork); the default
    (None) therefore walks in this process. ``answer="summary"`` answers with the name
    and ``first_sentence`` of the docstring only (names without one are left out);
    ``"sentence"`` with the first sentence alone; the default ``"docstring"`` with the
    name and the whole docstring. ``completion=True`` writes ``{"prompt": "Q: ...\\nA:",
    "completion": " ..."}`` records (so ``mask_prompt`` can train on the answers only)
    instead of ``{"text": ...}``. Returns counts: records per split, ``records``,
    ``modules`` imported, ``import_failures`` (skipped), and ``seconds``.
    """
    if not 0 <= test_fraction < 0.5:
        raise ValueError(
            f"test_fraction must be in [0, 0.5) (valid and test each get it), got {test_fraction}"
        )
    if answer not in ("docstring", "summary", "sentence"):
        raise ValueError(f"answer={answer!r}: choose 'docstring', 'summary' or 'sentence'")
    if seq_limit < 1:
        raise ValueError(f"seq_limit must be positive, got {seq_limit}")
    packages = [packages] if isinstance(packages, str) else list(packages)
    start = time.perf_counter()
    if workers and workers > 1 and len(packages) > 1:
        spawn = multiprocessing.get_context("spawn")  # never fork a process that runs MLX threads
        with ProcessPoolExecutor(min(workers, len(packages)), mp_context=spawn) as pool:
            results = list(pool.map(_collect, packages, [answer] * len(packages)))
    else:
        results = [_collect(p, answer) for p in packages]
    by_path = {}
    for records, _, _ in results:
        for path, text in records:
            by_path.setdefault(path, text[:seq_limit].rstrip())
    failures = sorted({f for _, _, fails in results for f in fails})
    if not by_path:
        raise ValueError(
            f"no documented public names found in {', '.join(packages)} "
            f"(import failures: {', '.join(failures) or 'none'})"
        )
    splits = _split([by_path[p] for p in sorted(by_path)], test_fraction, seed)
    out = Path(out_dir)
    files = atomic.FileSet()  # every split is written in full before any replaces an old one
    try:
        out.mkdir(parents=True, exist_ok=True)
        with files:
            for split, texts in splits.items():
                if texts:
                    lines = "".join(
                        json.dumps(_record(t, completion), ensure_ascii=False) + "\n" for t in texts
                    )
                    files.write(out / f"{split}.jsonl", lines)
        for split in SPLITS:
            if not splits[split] and (out / f"{split}.jsonl").exists():
                os.unlink(out / f"{split}.jsonl")  # a stale split from an earlier run would not match
    except OSError as e:
        kept = "the splits are mixed; run it again" if files.replaced else "the previous files are unchanged"
        err = OSError(f"{out}: cannot write the dataset ({e.strerror or e}); {kept}")
        err.errno = e.errno
        raise err from None
    counts = {s: len(splits[s]) for s in SPLITS}
    counts.update(
        records=len(by_path),
        modules=sum(r[1] for r in results),
        import_failures=len(failures),
        seconds=round(time.perf_counter() - start, 3),
    )
    counts["failed_modules"] = failures
    return counts
