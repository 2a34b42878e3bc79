"""Atomic saves: after a crash a file holds its old version or its new one, never half.

Every file lora_course writes (checkpoints, adapters, training state, tokenizers,
datasets) goes through this module. "Atomic" here means the POSIX rename guarantee:

1. the new bytes go to a temporary file *beside* the target (same folder, so the same
   filesystem: a rename across filesystems is a copy, and copies can tear);
2. the temporary is flushed from Python's buffer and then ``fsync``-ed, so its bytes are
   on the disk, not only in the page cache, before anything points at them;
3. ``os.replace`` renames it over the target in one step, which POSIX makes atomic;
4. the *folder* is ``fsync``-ed too. A rename changes the folder, not the file: until
   the folder's entry is on disk, a power cut can bring the old name back (or lose a
   new file altogether).

What a crash can leave behind: the target, whole (old or new), plus at most one
temporary per file being written, the hidden ``.tmp-<pid>-<random>-<name>`` (it ends
in the real name, so its type still shows).
:func:`remove_stale_temporaries` deletes them; the trainer calls it before a run. What
a crash cannot leave: a target that is truncated, half-written or mixes old and new
bytes. A failure that Python sees (full disk, read-only folder, an ``fsync`` error)
removes the temporary and re-raises, so the folder looks as it did before.

Several files that must change together (an adapter's weights and its config, the
splits of a dataset) use :class:`FileSet`: all are written before any is renamed.
A crash among the renames can still leave some new and some old, but never a torn
file. A whole folder (a model checkpoint) is built as a temporary folder and swapped
in by :func:`replace_dir`; POSIX has no atomic swap of two folders, so a crash
between its two renames leaves the target name missing while both complete versions
wait beside it (``.old-...-<name>`` and ``.tmp-...-<name>``).

Taught in notebook 10 (training loop: crash-safe checkpoints); used by notebooks 04,
06 and 09 whenever something is saved.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Union

import mlx.core as mx

TMP_MARK = ".tmp-"  # every temporary's name starts with this: .tmp-<pid>-<random>-<name>
OLD_MARK = ".old-"  # a folder moved aside while its replacement is renamed in
# What a file is written from: bytes, text (UTF-8), or a function that writes to the open file.
Data = Union[bytes, str, Callable[[BinaryIO], None]]


def temp_path(target, mark: str = TMP_MARK) -> Path:
    """A fresh hidden name beside ``target``: ``.tmp-<pid>-<random>-<name>``.

    The pid and 32 random bits keep two writers (threads, processes) apart.
    """
    target = Path(target)
    return target.with_name(f"{mark}{os.getpid()}-{secrets.token_hex(4)}-{target.name}")


def fsync_dir(folder) -> None:
    """Flush a folder's entries (names just created or renamed) to disk, where possible."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some filesystems do not let a folder be opened
    try:
        os.fsync(fd)
    except OSError:
        pass  # ... or fsync-ed; the files' own data is already safe
    finally:
        os.close(fd)


def write_temp(target, data: Data) -> Path:
    """Write ``data`` to a fresh temporary beside ``target``, flushed and fsync-ed.

    Returns the temporary's path for the caller to rename into place (see
    :class:`FileSet`). On any failure the temporary is removed and the error re-raised.
    """
    tmp = temp_path(target)
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write(target, data: Data) -> Path:
    """Replace ``target`` by ``data`` atomically (temporary, fsync, rename, fsync folder)."""
    target = Path(target)
    tmp = write_temp(target, data)
    try:
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
    return target


def write_bytes(path, data: bytes) -> Path:
    return write(path, data)


def write_text(path, text: str) -> Path:
    """UTF-8, newlines as given (no platform translation)."""
    return write(path, text)


def write_json(path, data) -> Path:
    """``data`` as indented JSON with sorted keys, so saves of the same data are identical."""
    return write(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_safetensors(path, arrays: dict[str, mx.array], metadata: dict[str, str] | None = None) -> Path:
    """``mx.save_safetensors`` made atomic.

    MLX writes into the open temporary, so a full disk surfaces as Python's
    ``OSError`` (with ``errno``), not as MLX's RuntimeError.
    """
    return write(path, lambda f: mx.save_safetensors(f, arrays, metadata=metadata))


class FileSet:
    """Files that replace their old versions together: none is renamed until all are written.

    ``with FileSet() as files: files.write(a, ...); files.write(b, ...)`` writes each to
    its temporary and, when the block ends without error, renames them in order and
    fsyncs their folders. An error (or a failed rename) deletes every temporary not
    yet renamed; ``replaced`` then says how many targets already hold the new version.
    """

    def __init__(self):
        self.staged: list[tuple[Path, Path]] = []  # (temporary, target), in write order
        self.replaced = 0

    def write(self, target, data: Data) -> None:
        self.staged.append((write_temp(target, data), Path(target)))

    def __enter__(self) -> FileSet:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                for tmp, target in self.staged:
                    os.replace(tmp, target)
                    self.replaced += 1
                for folder in dict.fromkeys(target.parent for _, target in self.staged):
                    fsync_dir(folder)
        finally:
            for tmp, _ in self.staged[self.replaced :]:
                tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def locked(folder, shared: bool = False) -> Iterator[None]:
    """Hold an advisory lock (``fcntl.flock``) on ``folder`` itself for the block.

    Writers of a set of files in the folder take it exclusive, readers shared, so a
    reader never sees one writer's file beside another's, and two writers never
    interleave their renames. A folder that cannot be opened is read without the lock.
    """
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        if not shared:
            raise
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


# ----------------------------------------------------------------------------- folders


def temp_dir(target) -> Path:
    """A new empty temporary folder beside ``target`` in which to build its next version."""
    folder = temp_path(target)
    os.mkdir(folder)  # (not tempfile.mkdtemp: that makes it private, mode 0700, for good)
    return folder


def fsync_files(folder) -> None:
    """fsync every file directly inside ``folder``, then the folder: call before renaming it."""
    for p in Path(folder).iterdir():
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)  # a failure here is real (data not on disk): it propagates
            finally:
                os.close(fd)
    fsync_dir(folder)


def replace_dir(tmp, target) -> None:
    """Put the finished folder ``tmp`` at ``target``; an old ``target`` is moved aside, then deleted.

    If the second rename fails the old folder is moved back, so ``target`` is never
    left missing by an error (only by a crash between the two renames).
    """
    tmp, target = Path(tmp), Path(target)
    if not target.exists():
        os.replace(tmp, target)
    else:
        old = temp_path(target, OLD_MARK)
        os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            os.replace(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(target.parent)


def remove_stale_temporaries(directory) -> None:
    """Delete the temporaries (files and folders) that a killed run left in ``directory``.

    Only call it when no other process is writing there (their temporaries look the
    same), and not after a crash inside :func:`replace_dir` (its ``.tmp-`` folder may then
    be the only copy of the new version). The trainer calls it on its adapter folder.
    """
    directory = Path(directory)
    if directory.is_dir():
        for p in directory.glob(f"{TMP_MARK}*"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
