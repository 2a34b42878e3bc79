"""Hugging Face ``tokenizer.json`` tokenizers, with the interface of ``Tokenizer``.

Llama 3, Qwen2, Mistral and most checkpoints of today ship a ``tokenizer.json`` (the
serialized pipeline of the Hugging Face ``tokenizers`` library: normalizer,
pre-tokenizer, model, post-processor, decoder) instead of, or beside, a SentencePiece
``tokenizer.model``. Many use byte-level BPE (GPT-2, Radford et al. 2019): text is
split by a regex, every UTF-8 byte becomes one of 256 printable characters, and BPE
merges run on those. ``HFTokenizer`` loads such a folder and reproduces what
``transformers.AutoTokenizer`` does with it: the checkpoint's BOS/EOS policy, its
special tokens, its chat template; ``load_tokenizer`` picks the right class for a
folder. Taught in notebook 04 (checkpoints, tokenizers and sampling).
"""

from __future__ import annotations

import os
from pathlib import Path

from lora_course import atomic
from lora_course.tokenizer.base import (
    TokenizerError,
    read_chat_template,
    read_file,
    read_json_object,
    render_chat_template,
)

import numpy as np
from tokenizers import Tokenizer as RustTokenizer
from tokenizers.decoders import DecodeStream

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _token_text(value, path: Path, key: str) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is None or isinstance(value, str):
        return value
    raise TokenizerError(
        f"{path}: key {key!r} must be a string or an AddedToken object "
        f"with a 'content' string, got {type(value).__name__}"
    )


def _char_to_byte(text: str) -> np.ndarray:
    """``(len(text) + 1,)`` byte position of every character boundary in ``text.encode()``."""
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    widths = 1 + (cps >= 0x80).astype(np.int64) + (cps >= 0x800) + (cps >= 0x10000)
    return np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)


