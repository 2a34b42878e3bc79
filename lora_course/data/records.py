"""Reading dataset files line by line: jsonl records, csv rows, txt lines or paragraphs.

Each reader yields ``(line number, value)`` so that every later error can name the
file and the line. Taught in notebook 09 (data).
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from lora_course.safe_io import InputError, regular_file


def short(text: str, limit: int = 60) -> str:
    """``text`` cut to ``limit`` characters: a 10 MB bad value must not become the message."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


class DatasetError(ValueError):
    """Bad training data; ``.path`` and ``.line`` say where (line 0: the whole file)."""

    def __init__(self, path, line: int, message: str):
        self.path, self.line = str(path), line
        text = f"{path}:{line}: {message}" if line else f"{path}: {message}"
        # one line whatever the data held: a key or value may carry its own line breaks
        super().__init__(text.replace("\r", "\\r").replace("\n", "\\n"))


class DatasetWarning(UserWarning):
    """Data was changed on the way in (truncated samples)."""


def checked_file(path: Path, inside=None) -> Path:
    """``path`` if it is a regular file (no directory, FIFO or device such as /dev/zero),
    and with ``inside`` not a symlink out of that folder."""
    try:
        return regular_file(path, inside)
    except InputError as e:
        raise DatasetError(path, 0, e.reason) from None


def numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) with strict UTF-8, streaming; a leading BOM is dropped."""
    checked_file(path)
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DatasetError(
                    path,
                    n,
                    f"not UTF-8 (byte {raw[e.start : e.start + 1]!r} at "
                    f"column {e.start + 1}); re-save the file as UTF-8",
                ) from None
            yield n, (line[1:] if n == 1 and line.startswith("\ufeff") else line)


def jsonl_records(path: Path) -> Iterator[tuple[int, object]]:
    for n, line in numbered_lines(path):
        if not line.strip():
            raise DatasetError(
                path, n, "blank line; a .jsonl file holds one JSON object per line, delete the blank line"
            )
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(path, n, f"malformed JSON: {e.msg} (column {e.colno})") from None
        except RecursionError:
            raise DatasetError(
                path, n, "JSON nested too deeply to read; a record is a few levels deep"
            ) from None


def csv_texts(path: Path, column: str) -> Iterator[tuple[int, str]]:
    lines = (line for _, line in numbered_lines(path))
    old_limit = csv.field_size_limit(sys.maxsize)  # long documents are fine in a cell
    try:
        reader = csv.reader(lines, strict=True)  # bad quoting is an error, not a guess
        try:
            header = next(reader)
        except StopIteration:
            raise DatasetError(path, 0, "empty file; expected a header row") from None
        if column not in header:
            raise DatasetError(
                path,
                1,
                f"no column {column!r} (columns: {short(', '.join(header))}); "
                "pass text_column= to choose one",
            )
        col, start = header.index(column), reader.line_num + 1
        for row in reader:
            if row and len(row) <= col:
                raise DatasetError(
                    path, start, f"row has {len(row)} cells, column {column!r} is cell {col + 1}"
                )
            if row:
                yield start, row[col]
            start = reader.line_num + 1
    except csv.Error as e:
        raise DatasetError(path, reader.line_num, f"bad CSV ({e})") from None
    finally:
        csv.field_size_limit(old_limit)


def txt_texts(path: Path, mode: str) -> Iterator[tuple[int, str]]:
    para, first = [], 0
    for n, line in numbered_lines(path):
        line = line.rstrip("\r\n")
        if mode == "line" and line.strip():
            yield n, line
        elif mode == "paragraph" and line.strip():
            para, first = para + [line], first or n
        elif para:
            yield first, "\n".join(para)
            para, first = [], 0
    if para:
        yield first, "\n".join(para)
