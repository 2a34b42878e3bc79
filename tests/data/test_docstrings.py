"""The docstring dataset: record format, shortest public names, counts, determinism, splits."""

import importlib
import json
import sys
import textwrap

from lora_course import build_docstring_dataset, load_dataset, train_tokenizer
from lora_course.recipes.cli import main

import pytest

PKG = "lc_fakepkg"
FILES = {
    "__init__.py": f'''
        """A fake package."""
        from {PKG}.layers.act import ReLU, relu
    ''',
    "layers/__init__.py": f"from {PKG}.layers.act import *\n",
    "layers/act.py": '''
        import json  # a stdlib name: never a record of this package
        from json import dumps


        class ReLU:
            """Applies the rectified linear unit.

                Simply max(x, 0).



            Extra paragraph.   
            """

            def __call__(self, x):
                """Dunders are skipped."""

            def forward(self, x):
                """Run it."""

            def _private(self):
                """Skipped."""

            def undocumented(self):
                pass

            @property
            def name(self):
                """The name."""

            @staticmethod
            def make():
                """Make one."""


        def relu(x):
            """Functional relu."""


        def _hidden():
            """Skipped."""
    ''',
    "util.py": '''
        from dataclasses import dataclass


        @dataclass
        class Auto:
            x: int = 1


        @dataclass
        class Documented:
            """A documented dataclass."""
            x: int = 1


        def long_doc():
            """'''
    + "word " * 1000
    + '''"""
    ''',
    "broken.py": "raise ImportError('an optional dependency is missing')\n",
    "exits.py": "raise SystemExit(3)\n",
    "_private.py": "raise RuntimeError('private modules must never be imported')\n",
}


@pytest.fixture
def fakepkg(tmp_path, monkeypatch):
    root = tmp_path / "site"
    for name, text in FILES.items():
        path = root / PKG / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    yield PKG
    for name in [m for m in sys.modules if m == PKG or m.startswith(PKG + ".")]:
        del sys.modules[name]


def read(folder):
    return {
        s: [json.loads(line)["text"] for line in (folder / f"{s}.jsonl").read_text().splitlines()]
        for s in ("train", "valid", "test")
        if (folder / f"{s}.jsonl").exists()
    }


def test_records_names_and_counts(fakepkg, tmp_path):
    counts = build_docstring_dataset([fakepkg], tmp_path / "out", seq_limit=300, test_fraction=0)
    texts = read(tmp_path / "out")["train"]
    by_name = {t.split("\n")[1].split(" ")[1]: t for t in texts}
    assert sorted(by_name) == sorted(
        f"{PKG}.{n}"
        for n in [
            "ReLU",
            "ReLU.forward",
            "ReLU.name",
            "ReLU.make",
            "relu",
            "util.Documented",
            "util.long_doc",
        ]
    )
    # the shortest public path, the short name in the question, whitespace cleaned
    assert by_name[f"{PKG}.ReLU"] == (
        f"Q: What is ReLU in {PKG}?\nA: {PKG}.ReLU Applies the rectified linear unit.\n\n"
        "    Simply max(x, 0).\n\nExtra paragraph."
    )
    assert (
        by_name[f"{PKG}.ReLU.forward"] == f"Q: What is ReLU.forward in {PKG}?\nA: {PKG}.ReLU.forward Run it."
    )
    assert len(by_name[f"{PKG}.util.long_doc"]) == 300  # capped at seq_limit characters
    assert counts["records"] == counts["train"] == 7 and counts["valid"] == counts["test"] == 0
    # lc_fakepkg, .layers, .layers.act, .util imported; broken and exits skipped and counted
    assert (counts["modules"], counts["import_failures"]) == (4, 2)
    assert counts["failed_modules"] == [f"{PKG}.broken", f"{PKG}.exits"]
    assert f"{PKG}._private" not in sys.modules  # never imported
    assert not (tmp_path / "out" / "valid.jsonl").exists()  # empty splits are not written


