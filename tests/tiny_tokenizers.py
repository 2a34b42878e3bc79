"""Tiny tokenizer folders in the layouts real checkpoints ship, built offline in seconds.

``llama3_folder``: byte-level BPE (tokenizer.json) with Llama 3's special tokens, a BOS
post-processor, a Llama-3-style chat template and a list of EOS ids in
generation_config.json. ``sentencepiece_folder``: a SentencePiece BPE model as
transformers' ``LlamaTokenizerFast`` saves it (tokenizer.json only). ``qwen2_folder``:
byte-level BPE without BOS and a ChatML template. Each returns its folder.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = (
    "the quick brown fox jumps over lazy dog def return import self for in range "
    "if else print hello world model token train loss"
).split()

# Text that tokenizers get wrong first: unicode, emoji, code, runs of spaces, tabs, newlines.
TEXTS = [
    "Hello world",
    "the quick brown fox jumps over the lazy dog",
    "  leading and trailing spaces  ",
    "runs     of      spaces and\ttabs\t\tand\n\nnewlines\n",
    "def f(x):\n    if x:\n        return x ** 2\n    return 0\n",
    "café naïve über straße",
    "日本語のテキスト、中文文本。",
    "emoji 😀🎉👩‍👩‍👧 and ✨ sparkles",
    "numbers 1234567890 and 3.14159",
    "",
    " ",
    "{\"key\": [1, 2, 3], 'a': None}",
]


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]
    return lines + TEXTS * 3


LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN2_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
    r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # one digit per piece


def _byte_level_bpe(specials: list[str], vocab_size: int, split: str, ignore_merges: bool, nfc: bool = False):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer)
    return tok


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")


def llama3_folder(folder: Path, vocab_size: int = 400) -> Path:
    """A Llama-3-style tokenizer: BOS added by a TemplateProcessing post-processor."""
    from tokenizers import processors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = _byte_level_bpe(LLAMA3_SPECIALS, vocab_size, LLAMA3_SPLIT, ignore_merges=True)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                special_tokens=[("<|begin_of_text|>", bos)],
            ),
        ]
    )
    tok.save(str(folder / "tokenizer.json"))
    _write_json(
        folder / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
            "clean_up_tokenization_spaces": True,
            "model_max_length": 131072,
            "chat_template": LLAMA3_TEMPLATE,
        },
    )
    _write_json(
        folder / "generation_config.json",
        {
            "bos_token_id": bos,
            "eos_token_id": [tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")],
        },
    )
    return folder


def qwen2_folder(folder: Path, vocab_size: int = 400) -> Path:
    """A Qwen2-style tokenizer: byte-level BPE, NFC, no BOS, a ChatML template."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = _byte_level_bpe(QWEN2_SPECIALS, vocab_size, QWEN2_SPLIT, ignore_merges=False, nfc=True)
    tok.save(str(folder / "tokenizer.json"))
    _write_json(
        folder / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "clean_up_tokenization_spaces": False,
            "split_special_tokens": False,
            "errors": "replace",
            "add_prefix_space": False,
        },
    )
    (folder / "chat_template.jinja").write_text(QWEN2_TEMPLATE, encoding="utf-8")
    return folder


def sentencepiece_folder(folder: Path, vocab_size: int = 400) -> Path:
    """A SentencePiece BPE model converted by transformers' ``LlamaTokenizerFast``, adding
    BOS as Llama 2 does; tokenizer.model is deleted afterwards."""
    from lora_course.tokenizer.train import train_tokenizer

    from transformers import LlamaTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train_tokenizer([t for t in corpus() if t.isascii()], vocab_size, folder / "tokenizer")
    fast = LlamaTokenizerFast.from_pretrained(folder)
    fast.chat_template = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
        "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    fast.add_bos_token = True  # writes BOS into tokenizer.json's post-processor, as Llama 2's has
    fast.save_pretrained(folder)
    (folder / "tokenizer.model").unlink(missing_ok=True)
    return folder