class HFTokenizer:
    """A ``tokenizer.json`` tokenizer with ``Tokenizer``'s interface (see the module doc).

    ``encode(text)`` gives ``AutoTokenizer(text).input_ids``: special tokens written in
    the text become their ids, and tokenizer.json's post-processor decides what surrounds
    the text (Llama 3: BOS; Qwen2: nothing). ``bos=True/False`` and ``eos=True/False``
    override that policy. ``eos_ids`` holds every id that ends generation (generation_config.json
    may list several, as Llama 3 does with ``<|end_of_text|>`` and ``<|eot_id|>``).
    """

    def __init__(self, folder: str | os.PathLike):
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tokenizer file not found")
        try:
            self._tok = RustTokenizer.from_str(read_file(path).decode("utf-8"))
        except Exception as e:  # the Rust parser's message names the JSON field and column
            raise TokenizerError(
                f"{path}: not a Hugging Face tokenizer.json ({str(e).splitlines()[0]})"
            ) from None
        config_path = folder / "tokenizer_config.json"
        self._setup(
            path,
            read_json_object(config_path),
            read_json_object(folder / "generation_config.json"),
            read_json_object(folder / "special_tokens_map.json"),
        )
        self.chat_template = read_chat_template(folder)

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer: RustTokenizer,
        config: dict,
        generation_config: dict | None = None,
        chat_template: str | None = None,
    ) -> HFTokenizer:
        """An ``HFTokenizer`` from a ``tokenizers.Tokenizer`` and the dicts that would be
        tokenizer_config.json and generation_config.json (nothing read from disk)."""
        self = cls.__new__(cls)
        self._tok = tokenizer
        self._setup(None, config, generation_config or {}, {})
        self.chat_template = chat_template
        return self

    def _setup(self, path: Path | None, config: dict, generation: dict, specials_map: dict) -> None:
        self.path = path
        folder = Path("<memory>") if path is None else path.parent
        config_path = folder / "tokenizer_config.json"
        self._config, self._generation = config, generation
        self._specials: dict[str, str] = {}
        for key in SPECIAL_KEYS:  # tokenizer_config.json first; special_tokens_map.json fills gaps
            where, value = config_path, config.get(key)
            if value is None:
                where, value = folder / "special_tokens_map.json", specials_map.get(key)
            text = _token_text(value, where, key)
            if text is not None:
                if self._tok.token_to_id(text) is None:
                    raise TokenizerError(f"{where}: {key} {text!r} is not in the tokenizer's vocabulary")
                self._specials[key] = text
        self._set_policy()
        self._set_eos_ids(folder / "generation_config.json")
        self._literal: RustTokenizer | None = None  # a copy that reads special tokens as text

    def special_id(self, key: str) -> int | None:
        """The id of ``bos_token``, ``eos_token``, ``unk_token`` or ``pad_token``, if set."""
        text = self._specials.get(key)
        return None if text is None else self._tok.token_to_id(text)

    @property
    def backend(self) -> RustTokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def added_around(self) -> tuple[list[int], list[int]]:
        """The ids ``encode`` puts before and after every text by default."""
        return list(self._prefix), list(self._suffix)

    def _set_policy(self) -> None:
        """The ids the checkpoint puts before and after every text (BOS, EOS, or none).

        tokenizer.json's post-processor decides, as in transformers 5, which ignores
        ``add_bos_token``/``add_eos_token`` in tokenizer_config.json once a tokenizer.json
        exists (transformers 4 wrote those flags into the post-processor when saving).
        We find what it adds around a known text rather than parse its many JSON forms.
        """
        plain = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a", add_special_tokens=True).ids
        k = next((i for i in range(len(full)) if full[i : i + len(plain)] == plain), 0)
        self._prefix, self._suffix = full[:k], full[k + len(plain) :]

    def _set_eos_ids(self, gen_path: Path) -> None:
        ids = [] if self.eos_id is None else [self.eos_id]
        declared = self._generation.get("eos_token_id")
        declared = [declared] if isinstance(declared, int) else declared
        if declared is not None and not (
            isinstance(declared, list) and all(type(i) is int for i in declared)
        ):
            raise TokenizerError(f"{gen_path}: key 'eos_token_id' must be an integer or a list of integers")
        self._eos_ids = tuple(dict.fromkeys(ids + list(declared or [])))

    # -- ids and sizes
    @property
    def vocab_size(self) -> int:
        """Every id the tokenizer can produce, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self.special_id("bos_token")

    @property
    def eos_id(self) -> int | None:
        eos = self.special_id("eos_token")
        return eos if eos is not None else (self._eos_ids[0] if getattr(self, "_eos_ids", ()) else None)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends a generation: eos_token, then generation_config.json's list."""
        return self._eos_ids

    @property
    def pad_id(self) -> int:
        """The pad token, or eos when the checkpoint has none, or 0. Mask padding by length."""
        return next((i for i in (self.special_id("pad_token"), self.eos_id) if i is not None), 0)

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i))

    # -- text <-> ids
    def _wrap(self, ids: list[int], bos: bool | None, eos: bool | None) -> list[int]:
        head = self._prefix if bos is None else ([self.bos_id] if bos and self.bos_id is not None else [])
        tail = self._suffix if eos is None else ([self.eos_id] if eos and self.eos_id is not None else [])
        return [*head, *ids, *tail] if head or tail else ids

    def encode(self, text: str, bos: bool | None = None, eos: bool | None = None) -> list[int]:
        """Ids for ``text``; ``None`` for bos/eos means "as the checkpoint does"."""
        return self._wrap(self._tok.encode(text, add_special_tokens=False).ids, bos, eos)

    def encode_batch(
        self, texts: list[str], bos: bool | None = None, eos: bool | None = None
    ) -> list[list[int]]:
        """``encode`` for many texts at once (the Rust library runs them in threads)."""
        encoded = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
        return [self._wrap(e.ids, bos, eos) for e in encoded]

    def decode(self, ids) -> str:
        """Text for ``ids`` (a list, NumPy or MLX array); special tokens are kept, as in transformers."""
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        return self._tok.decode(ids, skip_special_tokens=False)

    def detokenizer(self, at_start: bool = True) -> HFStreamingDetokenizer:
        """A streaming decoder: feed ids one by one, get text once it is whole characters."""
        return HFStreamingDetokenizer(self, at_start)

    def encode_with_offsets(
        self, text: str, bos: bool | None = None, eos: bool | None = None, special: bool = False
    ) -> tuple[list[int], np.ndarray, np.ndarray]:
        """``(ids, starts, ends)``: token j covers bytes ``starts[j]:ends[j]`` of
        ``text.encode()``; added bos/eos cover nothing. Special tokens written in the text
        become their ids only with ``special=True`` (as chat templates need); otherwise
        they are read as plain text.
        """
        return self.encode_batch_with_offsets([text], bos, eos, special)[0]

    def encode_batch_with_offsets(
        self, texts: list[str], bos: bool | None = None, eos: bool | None = None, special: bool = False
    ) -> list[tuple[list[int], np.ndarray, np.ndarray]]:
        """``encode_with_offsets`` for many texts in one threaded call."""
        if special:
            tok = self._tok
        else:
            if self._literal is None:
                self._literal = RustTokenizer.from_str(self._tok.to_str())
                self._literal.encode_special_tokens = True
            tok = self._literal
        out = []
        for text, enc in zip(texts, tok.encode_batch(list(texts), add_special_tokens=False)):
            ids = list(enc.ids)
            spans = np.array(enc.offsets, dtype=np.int64).reshape(-1, 2)  # (n, 2) character offsets
            byte_at = _char_to_byte(text)
            starts, ends = byte_at[spans[:, 0]], byte_at[spans[:, 1]]
            head = self._wrap([], bos, None)
            if ids and head and ids[: len(head)] == head:
                head = []  # the text already starts with BOS (a chat template wrote it)
            tail = self._wrap([], False, eos)
            end = np.full(len(tail), byte_at[-1], np.int64)
            out.append(
                (
                    [*head, *ids, *tail],
                    np.concatenate([np.zeros(len(head), np.int64), starts, end]),
                    np.concatenate([np.zeros(len(head), np.int64), ends, end]),
                )
            )
        return out

    # -- chat
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """Render a conversation as transformers' ``apply_chat_template(tokenize=False)`` does.

        Without a template, one line per message, ``"{role}: {content}\\n"``, as ``Tokenizer``.
        """
        if self.chat_template is None:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            return text + ("assistant: " if add_generation_prompt else "")
        folder = Path("<memory>") if self.path is None else self.path.parent
        source = folder / (
            "chat_template.jinja" if (folder / "chat_template.jinja").is_file() else "tokenizer_config.json"
        )
        return render_chat_template(
            self.chat_template,
            str(source),
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            **self._specials,
        )

    # -- disk
    def save(self, folder: str | os.PathLike) -> Path:
        """Write tokenizer.json, tokenizer_config.json, chat_template.jinja and (for a list
        of EOS ids) generation_config.json, atomically; ``HFTokenizer(folder)`` reads them back."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic.write_text(folder / "tokenizer.json", self._tok.to_str())
        config = {k: v for k, v in self._config.items() if k != "chat_template"}
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        config.update(self._specials)
        if isinstance(self._config.get("chat_template"), list):
            config["chat_template"] = self._config["chat_template"]
        elif self.chat_template is not None:
            atomic.write_text(folder / "chat_template.jinja", self.chat_template)
        atomic.write_json(folder / "tokenizer_config.json", config)
        if self._generation or len(self._eos_ids) > 1:
            atomic.write_json(
                folder / "generation_config.json", {**self._generation, "eos_token_id": list(self._eos_ids)}
            )
        return folder / "tokenizer.json"

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, path={str(self.path)!r})"


class HFStreamingDetokenizer:
    """Decode one id at a time with the library's ``DecodeStream``.

    A byte-level BPE token can hold part of a UTF-8 character (an emoji is 4 bytes, often
    2 tokens); the stream holds such bytes back until the character is whole.
    ``"".join(pieces) + finalize()`` equals ``tokenizer.decode`` of the same ids.
    """

    def __init__(self, tokenizer: HFTokenizer, at_start: bool = True):
        self._tok, self._ids, self._emitted = tokenizer._tok, [], []
        # Mid-text, prime the stream with a token so a leading space is not stripped as at a start.
        self._prime = [] if at_start else tokenizer._tok.encode("a", add_special_tokens=False).ids
        self._stream = DecodeStream(ids=self._prime or None, skip_special_tokens=False)

    def add(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        piece = self._stream.step(self._tok, int(token_id)) or ""
        self._emitted.append(piece)
        return piece

    def finalize(self) -> str:
        """What the stream still holds back: bytes of an unfinished character decode as U+FFFD."""
        done = "".join(self._emitted)
        full = self._tok.decode(self._prime + self._ids, skip_special_tokens=False)
        prefix = self._tok.decode(self._prime, skip_special_tokens=False)
        full = full[len(prefix) :] if self._prime else full
        return full[len(done) :] if full.startswith(done) else ""
