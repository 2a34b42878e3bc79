"""Datasets for fine-tuning: read jsonl, csv or txt, tokenize, mask the prompt.

``load_dataset(path, tokenizer)`` turns a folder (``train.jsonl`` required, ``valid.jsonl``
and ``test.jsonl`` optional), a single ``.jsonl``/``.csv``/``.txt`` file, or a folder of
``.txt`` files into ``DatasetSplits(train, valid, test)`` of ``TokenizedDataset``s. Each
sample is ``(tokens, mask)``: ``mask[j] == 1`` means token j carries loss when it is a
target; ``mask`` is None when every token does. Masking only the answer is the
instruction-tuning recipe of Ouyang et al. 2022 (arXiv:2203.02155) and of mlx-lm's
``--mask-prompt``. Taught in notebook 09 (data).

Formats and rules (every violation is a ``DatasetError`` naming the file and line):

- **jsonl**, one JSON object per line, shape detected per line and fixed per file:
  ``{"text": str}``, ``{"prompt": str, "completion": str}`` (tokenized as
  ``prompt + completion``, so put the separator you want in the prompt) or
  ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``,
  rendered by ``tokenizer.apply_chat_template``. Other keys are ignored. Text and
  completion must be non-empty. Blank lines are errors, not skipped: they usually mean
  a broken export. A UTF-8 byte-order mark is accepted.
- **csv** with a header row and a ``text_column``; blank rows are skipped.
- **txt**: one sample per non-blank line (``txt_mode="line"``), or per paragraph of
  non-blank lines (``"paragraph"``); a folder of ``.txt`` files is read in sorted order.

Every sample starts with BOS and (``add_eos``) ends with EOS. ``chunk_tokens`` cuts long
samples into chunks of at most that many tokens (each later chunk starts with BOS, only
the last has EOS; with a mask, chunks with nothing to learn are dropped). Samples still
longer than ``max_seq_length`` are truncated, with one warning that counts them.
``dedup`` drops repeated samples (after chunking), keeping the first.
"""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path
from typing import NamedTuple

from lora_course.data.records import (
    DatasetError,
    DatasetWarning,
    checked_file,
    csv_texts,
    jsonl_records,
    short,
    txt_texts,
)
from lora_course.tokenizer.spm import Tokenizer

import numpy as np

ROLES = ("system", "user", "assistant")


SPLITS = ("train", "valid", "test")


