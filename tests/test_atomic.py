"""lora_course.atomic: a save leaves the old version or the new one, and no temporary."""

import errno
import json
import os
import stat

import lora_course  # noqa: F401  (BLAS before mlx)
from lora_course import atomic

import mlx.core as mx
import pytest


def full_disk_after(n_bytes):
    def write(f):
        f.write(b"x" * n_bytes)
        raise OSError(errno.ENOSPC, "No space left on device")

    return write


def test_write_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    atomic.write_json(target, {"b": 1, "a": [1, 2]})
    atomic.write_json(target, {"b": 2, "a": [3]})
    assert target.read_text() == '{\n  "a": [\n    3\n  ],\n  "b": 2\n}\n'
    atomic.write_text(tmp_path / "t.txt", "ünï\ncode\n")
    assert (tmp_path / "t.txt").read_bytes() == "ünï\ncode\n".encode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "t.txt"]


def test_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        atomic.write_bytes(tmp_path / "f", b"1")
        folder = atomic.temp_dir(tmp_path / "d")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o644  # not mkstemp's private 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "w.bin"
    atomic.write_bytes(target, b"old")
    with pytest.raises(OSError, match="No space left"):
        atomic.write(target, full_disk_after(3))
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["w.bin"]


def test_save_safetensors_round_trip_with_metadata(tmp_path):
    path = tmp_path / "s.safetensors"
    atomic.save_safetensors(path, {"w": mx.arange(6).reshape(2, 3)}, {"k": "v"})
    arrays, meta = mx.load(str(path), return_metadata=True)
    assert arrays["w"].tolist() == [[0, 1, 2], [3, 4, 5]] and meta == {"k": "v"}
    assert os.listdir(tmp_path) == ["s.safetensors"]


def test_file_set_renames_nothing_unless_all_are_written(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    with atomic.FileSet() as files:
        files.write(a, b"a1")
        files.write(b, "b1")
    assert (a.read_bytes(), b.read_bytes(), files.replaced) == (b"a1", b"b1", 2)

    files = atomic.FileSet()
    with pytest.raises(OSError):
        with files:
            files.write(a, b"a2")
            files.write(b, full_disk_after(1))
    assert (a.read_bytes(), b.read_bytes(), files.replaced) == (b"a1", b"b1", 0)
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]


def test_replace_dir_swaps_and_restores_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    for version in ("v1", "v2"):
        new = atomic.temp_dir(target)
        (new / "f").write_text(version)
        atomic.fsync_files(new)
        atomic.replace_dir(new, target)
    assert (target / "f").read_text() == "v2" and os.listdir(tmp_path) == ["ckpt"]

    new = atomic.temp_dir(target)
    real = os.replace

    def second_rename_fails(src, dst):
        if str(src) == str(new):
            raise OSError(errno.EIO, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="Input/output"):
        atomic.replace_dir(new, target)
    monkeypatch.undo()
    assert (target / "f").read_text() == "v2"  # the old version was moved back
    assert sorted(os.listdir(tmp_path)) == sorted(["ckpt", new.name])  # the caller removes its temporary


def test_remove_stale_temporaries(tmp_path):
    (tmp_path / "keep.json").write_text(json.dumps({}))
    atomic.temp_path(tmp_path / "adapters.safetensors").write_bytes(b"half")
    atomic.temp_dir(tmp_path / "model")
    atomic.remove_stale_temporaries(tmp_path)
    assert os.listdir(tmp_path) == ["keep.json"]
    atomic.remove_stale_temporaries(tmp_path / "missing")  # no folder: nothing to do
