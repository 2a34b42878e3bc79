"""Training a tiny SentencePiece BPE tokenizer whose ``decode(encode(s)) == s``.

BPE after Sennrich et al. 2016 (arXiv:1508.07909), trained with SentencePiece (Kudo &
Richardson 2018, arXiv:1808.06226) with settings that keep ordinary text, indentation
included, lossless. The course's base model uses one. Taught in notebooks 04 and 12.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

from lora_course import atomic
from lora_course.tokenizer.spm import Tokenizer

import sentencepiece as spm

# Settings for decode(encode(s)) == s on ordinary text (the reasons are in notebook 04).
TRAIN_DEFAULTS = dict(
    model_type="bpe",
    normalization_rule_name="identity",  # no NFKC: keep every character as written
    remove_extra_whitespaces=False,  # keep indentation and repeated spaces
    byte_fallback=True,  # unseen characters become UTF-8 byte pieces
    split_digits=True,  # numbers as single digits
    allow_whitespace_only_pieces=True,  # "▁▁▁▁" for indentation
    character_coverage=1.0,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,  # Llama's layout
    num_threads=1,  # deterministic and polite on small machines
    minloglevel=2,  # quiet
)


def _is_file_list(source) -> bool:
    if isinstance(source, (str, os.PathLike)):
        return True
    if isinstance(source, (list, tuple)) and source:
        return all(isinstance(s, os.PathLike) or (isinstance(s, str) and os.path.isfile(s)) for s in source)
    return False


def train_tokenizer(
    text_files_or_iterator, vocab_size: int, model_prefix: str | os.PathLike | None, **kw
) -> Tokenizer:
    """Train a BPE SentencePiece model and return it as a ``Tokenizer``.

    ``text_files_or_iterator`` is a path, a list of paths (``Path`` objects or names of
    existing files), or any iterable of text strings (works offline, nothing is read from
    disk). Writes ``{model_prefix}.model`` atomically unless ``model_prefix`` is None.
    ``kw`` overrides ``TRAIN_DEFAULTS`` (any ``spm.SentencePieceTrainer`` option).
    """
    options = {**TRAIN_DEFAULTS, **kw, "vocab_size": vocab_size}
    if _is_file_list(text_files_or_iterator):
        files = text_files_or_iterator
        files = [files] if isinstance(files, (str, os.PathLike)) else files
        options["input"] = ",".join(os.fspath(f) for f in files)
    else:
        options["sentence_iterator"] = (str(s) for s in text_files_or_iterator)
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(model_writer=buffer, **options)
    except RuntimeError as e:  # e.g. "Vocabulary size too high (500). Please set it to ..."
        reason = re.sub(r"^.*?\] ", "", str(e).strip().splitlines()[-1])  # drop the C++ location
        raise ValueError(f"train_tokenizer: {reason}") from None
    tokenizer = Tokenizer.from_bytes(buffer.getvalue())
    if model_prefix is not None:
        path = Path(f"{os.fspath(model_prefix)}.model")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_bytes(path, buffer.getvalue())
        tokenizer.path = path
    return tokenizer
