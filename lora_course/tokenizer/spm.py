"""The tokenizer: a thin SentencePiece wrapper, and a trainer for tiny BPE models.

Llama and Mistral checkpoints ship a SentencePiece BPE model (``tokenizer.model``;
Kudo & Richardson 2018, "SentencePiece", arXiv:1808.06226; BPE after Sennrich et al.
2016, arXiv:1508.07909). ``Tokenizer`` loads one and adds what fine-tuning needs:
bos/eos/pad ids, a chat template, byte offsets for loss masks (``data/datasets.py``) and a
streaming detokenizer for generation. ``train_tokenizer`` trains a BPE model whose
settings make ``decode(encode(s)) == s`` for ordinary text, indentation included.
Taught in notebook 04 (checkpoints, tokenizers and sampling); used in notebook 09.
"""

from __future__ import annotations

import codecs
import os
import re
from pathlib import Path

from lora_course import atomic
from lora_course.tokenizer.base import TokenizerError, read_chat_template, read_file, render_chat_template

import numpy as np
import sentencepiece as spm

SPACE = "\u2581"  # "▁": how SentencePiece writes a space inside a piece


class Tokenizer:
    """A SentencePiece model plus the special ids and chat template fine-tuning needs.

    ``Tokenizer(path)`` takes a ``tokenizer.model`` file or a folder holding one; a chat
    template beside it (``chat_template.jinja`` or ``tokenizer_config.json``) is read too.
    ``pad_id`` is the model's pad piece if it has one, else ``eos_id``, else 0. Padding
    must therefore be masked by sequence length, never by comparing ids with ``pad_id``.
    """

    def __init__(self, path: str | os.PathLike, chat_template: str | None = None):
        path = Path(path)
        if path.is_dir():
            folder, path = path, path / "tokenizer.model"
            if not path.is_file() and (folder / "tokenizer.json").is_file():
                raise TokenizerError(
                    f"{folder}: has tokenizer.json but no tokenizer.model; "
                    "lora_course reads SentencePiece tokenizers only"
                )
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tokenizer file not found")
        self._load(read_file(path), str(path))
        self.path = path
        self.chat_template = chat_template or read_chat_template(path.parent)

    @classmethod
    def from_bytes(cls, model_proto: bytes, chat_template: str | None = None) -> Tokenizer:
        """A tokenizer from the bytes of a ``tokenizer.model`` (nothing read from disk)."""
        self = cls.__new__(cls)
        self._load(model_proto, "<bytes>")
        self.path = None
        self.chat_template = chat_template
        return self

    def _load(self, proto: bytes, name: str) -> None:
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(proto)
        except RuntimeError:
            raise TokenizerError(
                f"{name}: not a SentencePiece model; pass the tokenizer.model that came with "
                "the checkpoint, or make one with lora_course.train_tokenizer"
            ) from None
        self._proto = proto
        # The special ids, read once: each call into SentencePiece costs microseconds.
        sp = self._sp
        self._bos = sp.bos_id() if sp.bos_id() >= 0 else None
        self._eos = sp.eos_id() if sp.eos_id() >= 0 else None
        self._pad = next((i for i in (sp.pad_id(), sp.eos_id()) if i >= 0), 0)
        self._unk = sp.unk_id()
        self._table: list[bytes] | None = None  # bytes per id, built on first use
        self._lengths: np.ndarray | None = None
        # SentencePiece may prepend a "dummy" space to every text; decode removes it again.
        pieces = self._sp.encode("a", out_type=str)
        self._dummy_prefix = bool(pieces) and pieces[0].startswith(SPACE)

    # -- ids and sizes
    @property
    def sp(self) -> spm.SentencePieceProcessor:  # the underlying SentencePieceProcessor
        return self._sp

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def eos_id(self) -> int | None:
        return self._eos

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends a generation; a SentencePiece model has one."""
        return () if self._eos is None else (self._eos,)

    @property
    def pad_id(self) -> int:
        """The pad piece, or eos when the model has none (as Llama), or 0."""
        return self._pad

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    # -- text <-> ids
    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos and self._bos is not None:
            ids.insert(0, self._bos)
        if eos and self._eos is not None:
            ids.append(self._eos)
        return ids

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return self._wrap(self._sp.encode(text), bos, eos)

    def encode_batch(self, texts: list[str], bos: bool = True, eos: bool = False) -> list[list[int]]:
        """``encode`` for many texts at once (SentencePiece runs them in C++ threads)."""
        return [self._wrap(ids, bos, eos) for ids in self._many(self._sp.encode, list(texts))]

    @staticmethod
    def _many(fn, items: list) -> list:
        # A batch call starts C++ threads (about 50 us), worth it only for many items.
        return fn(items) if len(items) >= 64 else [fn(x) for x in items]

    def decode(self, ids) -> str:
        """Text for ``ids`` (a list, NumPy or MLX array); bos/eos/pad decode to nothing."""
        # SentencePiece misreads NumPy integers, so hand it plain ints
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        return self._sp.decode(ids)

    def _piece_bytes(self) -> list[bytes]:
        """For every id, the exact bytes it stands for in the middle of a text."""
        if self._table is None:
            sp, table = self._sp, []
            for i in range(sp.get_piece_size()):
                piece = sp.id_to_piece(i)
                if sp.is_control(i):
                    table.append(b"")
                elif sp.is_byte(i):  # "<0x0A>"
                    table.append(bytes([int(piece[3:5], 16)]))
                elif sp.is_unknown(i):
                    table.append(" \u2047 ".encode())  # what SentencePiece prints for unk
                else:
                    table.append(piece.replace(SPACE, " ").encode())
            self._table = table
        return self._table

    def detokenizer(self, at_start: bool = True) -> StreamingDetokenizer:
        """A streaming decoder: feed ids one by one, get text as soon as it is complete."""
        return StreamingDetokenizer(self, at_start)

    def encode_with_offsets(
        self, text: str, bos: bool = True, eos: bool = False, special: bool = False
    ) -> tuple[list[int], np.ndarray, np.ndarray]:
        """``(ids, starts, ends)``: token j covers bytes ``starts[j]:ends[j]`` of
        ``text.encode()``; bos/eos cover nothing. With ``special=True`` the bos and eos
        pieces written in the text (``<s>``, ``</s>``, as chat templates do) become their ids.
        """
        return self.encode_batch_with_offsets([text], bos, eos, special)[0]

    def encode_batch_with_offsets(
        self, texts: list[str], bos: bool = True, eos: bool = False, special: bool = False
    ) -> list[tuple[list[int], np.ndarray, np.ndarray]]:
        """``encode_with_offsets`` for many texts, encoded in one threaded SentencePiece call."""
        specials = {self.id_to_piece(i): i for i in (self._bos, self._eos) if i is not None}
        split = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if special and specials else None
        texts_parts = [split.split(t) if split else [t] for t in texts]  # even: text, odd: special
        encoded = iter(self._offsets_batch([p for parts in texts_parts for p in parts[::2] if p]))
        out = []
        for parts in texts_parts:
            ids, starts, ends, pos = [], [], [], 0
            for k, part in enumerate(parts):
                size = len(part.encode("utf-8"))
                if k % 2:  # a special piece
                    ids.append(specials[part])
                    starts.append(np.array([pos]))
                    ends.append(np.array([pos + size]))
                elif part:
                    p_ids, p_starts, p_ends = next(encoded)
                    ids = p_ids if not ids else ids + p_ids
                    starts.append(p_starts + pos)
                    ends.append(p_ends + pos)
                pos += size
            if bos and self._bos is not None and (not ids or ids[0] != self._bos):
                ids.insert(0, self._bos)
                starts.insert(0, np.zeros(1, np.int64))
                ends.insert(0, np.zeros(1, np.int64))
            if eos and self._eos is not None:
                ids.append(self._eos)
                starts.append(np.array([pos]))
                ends.append(np.array([pos]))
            empty = np.zeros(0, np.int64)
            out.append(
                (
                    ids,
                    np.concatenate(starts or [empty]).astype(np.int64),
                    np.concatenate(ends or [empty]).astype(np.int64),
                )
            )
        return out

    def _offsets_batch(self, texts: list[str]) -> list[tuple[list[int], np.ndarray, np.ndarray]]:
        if not texts:
            return []
        if self._lengths is None:
            self._lengths = np.array([len(b) for b in self._piece_bytes()], dtype=np.int64)
        table = self._piece_bytes()
        all_ids = self._many(self._sp.encode, texts)
        out = []
        for text, ids, back in zip(texts, all_ids, self._many(self._sp.decode, all_ids)):
            lengths = self._lengths[ids]  # (n,) bytes per piece
            if self._dummy_prefix and ids and table[ids[0]].startswith(b" "):
                lengths[0] -= 1
            # Fast path: when decoding gives the text back (identity normalization, no
            # unk), every piece is exactly its own slice of the text.
            if back == text and self._unk not in ids and int(lengths.sum()) == len(text.encode("utf-8")):
                ends = np.cumsum(lengths)
                out.append((ids, ends - lengths, ends))
            else:  # normalizing models, unk pieces: ask SentencePiece for the spans
                proto = self._sp.encode(text, return_type="proto")
                out.append(
                    (
                        [p.id for p in proto.pieces],
                        np.array([p.begin for p in proto.pieces], np.int64),
                        np.array([p.end for p in proto.pieces], np.int64),
                    )
                )
        return out

    # -- chat
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """Render a conversation as one string.

        With a ``chat_template`` (Jinja, as in Hugging Face's tokenizer_config.json) it is
        rendered in a sandbox with ``messages``, ``add_generation_prompt``, ``bos_token`` and
        ``eos_token``. Without one, the default is one line per message,
        ``"{role}: {content}\\n"``, and the generation prompt is ``"assistant: "``.
        """
        if self.chat_template is None:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            return text + ("assistant: " if add_generation_prompt else "")
        piece = lambda i: self.id_to_piece(i) if i is not None else ""  # noqa: E731
        where = str(self.path.parent) if self.path else "<bytes>"  # (base.py: sandbox, limits)
        return render_chat_template(
            self.chat_template,
            where,
            messages=messages,
            bos_token=piece(self.bos_id),
            eos_token=piece(self.eos_id),
            add_generation_prompt=add_generation_prompt,
        )

    # -- disk
    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``tokenizer.model`` (and ``chat_template.jinja`` if set) atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic.write_bytes(folder / "tokenizer.model", self._proto)
        if self.chat_template is not None:
            atomic.write_text(folder / "chat_template.jinja", self.chat_template)
        return folder / "tokenizer.model"

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, path={str(self.path)!r})"


class StreamingDetokenizer:
    """Decode one id at a time in O(1): a byte table plus an incremental UTF-8 decoder.

    Decoding a growing id list again after every new token costs O(n) each time; this
    keeps the state instead. A character split over byte-fallback pieces comes out when
    its last byte arrives. ``"".join(pieces) + finalize()`` equals ``tokenizer.decode``.
    """

    def __init__(self, tokenizer: Tokenizer, at_start: bool = True):
        self._table = tokenizer._piece_bytes()
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._strip = tokenizer._dummy_prefix and at_start  # drop the dummy space once

    def add(self, token_id: int) -> str:
        b = self._table[int(token_id)]
        if self._strip and b:
            b, self._strip = (b[1:] if b.startswith(b" ") else b), False
        return self._utf8.decode(b)

    def finalize(self) -> str:
        return self._utf8.decode(b"", final=True)
