"""Reading untrusted files with bounded work: regular files only, JSON and YAML with limits.

Every file a user hands us (a config, an adapter, a dataset, a checkpoint) passes
through here before it is parsed, so one set of rules holds everywhere:

- only **regular files** are read: a directory, a FIFO (which would block forever) or a
  device such as ``/dev/zero`` (which never ends) is refused, naming the path; a
  symlink is followed, and with ``inside=`` it must stay inside that folder;
- a config is read up to ``limits.MAX_CONFIG_BYTES``;
- **JSON** nested deeper than Python can follow is our error naming the file, not a
  ``RecursionError``;
- **YAML** is read with ``SafeLoader`` (no objects built from tags) and its size is
  counted after expanding every alias, so a "billion laughs" file fails at once;
- a **safetensors header** is checked (types, shapes, byte ranges inside the file)
  before MLX sees the file.

Each problem raises :class:`InputError` (a ``ValueError``: one line, ``.path`` and
``.reason``); the boundaries turn it into their own error type. Taught in notebook 10.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from pathlib import Path

from lora_course.limits import MAX_CONFIG_BYTES, MAX_HEADER_BYTES, MAX_YAML_NODES

import yaml


class InputError(ValueError):
    """A file that is not safe or not well-formed to read; ``.path`` and ``.reason`` say why."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def regular_file(path, inside=None) -> Path:
    """``path`` if it is (a symlink to) a regular file; with ``inside``, one inside that folder."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except OSError as e:
        raise InputError(path, f"cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(path, f"is {_kind(st.st_mode)}, not a regular file")
    if inside is not None and path.is_symlink():
        target, folder = path.resolve(), Path(inside).resolve()
        if folder not in target.parents:
            raise InputError(path, f"is a symlink to {target}, outside {folder}; copy the file in instead")
    return path


def read_bytes(path, limit: int = MAX_CONFIG_BYTES, inside=None) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes."""
    path = regular_file(path, inside)
    try:
        # O_NONBLOCK: if the file was swapped for a FIFO since the check, open does not hang
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise InputError(path, f"cannot be read ({e.strerror or e})") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputError(path, "is not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise InputError(path, f"is larger than {limit:,} bytes; this is not a config file")
    return data


def read_text(path, limit: int = MAX_CONFIG_BYTES, inside=None) -> str:
    try:
        return read_bytes(path, limit, inside).decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(path, f"not UTF-8 text (byte {e.start + 1}); save it as UTF-8") from None


def loads_json(text: str, path):
    """``json.loads`` whose every failure is one :class:`InputError` naming ``path``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(path, f"line {e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    except RecursionError:
        raise InputError(path, "JSON nested too deeply to read; a config is a few levels deep") from None


def read_json_object(path, inside=None) -> dict:
    """A JSON object from a regular file (bounded size and depth)."""
    data = loads_json(read_text(path, inside=inside), path)
    if not isinstance(data, dict):
        raise InputError(path, f"expected a JSON object, got {type(data).__name__}")
    return data


def _expanded_size(node, path) -> int:
    """Nodes in the YAML tree with every alias expanded; shared nodes are counted once per use."""
    sizes: dict[int, int] = {}
    busy: set[int] = set()

    def size(n) -> int:
        if id(n) in sizes:
            return sizes[id(n)]
        if id(n) in busy:
            raise InputError(path, "YAML alias refers to itself (a recursive structure)")
        busy.add(id(n))
        total = 1
        if isinstance(n, yaml.SequenceNode):
            total += sum(size(c) for c in n.value)
        elif isinstance(n, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in n.value)
        busy.discard(id(n))
        sizes[id(n)] = total = min(total, MAX_YAML_NODES + 1)
        return total

    return size(node)


def load_yaml(text: str, path):
    """``yaml.safe_load`` with alias expansion and nesting bounded. ``yaml.YAMLError`` passes
    through (the caller reports its line)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, path) > MAX_YAML_NODES:
            raise InputError(
                path, f"YAML expands to more than {MAX_YAML_NODES:,} values (aliases repeated); not a config"
            )
        return loader.construct_document(node)
    except RecursionError:
        raise InputError(path, "YAML nested too deeply to read; a config is a few levels deep") from None
    finally:
        loader.dispose()


# bytes per element of each safetensors dtype
SAFETENSORS_DTYPES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
}


def check_safetensors(path) -> dict:
    """Check a safetensors file's header before MLX reads it; returns the header.

    The header must be a JSON object of ``name -> {dtype, shape, data_offsets}`` whose
    byte ranges lie inside the file and match the shapes; ``__metadata__`` maps strings
    to strings.
    """
    path = regular_file(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError(path, "cannot read safetensors: shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise InputError(path, f"cannot read safetensors: header length {n} does not fit the file")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        raise InputError(path, "cannot read safetensors: the header is not UTF-8 JSON") from None
    if not isinstance(header, dict):
        raise InputError(path, "cannot read safetensors: the header is not a JSON object")
    data_size = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            if entry is not None and not (
                isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())
            ):
                raise InputError(path, "cannot read safetensors: __metadata__ must map strings to strings")
            continue
        _check_entry(path, name, entry, data_size)
    return header


def _check_entry(path, name: str, entry, data_size: int) -> None:
    def bad(why):
        raise InputError(path, f"cannot read safetensors: Tensor {repr(name)[:60]} {why}")

    if not isinstance(entry, dict):
        bad("has a header entry that is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        bad(f"has an unknown dtype {repr(dtype)[:30]}")
    ints = lambda xs: (
        isinstance(xs, list)
        and all(  # noqa: E731
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in xs
        )
    )
    if not ints(shape) or len(shape) > 8:
        bad(f"has shape {repr(shape)[:60]}, not a list of at most 8 non-negative integers")
    if not ints(offsets) or len(offsets) != 2 or not offsets[0] <= offsets[1] <= data_size:
        bad(f"is incomplete or corrupt (data_offsets {repr(offsets)[:60]}; {data_size} data bytes)")
    if math.prod(shape) * SAFETENSORS_DTYPES[dtype] != offsets[1] - offsets[0]:
        bad(f"of shape {shape} and dtype {dtype} does not fit its {offsets[1] - offsets[0]} bytes")
