"""The transformer, part by part: config, RMSNorm, RoPE, attention, the model, generation.

Each module is one concept of notebooks 02-04 and imports only the modules before it:
``args`` -> ``fastmath`` -> ``norm`` -> ``rope`` -> ``attention`` -> ``transformer`` -> ``generate``.
"""

from lora_course.model.args import ModelArgs
from lora_course.model.attention import (
    Attention,
    KVCache,
    attention_reference,
    causal_mask,
    sliding_window_mask,
)
from lora_course.model.generate import filter_logits, generate, generate_tokens, sample, stream_generate
from lora_course.model.norm import RMSNorm, rms_norm_reference
from lora_course.model.rope import RoPE, llama3_factors, llama3_inv_freq, rope_reference
from lora_course.model.transformer import FeedForward, Model, Transformer, TransformerBlock, make_cache

__all__ = [
    "ModelArgs",
    "RMSNorm",
    "rms_norm_reference",
    "RoPE",
    "rope_reference",
    "llama3_factors",
    "llama3_inv_freq",
    "Attention",
    "KVCache",
    "attention_reference",
    "causal_mask",
    "sliding_window_mask",
    "FeedForward",
    "Model",
    "Transformer",
    "TransformerBlock",
    "make_cache",
    "filter_logits",
    "generate",
    "generate_tokens",
    "sample",
    "stream_generate",
]
