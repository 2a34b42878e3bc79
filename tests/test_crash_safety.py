"""Crash safety of every save: a failure at any write leaves the old files or the new ones.

The disk is made to fail on purpose, in the ways real disks fail:

- **full**: the k-th file written runs out of space part-way (``ENOSPC`` from Python
  writes; ``mx.save_safetensors`` given a path raises ``RuntimeError("[write] Unable to
  write ...")``, exactly what MLX does on a full disk), for k = 1, 2, 3, ...;
- **read-only**: every create, write, rename or delete in the output directory fails
  with ``EACCES`` (tests run as root, where ``chmod`` does not stop writes, so this is
  simulated; the real ``chmod`` variant runs for other users);
- **fsync**: flushing a file to disk fails with ``EIO``.

For adapters, fused models (``lora_course.save``, MLX and HF layouts) and datasets
(``build_docstring_dataset``) the invariant is: the save either raises one clear line
naming the output directory and leaves every byte of the previous version in place with
no temporary files, or it succeeds and the directory holds exactly the new version.
Training runs are checked the same way and must then resume to the uninterrupted
run's losses bitwise. SIGKILL at random moments is ``tests/training/test_resume.py``.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import random
import stat
from pathlib import Path

import lora_course  # noqa: F401  (BLAS before mlx)
from lora_course import (
    AdapterError,
    CheckpointError,
    Model,
    ModelArgs,
    TrainingArgs,
    apply_lora,
    atomic,
    build_docstring_dataset,
    load,
    load_adapters,
    save,
    save_adapters,
    train,
    train_tokenizer,
)
from lora_course.tokenizer.spm import Tokenizer
from lora_course.training import resume as ckpt

import mlx.core as mx
import pytest

# ----------------------------------------------------------------------------- a failing disk


class _FullFile:
    """An open file on a full disk: ``budget`` bytes go through, then ENOSPC."""

    def __init__(self, f, budget=0):
        self.f, self.budget = f, budget

    def write(self, data):
        if len(data) > self.budget:
            self.f.write(data[: self.budget])
            self.budget = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.budget -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


class FailingDisk:
    """Make writes under ``root`` fail, in mode "full", "read-only" or "fsync".

    "full" fails the ``fail_at``-th file written (counting every file opened for
    writing and every mx.save_safetensors call) and lets the others through.
    """

    def __init__(self, monkeypatch, root: Path, mode: str, fail_at: int = 1):
        self.root, self.mode, self.fail_at, self.writes = str(Path(root).resolve()), mode, fail_at, 0
        self._open, self._os_open, self._fdopen = builtins.open, os.open, os.fdopen
        self._save = mx.save_safetensors
        mp = monkeypatch
        mp.setattr(builtins, "open", self.open)
        mp.setattr(io, "open", self.open)
        mp.setattr(os, "fdopen", self.fdopen)
        mp.setattr(mx, "save_safetensors", self.save_safetensors)
        if mode == "read-only":
            mp.setattr(os, "open", self.os_open)
            for name in ("mkdir", "replace", "rename", "unlink", "rmdir"):
                mp.setattr(os, name, self._deny(getattr(os, name)))
        if mode == "fsync":
            real_fsync = os.fsync

            def fsync(fd):
                if stat.S_ISREG(os.fstat(fd).st_mode) and self._inside(os.readlink(f"/proc/self/fd/{fd}")):
                    raise OSError(errno.EIO, "Input/output error")
                return real_fsync(fd)

            mp.setattr(os, "fsync", fsync)

    def _inside(self, path) -> bool:
        try:
            p = os.path.realpath(os.fspath(path))
        except TypeError:
            return False
        return p == self.root or p.startswith(self.root + os.sep)

    def _fails_now(self) -> bool:
        self.writes += 1
        return self.mode == "read-only" or (self.mode == "full" and self.writes == self.fail_at)

    @staticmethod
    def _writing(mode: str) -> bool:  # creates or truncates a file ("r+" only rewrites: not counted)
        return any(c in mode for c in "wax")

    def _denied(self, path):
        return PermissionError(errno.EACCES, "Permission denied", os.fspath(path))

    def _deny(self, real):
        def wrapper(path, *args, **kwargs):
            for p in (path, *[a for a in args if isinstance(a, (str, os.PathLike))]):
                if self._inside(p):
                    raise self._denied(p)
            return real(path, *args, **kwargs)

        return wrapper

    def os_open(self, path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and self._inside(path):
            raise self._denied(path)
        return self._os_open(path, flags, *args, **kwargs)

    def open(self, file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and self._inside(file):
            if self.mode == "read-only" and (self._writing(mode) or "+" in mode):
                raise self._denied(file)
            if self._writing(mode) and self._fails_now():
                return _FullFile(self._open(file, mode, *args, **kwargs))
        return self._open(file, mode, *args, **kwargs)

    def fdopen(self, fd, mode="r", *args, **kwargs):
        f = self._fdopen(fd, mode, *args, **kwargs)
        if self._writing(mode) and self._inside(os.readlink(f"/proc/self/fd/{fd}")) and self._fails_now():
            return _FullFile(f)
        return f

    def save_safetensors(self, file, arrays, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and self._inside(file) and self._fails_now():
            name = os.fspath(file)
            name = name if name.endswith(".safetensors") else name + ".safetensors"
            if self.mode == "read-only":
                raise RuntimeError(f"[save_safetensors] Failed to open file {name}")
            with self._open(name, "wb") as f:  # half a file, as a full disk leaves it
                f.write(b"\x08\x00\x00\x00\x00\x00\x00\x00{")
            raise RuntimeError("[write] Unable to write 8 bytes to file.")
        return self._save(file, arrays, *args, **kwargs)


CAUSES = ("No space left", "Unable to write", "Permission denied", "Input/output error")


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (temporary ones included), by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- the savers

WORDS = "the model layer token weight rank def return import self for in if else".split()


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(8)) + f" x_{i} = {i}" for i in range(300)]
    tok = train_tokenizer(lines, 400, tmp_path_factory.mktemp("tok") / "tok")
    templated = Tokenizer(tok.path, chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    return tok, templated


def tiny(seed=0, dim=64, vocab=400):
    mx.random.seed(seed)
    model = Model(
        ModelArgs(
            dim=dim,
            n_layers=2,
            hidden_dim=2 * dim,
            n_heads=4,
            n_kv_heads=2,
            vocab_size=vocab,
            rope_theta=500.0,
        )
    )
    mx.eval(model.parameters())
    return model


def adapters_saver(toks):
    old, new = apply_lora(tiny(), num_layers=2, rank=4), apply_lora(tiny(1), num_layers=1, rank=8)
    new.update(lora_course.tree_map(lambda p: p + 0.5, new.trainable_parameters()))  # non-zero lora_b
    mx.eval(old.parameters(), new.parameters())
    return (
        (lambda d: save_adapters(old, d)),
        (lambda d: save_adapters(new, d)),
        (lambda d: load_adapters(tiny(2), d)),
        AdapterError,
    )


def fused_saver(fmt):
    def make(toks):
        tok, templated = toks
        old, new = tiny(0), tiny(1)
        return (
            (lambda d: save(old, tok, d, format=fmt)),
            (lambda d: save(new, templated, d, format=fmt, shard_size_mb=0.02)),  # shards + index
            (lambda d: load(d, lazy=False)),
            CheckpointError,
        )

    return make


def dataset_saver(toks):
    return (
        (lambda d: build_docstring_dataset(["json"], d, test_fraction=0.2, seed=0)),
        (lambda d: build_docstring_dataset(["json"], d, test_fraction=0.1, seed=1)),
        (lambda d: [(d / f"{s}.jsonl").read_text() for s in ("train", "valid", "test")]),
        OSError,
    )


SAVERS = {
    "adapters": adapters_saver,
    "fused_mlx": fused_saver("mlx"),
    "fused_hf": fused_saver("hf"),
    "dataset": dataset_saver,
}
FAILURES = [("full", 1), ("full", 2), ("full", 3), ("full", 4), ("full", 6), ("read-only", 1), ("fsync", 1)]


@pytest.mark.parametrize("mode,fail_at", FAILURES, ids=[f"{m}{k}" if m == "full" else m for m, k in FAILURES])
@pytest.mark.parametrize("saver", list(SAVERS))
def test_a_failed_save_keeps_the_old_version_whole(saver, mode, fail_at, toks, tmp_path, monkeypatch):
    save_old, save_new, check, error = SAVERS[saver](toks)
    ref = tmp_path / "ref" / "out"
    save_new(ref)
    new = snapshot(ref)
    work = tmp_path / "work"
    out = work / "out"
    save_old(out)
    old = snapshot(out)
    assert old != new

    disk = FailingDisk(monkeypatch, work, mode, fail_at)
    try:
        save_new(out)
        failure = None
    except (OSError, ValueError, RuntimeError) as e:
        failure = e
    monkeypatch.undo()

    assert os.listdir(work) == ["out"], f"left behind in {work}: {os.listdir(work)}"
    if failure is None:
        # Only a full disk that struck after the last file may let the save through.
        assert mode == "full" and disk.writes < fail_at, f"{saver} ignored a {mode} failure"
        assert snapshot(out) == new
    else:
        msg = str(failure)
        assert isinstance(failure, error), f"{type(failure).__name__}: {msg}"
        assert "\n" not in msg and str(out) in msg and any(c in msg for c in CAUSES), msg
        assert snapshot(out) == old, "the previous version was changed"
    check(out)  # what is there loads


@pytest.mark.skipif(
    os.geteuid() == 0,
    reason="root writes into 0o500 directories; the simulated read-only cases above cover it",
)
@pytest.mark.parametrize("saver", list(SAVERS))
def test_a_real_read_only_directory(saver, toks, tmp_path):
    save_old, save_new, check, error = SAVERS[saver](toks)
    out = tmp_path / "out"
    save_old(out)
    old = snapshot(out)
    out.chmod(0o500)
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(error) as e:
            save_new(out)
    finally:
        tmp_path.chmod(0o700)
        out.chmod(0o700)
    assert "\n" not in str(e.value) and str(out) in str(e.value)
    assert snapshot(out) == old
    check(out)


# ----------------------------------------------------------------------------- training runs

DATA = [([(5 * i + j) % 61 + 2 for j in range(4 + i % 7)], None) for i in range(10)]


def run(out, iters, resume=False):
    mx.random.seed(0)
    model = Model(ModelArgs(dim=32, n_layers=2, hidden_dim=64, n_heads=4, n_kv_heads=2, vocab_size=64))
    apply_lora(model, num_layers=2, rank=2, dropout=0.1)
    args = TrainingArgs(
        iters=iters,
        batch_size=2,
        learning_rate=1e-2,
        save_every=2,
        steps_per_eval=0,
        steps_per_report=1,
        adapter_path=str(out),
    )
    steps = {}

    class Log:
        def on_report(self, info):
            steps[info["step"]] = info["train_loss"]

    train(model, DATA, args=args, resume=resume, callbacks=[Log()], progress=False, verbose=False)
    return steps


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return run(tmp_path_factory.mktemp("ref") / "run", 8)


# Writes of the resumed run: the write probe, then per checkpoint (steps 6 and 8) the
# training state, adapters.safetensors and adapter_config.json.
TRAIN_FAILURES = [("full", k) for k in (1, 2, 3, 4, 5, 7)] + [("read-only", 1), ("fsync", 1)]


@pytest.mark.parametrize(
    "mode,fail_at", TRAIN_FAILURES, ids=[f"{m}{k}" if m == "full" else m for m, k in TRAIN_FAILURES]
)
def test_a_failed_checkpoint_leaves_a_run_that_resumes_exactly(
    mode, fail_at, reference, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    assert run(out, 4) == {s: reference[s] for s in range(1, 5)}  # the previous checkpoint: step 4

    FailingDisk(monkeypatch, out, mode, fail_at)
    with pytest.raises(ckpt.CheckpointWriteError) as e:
        run(out, 8, resume=True)
    monkeypatch.undo()
    msg = str(e.value)
    assert "\n" not in msg and str(out) in msg and any(c in msg for c in CAUSES), msg
    assert "is intact" in msg or "not writable" in msg, msg

    assert not [p.name for p in out.iterdir() if p.name.startswith(".") or atomic.TMP_MARK in p.name]
    step = ckpt.load_training_state(out)[2]["step"]
    assert step in (4, 6, 8)
    json.loads((out / "adapter_config.json").read_text())
    load_adapters(
        Model(ModelArgs(dim=32, n_layers=2, hidden_dim=64, n_heads=4, n_kv_heads=2, vocab_size=64)), out
    )
    resumed = run(out, 8, resume=True)
    assert sorted(resumed) == list(range(step + 1, 9))
    assert all(resumed[s] == reference[s] for s in resumed), (
        "resumed losses differ from the uninterrupted run"
    )
