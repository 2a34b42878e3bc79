"""Tokenizers: SentencePiece models, with the special ids and chat template fine-tuning needs.

Taught in notebook 04 (checkpoints, tokenizers and sampling).
"""

from lora_course.tokenizer.base import TokenizerError, render_chat_template
from lora_course.tokenizer.hf import HFTokenizer
from lora_course.tokenizer.load import load_tokenizer
from lora_course.tokenizer.spm import StreamingDetokenizer, Tokenizer
from lora_course.tokenizer.train import train_tokenizer

__all__ = [
    "StreamingDetokenizer",
    "Tokenizer",
    "TokenizerError",
    "train_tokenizer",
    "HFTokenizer",
    "load_tokenizer",
    "render_chat_template",
]