class TokenizedDataset:
    """Tokenized samples in two flat arrays; ``ds[i] -> (tokens, mask_or_None)``."""

    def __init__(self, samples: list[tuple[list[int], list[int] | None]], path=None):
        self.path = path
        self._lengths = np.array([len(t) for t, _ in samples], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(self._lengths)])  # sample i: [o[i], o[i+1])
        total = int(self._offsets[-1])
        self._tokens = np.fromiter(
            itertools.chain.from_iterable(t for t, _ in samples), dtype=np.int32, count=total
        )
        self._mask = None
        if any(m is not None for _, m in samples):  # None among masks means "all tokens"
            masks = (m if m is not None else [1] * len(t) for t, m in samples)
            self._mask = np.fromiter(itertools.chain.from_iterable(masks), np.uint8, count=total)

    def __len__(self) -> int:
        return len(self._lengths)

    def __getitem__(self, i: int) -> tuple[list[int], list[int] | None]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for a dataset of {len(self)}")
        i = i % len(self)
        a, b = self._offsets[i], self._offsets[i + 1]
        return self._tokens[a:b].tolist(), (None if self._mask is None else self._mask[a:b].tolist())

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def loss_tokens(self, max_seq_length: int) -> int:
        """Target tokens that carry loss once each sample is cut to ``max_seq_length``."""
        if self._mask is None:
            return int(np.maximum(np.minimum(self._lengths, max_seq_length) - 1, 0).sum())
        ends = self._offsets[:-1] + np.minimum(self._lengths, max_seq_length)  # target j is token j >= 1
        return sum(int(self._mask[a + 1 : b].sum()) for a, b in zip(self._offsets[:-1], ends))

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per sample (for length-bucketed batching)."""
        return self._lengths

    def __repr__(self) -> str:
        return (
            f"TokenizedDataset({len(self)} samples, {int(self._offsets[-1])} tokens, path={str(self.path)!r})"
        )


class DatasetSplits(NamedTuple):
    train: TokenizedDataset | None
    valid: TokenizedDataset | None
    test: TokenizedDataset | None


class _Sample(NamedTuple):
    text: str
    spans: list[tuple[int, int]]  # character spans that carry loss (empty: all of it)
    ends_with_target: bool  # does the appended EOS carry loss under mask_prompt?
    chat: bool  # rendered by a chat template (may contain <s>, </s>)


def _field(obj: dict, key: str, path, n, allow_empty=True) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise DatasetError(path, n, f"field {key!r} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate ("\ud800"): not text, and fatal to the tokenizer
        raise DatasetError(path, n, f"field {key!r} holds a lone surrogate {value[e.start]!r}") from None
    if not allow_empty and not value:
        raise DatasetError(path, n, f"field {key!r} is empty")
    return value


def _shape(obj, path, n, text_key: str) -> str:
    if not isinstance(obj, dict):
        raise DatasetError(path, n, f"expected a JSON object, got {type(obj).__name__}")
    found = [
        shape
        for shape, present in (
            ("chat", "messages" in obj),
            ("completion", "prompt" in obj or "completion" in obj),
            ("text", text_key in obj),
        )
        if present
    ]
    if not found:
        raise DatasetError(
            path,
            n,
            f"no {text_key!r}, 'prompt'/'completion' or 'messages' field "
            f"(keys: {short(', '.join(map(str, obj)) or 'none')})",
        )
    if len(found) > 1:
        raise DatasetError(path, n, f"ambiguous record: has {' and '.join(found)} fields; keep one")
    return found[0]


def _chat_spans(tok: Tokenizer, messages: list[dict], text: str) -> list[tuple[int, int]]:
    """Where each assistant turn sits in the rendered text, end-of-turn marker included."""
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tok.apply_chat_template(messages[:i], add_generation_prompt=True)
        upto = tok.apply_chat_template(messages[: i + 1])
        if upto.startswith(before) and text.startswith(upto):
            spans.append((len(before), len(upto)))
        else:  # a template that rewrites history: fall back to finding the content
            start = text.find(m["content"], cursor)
            if start < 0:
                raise ValueError("the chat template does not reproduce assistant content verbatim")
            spans.append((start, start + len(m["content"])))
        cursor = spans[-1][1]
    return spans


def _sample(obj, shape: str, path, n, tok: Tokenizer, text_key: str, mask_prompt: bool) -> _Sample:
    if shape == "text":
        return _Sample(_field(obj, text_key, path, n, allow_empty=False), [], True, False)
    if shape == "completion":
        for key in ("prompt", "completion"):
            if key not in obj:
                raise DatasetError(path, n, f"missing field {key!r} (prompt/completion record)")
        prompt = _field(obj, "prompt", path, n)
        completion = _field(obj, "completion", path, n, allow_empty=False)
        return _Sample(prompt + completion, [(len(prompt), len(prompt) + len(completion))], True, False)
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise DatasetError(
            path, n, "field 'messages' must be a non-empty list of {'role', 'content'} objects"
        )
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DatasetError(path, n, f"messages[{k}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DatasetError(
                path,
                n,
                f"messages[{k}] has unknown role {short(repr(m['role']))}; use one of {', '.join(ROLES)}",
            )
        _field(m, "content", path, n)
    if mask_prompt and not any(m["role"] == "assistant" for m in messages):
        raise DatasetError(path, n, "no assistant message, so nothing carries loss with mask_prompt")
    try:
        text = tok.apply_chat_template(messages)
        spans = _chat_spans(tok, messages, text) if mask_prompt else []
    except Exception as e:  # a template's raise_exception, or a Jinja error
        raise DatasetError(path, n, f"chat template failed: {e}") from None
    return _Sample(text, spans, messages[-1]["role"] == "assistant", tok.chat_template is not None)


def _tokenize(samples: list[_Sample], tok: Tokenizer, mask_prompt: bool, add_eos: bool):
    """(ids, mask or None) per sample. Texts go through SentencePiece in batches (it
    threads them); masked or templated ones also get byte offsets."""
    out: list = [None] * len(samples)
    plain = [i for i, s in enumerate(samples) if not s.chat and not (mask_prompt and s.spans)]
    for i, ids in zip(plain, tok.encode_batch([samples[i].text for i in plain], eos=add_eos)):
        out[i] = (ids, None)
    eos = tok.eos_id
    for special in (False, True):
        rows = [i for i, s in enumerate(samples) if out[i] is None and s.chat == special]
        encoded = tok.encode_batch_with_offsets([samples[i].text for i in rows], special=special)
        for i, (ids, starts, ends) in zip(rows, encoded):
            s, mask = samples[i], None
            if mask_prompt and s.spans:
                on = np.zeros(len(ids), dtype=bool)
                for a, b in s.spans:  # token j carries loss if its bytes overlap a target span
                    a, b = len(s.text[:a].encode("utf-8")), len(s.text[:b].encode("utf-8"))
                    on |= (ends > a) & (starts < b)
                mask = on.astype(np.uint8).tolist()
            if add_eos and eos is not None and ids[-1] != eos:
                ids.append(eos)
                mask = None if mask is None else mask + [int(s.ends_with_target)]
            out[i] = (ids, mask)
    return out


def _finish(pairs, bos, max_seq_length, chunk_tokens, dedup):
    """Chunk, truncate, de-duplicate. Returns (samples, number truncated)."""
    out, seen, truncated = [], set(), 0
    for ids, mask in pairs:
        pieces = [(ids, mask)]
        if chunk_tokens and len(ids) > chunk_tokens:
            pieces = [(ids[:chunk_tokens], mask and mask[:chunk_tokens])]
            for p in range(chunk_tokens, len(ids), chunk_tokens - 1):  # later chunks: BOS + C-1
                pieces.append(
                    ([bos, *ids[p : p + chunk_tokens - 1]], mask and [0, *mask[p : p + chunk_tokens - 1]])
                )
            if mask is not None:
                pieces = [(t, m) for t, m in pieces if any(m[1:])]
        for t, m in pieces:
            if len(t) > max_seq_length:
                t, m, truncated = t[:max_seq_length], m and m[:max_seq_length], truncated + 1
            if dedup:
                key = (tuple(t), None if m is None else tuple(m))
                if key in seen:
                    continue
                seen.add(key)
            out.append((t, m))
    return out, truncated


def _read(path: Path, tok, text_column, txt_mode, mask_prompt) -> list[_Sample]:
    """All samples of one file, or of a folder of .txt files."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        samples = [_Sample(t, [], True, False) for f in files for _, t in txt_texts(f, txt_mode)]
        if not samples:
            raise DatasetError(
                path,
                0,
                "no train.jsonl and no text in any .txt file here; "
                "give a folder with train.jsonl or with non-empty .txt files",
            )
        return samples
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        samples, first_shape = [], None
        for n, obj in jsonl_records(path):
            shape = _shape(obj, path, n, text_column)
            first_shape = first_shape or (shape, n)
            if shape != first_shape[0]:
                raise DatasetError(
                    path,
                    n,
                    f"mixed formats: this line is {shape} but line "
                    f"{first_shape[1]} is {first_shape[0]}; use one format per file",
                )
            samples.append(_sample(obj, shape, path, n, tok, text_column, mask_prompt))
    elif suffix == ".csv":
        samples = []
        for n, text in csv_texts(path, text_column):
            if not text:
                raise DatasetError(path, n, f"empty cell in column {text_column!r}")
            samples.append(_Sample(text, [], True, False))
    elif suffix == ".txt":
        samples = [_Sample(t, [], True, False) for _, t in txt_texts(path, txt_mode)]
    else:
        raise DatasetError(path, 0, f"unknown file type {suffix!r}; use .jsonl, .csv or .txt")
    if not samples:
        raise DatasetError(path, 0, "empty file; it holds no samples")
    return samples


