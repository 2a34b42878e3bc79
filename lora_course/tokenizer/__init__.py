"""Tokenizers: SentencePiece models, with the special ids and chat template fine-tuning needs.

Taught in notebook 04 (checkpoints, tokenizers and sampling).
"""

from lora_course.tokenizer.spm import StreamingDetokenizer, Tokenizer, TokenizerError, train_tokenizer

__all__ = [
    "StreamingDetokenizer",
    "Tokenizer",
    "TokenizerError",
    "train_tokenizer",
]
