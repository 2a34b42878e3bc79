"""Tiny checkpoint folders shaped like today's real ones, built offline in seconds.

Each builder writes a random transformers model with ``save_pretrained`` next to a tokenizer
folder from ``tiny_tokenizers`` and returns the transformers model (fp32, eval mode):

- ``llama3``: Llama 3.1/3.2-style: ``llama3`` RoPE scaling, tied embeddings, GQA, a byte-level
  BPE tokenizer.json and a Llama-3 chat template. The scaling is set so that it matters on a
  32-token sequence (original context 64: most frequencies are divided by 8).
- ``mistral``: ``sliding_window=8``, so 32-token sequences and 40-token generations pass it.
- ``qwen2``: q/k/v biases (no o bias), tied embeddings, NFC byte-level BPE, ChatML template.
- ``llama_spm``: a Llama 2 / TinyLlama-style SentencePiece tokenizer.json (LlamaTokenizerFast).
"""

from __future__ import annotations

from pathlib import Path

from tiny_tokenizers import llama3_folder, qwen2_folder, sentencepiece_folder

SIZES = dict(
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
KINDS = {
    # name: (config class, config kwargs, tokenizer builder)
    "llama3": (
        "LlamaConfig",
        dict(
            rope_parameters={"rope_theta": 10000.0, **LLAMA3_ROPE},
            tie_word_embeddings=True,
            max_position_embeddings=512,
        ),
        llama3_folder,
    ),
    "mistral": (
        "MistralConfig",
        dict(sliding_window=8, tie_word_embeddings=False, max_position_embeddings=512),
        sentencepiece_folder,
    ),
    "qwen2": (
        "Qwen2Config",
        dict(rope_parameters={"rope_theta": 1e6, "rope_type": "default"}, tie_word_embeddings=True),
        qwen2_folder,
    ),
    "llama_spm": ("LlamaConfig", dict(tie_word_embeddings=False), sentencepiece_folder),
}


def vocab_size(folder: Path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size(with_added_tokens=True)


def build(kind: str, folder: Path, seed: int = 0):
    """Write checkpoint ``kind`` to ``folder``; returns the transformers model."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    cls_name, kwargs, tokenizer = KINDS[kind]
    folder = Path(folder)
    tokenizer(folder)
    torch.manual_seed(seed)
    config = getattr(transformers, cls_name)(**SIZES, **kwargs, vocab_size=vocab_size(folder))
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms start at 1 and biases at 0: make them matter
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    return model