def test_deterministic(fakepkg, tmp_path):
    a = build_docstring_dataset([fakepkg, "json"], tmp_path / "a", test_fraction=0.2, seed=3)
    b = build_docstring_dataset([fakepkg, "json"], tmp_path / "b", test_fraction=0.2, seed=3)
    for split in ("train", "valid", "test"):
        assert (tmp_path / "a" / f"{split}.jsonl").read_bytes() == (
            tmp_path / "b" / f"{split}.jsonl"
        ).read_bytes()
    a.pop("seconds"), b.pop("seconds")
    assert a == b
    build_docstring_dataset([fakepkg, "json"], tmp_path / "c", test_fraction=0.2, seed=4)
    ra, rc = read(tmp_path / "a"), read(tmp_path / "c")
    assert ra != rc and sorted(sum(ra.values(), [])) == sorted(sum(rc.values(), []))


def test_split_fractions_and_loading(tmp_path):
    counts = build_docstring_dataset(["json"], tmp_path / "j", test_fraction=0.25)
    n = counts["records"]
    assert n >= 10 and counts["valid"] == counts["test"] == round(n * 0.25)
    assert counts["train"] == n - 2 * round(n * 0.25)
    texts = read(tmp_path / "j")
    everything = sum(texts.values(), [])
    assert len(set(everything)) == n  # each record in exactly one split
    assert any(t.startswith("Q: What is dumps in json?\nA: json.dumps Serialize") for t in everything)
    # defined in json.decoder, exported by json: named json.JSONDecodeError
    assert any(
        t.startswith("Q: What is JSONDecodeError in json?\nA: json.JSONDecodeError ") for t in everything
    )
    tok = train_tokenizer(everything, 400, None)
    splits = load_dataset(tmp_path / "j", tok)
    assert [len(s) for s in splits] == [counts["train"], counts["valid"], counts["test"]]


def test_small_datasets_still_get_valid_and_test(fakepkg, tmp_path):
    counts = build_docstring_dataset([fakepkg], tmp_path / "o", test_fraction=0.01)
    assert (counts["valid"], counts["test"], counts["train"]) == (1, 1, 5)


def test_rewrites_atomically_and_drops_stale_splits(fakepkg, tmp_path):
    out = tmp_path / "o"
    build_docstring_dataset([fakepkg], out, test_fraction=0.2)
    assert (out / "test.jsonl").exists()
    build_docstring_dataset([fakepkg], out, test_fraction=0.0)
    assert sorted(p.name for p in out.iterdir()) == ["train.jsonl"]  # no temp files, no stale split


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot import package 'no_such_pkg_xyz'"):
        build_docstring_dataset(["no_such_pkg_xyz"], tmp_path)
    with pytest.raises(ValueError, match="test_fraction"):
        build_docstring_dataset(["json"], tmp_path, test_fraction=0.5)
    with pytest.raises(ValueError, match="seq_limit"):
        build_docstring_dataset(["json"], tmp_path, seq_limit=0)


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(
        [
            "dataset",
            "--packages",
            "json",
            "--out",
            str(out),
            "--seq-limit",
            "100",
            "--test-fraction",
            "0.2",
            "--seed",
            "1",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"wrote {out}: train ") and "0 modules failed" in printed
    assert max(len(t) for t in sum(read(out).values(), [])) <= 100
    assert main(["dataset", "--packages", "no_such_pkg_xyz", "--out", str(out)]) == 1
    assert "cannot import package" in capsys.readouterr().err


@pytest.mark.slow
def test_parallel_workers_write_the_same_files(fakepkg, tmp_path):
    serial = build_docstring_dataset([fakepkg, "json"], tmp_path / "s", test_fraction=0.2)
    parallel = build_docstring_dataset([fakepkg, "json"], tmp_path / "p", test_fraction=0.2, workers=2)
    assert read(tmp_path / "s") == read(tmp_path / "p")
    assert parallel["import_failures"] == serial["import_failures"] == 2


def test_first_sentence_skips_a_signature_and_stops_at_the_first_period():
    from lora_course.data.docstrings import first_sentence

    assert first_sentence("Applies the Rectified Linear Unit.\n    Simply ``mx.maximum(x, 0)``.") == (
        "Applies the Rectified Linear Unit."
    )
    sig = "sinh(a: array, /, *, stream: StreamOrDevice = None) -> array\n\nElement-wise hyperbolic sine.\n\nArgs: x"
    assert first_sentence(sig) == "Element-wise hyperbolic sine."
    assert first_sentence("Split a key, e.g. for two\ndraws. More.") == "Split a key, e.g. for two draws."
    assert first_sentence("clear_streams() -> None") == ""
    assert first_sentence("No period here\n\nSecond paragraph.") == "No period here"
