"""Which tokenizer a checkpoint folder holds: ``tokenizer.json`` or ``tokenizer.model``.

Taught in notebook 04 (checkpoints, tokenizers and sampling).
"""

from __future__ import annotations

import os
from pathlib import Path

from lora_course.tokenizer.base import TokenizerError
from lora_course.tokenizer.hf import HFTokenizer
from lora_course.tokenizer.spm import Tokenizer


def load_tokenizer(folder: str | os.PathLike) -> HFTokenizer | Tokenizer:
    """The tokenizer of a checkpoint folder: ``tokenizer.json`` when present (what
    ``AutoTokenizer`` loads by default), else SentencePiece's ``tokenizer.model``."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        return HFTokenizer(folder)
    if (folder / "tokenizer.model").is_file():
        return Tokenizer(folder / "tokenizer.model")
    raise TokenizerError(
        f"{folder}: no tokenizer.json or tokenizer.model; copy the tokenizer files "
        "that came with the checkpoint into this folder"
    )