def load_dataset(
    path,
    tokenizer: Tokenizer,
    max_seq_length: int = 2048,
    mask_prompt: bool = False,
    text_column: str = "text",
    txt_mode: str = "line",
    chunk_tokens: int | None = None,
    dedup: bool = False,
    add_eos: bool = True,
) -> DatasetSplits:
    """Read, validate and tokenize a dataset (the formats are in the module docstring).

    A folder with ``train.jsonl`` gives all three splits (missing ones are None); anything
    else gives ``DatasetSplits(train=..., valid=None, test=None)``.
    """
    if txt_mode not in ("line", "paragraph"):
        raise ValueError(f"txt_mode must be 'line' or 'paragraph', got {txt_mode!r}")
    if chunk_tokens is not None and chunk_tokens < 2:
        raise ValueError(f"chunk_tokens must be at least 2 (BOS and one token), got {chunk_tokens}")
    if max_seq_length < 1:
        raise ValueError(f"max_seq_length must be positive, got {max_seq_length}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    files = {"train": path}
    if path.is_dir() and any((path / f"{s}.jsonl").exists() for s in SPLITS):
        files = {s: path / f"{s}.jsonl" for s in SPLITS if (path / f"{s}.jsonl").exists()}
        if "train" not in files:
            raise DatasetError(path, 0, "has valid/test.jsonl but no train.jsonl")
        for file in files.values():  # regular files, and no symlink out of the dataset folder
            checked_file(file, inside=path)
    splits, truncated = {}, {}
    for split, file in files.items():
        samples = _read(file, tokenizer, text_column, txt_mode, mask_prompt)
        pairs = _tokenize(samples, tokenizer, mask_prompt, add_eos)
        pairs, truncated[file.name] = _finish(pairs, tokenizer.bos_id, max_seq_length, chunk_tokens, dedup)
        splits[split] = TokenizedDataset(pairs, path=file)
    if sum(truncated.values()):
        where = ", ".join(f"{name}: {k}" for name, k in truncated.items() if k)
        warnings.warn(
            f"truncated {sum(truncated.values())} samples longer than max_seq_length="
            f"{max_seq_length} tokens ({where}); raise max_seq_length or set chunk_tokens",
            DatasetWarning,
            stacklevel=2,
        )
    return DatasetSplits(*(splits.get(s) for s in SPLITS))
