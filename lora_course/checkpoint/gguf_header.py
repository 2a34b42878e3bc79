"""The header of a GGUF file (llama.cpp's single-file format), parsed in plain Python.

A GGUF file starts with the magic ``GGUF``, a version, the tensor and metadata counts,
then every metadata key/value and every tensor's name, shape and ggml type, before
any tensor data. ``read_header`` reads exactly that part, checking each count and
length against the file size, so a damaged or hostile file is refused with one line
naming it before MLX maps a byte of it. Taught in notebook 15 (bring your own model).
"""

from __future__ import annotations

import struct
from pathlib import Path

from lora_course.checkpoint.files import CheckpointError

GGUF_MAGIC = b"GGUF"
STRING, ARRAY = 8, 9  # the two metadata value types that are not plain numbers


# ggml tensor type ids (ggml.h, enum ggml_type) -> name
GGML_TYPES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    6: "Q5_0",
    7: "Q5_1",
    8: "Q8_0",
    9: "Q8_1",
    10: "Q2_K",
    11: "Q3_K",
    12: "Q4_K",
    13: "Q5_K",
    14: "Q6_K",
    15: "Q8_K",
    16: "IQ2_XXS",
    17: "IQ2_XS",
    18: "IQ3_XXS",
    19: "IQ1_S",
    20: "IQ4_NL",
    21: "IQ3_S",
    22: "IQ2_S",
    23: "IQ4_XS",
    24: "I8",
    25: "I16",
    26: "I32",
    27: "I64",
    28: "F64",
    29: "IQ1_M",
    30: "BF16",
}


KEPT_QUANTIZED = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}  # type -> bits; MLX keeps these packed


GROUP_SIZE = 32  # all three quantize blocks of 32 weights


MLX_TO_F16 = {"Q2_K", "Q4_K", "Q6_K", "BF16"}  # mx.load de-quantizes these to float16


READABLE = {"F32", "F16"} | set(KEPT_QUANTIZED) | MLX_TO_F16


# GGUF metadata value types (gguf.md, enum gguf_metadata_value_type): id -> struct format
SCALAR = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}


class _Reader:
    """Little-endian reads from the header bytes; running past the end is a truncated file."""

    def __init__(self, f, path: Path, size: int):
        self.f, self.path, self.size = f, path, size

    def take(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise CheckpointError(f"{self.path}: GGUF header is truncated at byte {self.f.tell()}")
        return data

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def count(self, what: str) -> int:
        n = self.unpack("<Q")
        if n > self.size:  # each item takes at least a byte: a bigger count is corruption
            raise CheckpointError(f"{self.path}: GGUF header claims {n} {what}; the file is corrupt")
        return n

    def string(self) -> str:
        raw = self.take(self.count("string bytes"))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(
                f"{self.path}: GGUF header holds a string that is not UTF-8 at byte {self.f.tell()}"
            ) from None

    def value(self, kind: int, key: str):
        if kind in SCALAR:
            return self.unpack(SCALAR[kind])
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            inner, n = self.unpack("<I"), self.count(f"items in '{key}'")
            if inner in SCALAR and inner != 7:  # numbers: one read, not n
                fmt = SCALAR[inner]
                return list(struct.unpack(f"<{n}{fmt[1]}", self.take(n * struct.calcsize(fmt))))
            return [self.value(inner, key) for _ in range(n)]
        raise CheckpointError(f"{self.path}: metadata key '{key}' has unknown value type {kind}")


def read_header(path) -> tuple[dict, dict[str, tuple[tuple[int, ...], str]]]:
    """``(metadata, tensors)`` of a GGUF file without reading tensor data.

    ``tensors`` maps each name to ``(shape, type)`` with the shape row-major as MLX
    reports it (GGUF lists dimensions innermost first) and the type a name like "Q4_0".
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        f = open(path, "rb")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open ({e.strerror})") from None
    with f:
        r = _Reader(f, path, size)
        if f.read(4) != GGUF_MAGIC:
            raise CheckpointError(f"{path}: not a GGUF file (it does not start with 'GGUF')")
        version = r.unpack("<I")
        if version not in (2, 3):
            raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = r.count("tensors"), r.count("metadata keys")
        metadata = {}
        for _ in range(n_kv):
            key = r.string()
            metadata[key] = r.value(r.unpack("<I"), key)
        tensors = {}
        for _ in range(n_tensors):
            name = r.string()
            ndim = r.unpack("<I")
            if not 1 <= ndim <= 4:
                raise CheckpointError(f"{path}: tensor '{name}' has {ndim} dimensions (GGUF allows 1-4)")
            dims = [r.unpack("<Q") for _ in range(ndim)]
            kind = r.unpack("<I")
            r.unpack("<Q")  # offset into the data section: mx.load follows it
            tensors[name] = (tuple(reversed(dims)), GGML_TYPES.get(kind, f"type {kind}"))
    return metadata, tensors
