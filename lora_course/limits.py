"""Resource bounds, stated once: how big a value from a file or a flag may be.

A number in ``config.json``, a YAML file or a flag is a request for memory or time.
MLX trusts the numbers it is given: a layer count of 10**8 allocates until the process
is killed, a rank of 10**8 or a group size of 0 crash inside a kernel. Every boundary
therefore checks such values against the limits below before anything is built, and
the largest requests (a whole model, a set of adapters) are also compared with the
memory of this machine. The limits are far above any Llama or Mistral release, so they
only stop values that are wrong. Taught in notebook 10 (reliability).
"""

from __future__ import annotations

import math
import os

# --- model sizes (ModelArgs fields); Llama 3.1 405B has dim 16384, 126 layers, 128 heads
MAX_DIM = 65_536  # width of the residual stream
MAX_HIDDEN_DIM = 262_144  # inner width of the feed-forward
MAX_LAYERS = 1_024  # transformer blocks
MAX_HEADS = 1_024  # query or key/value heads
MAX_HEAD_DIM = 4_096  # width of one attention head
MAX_VOCAB = 4_194_304  # token ids (2**22; the largest released vocabularies are ~256k)
MAX_POSITIONS = 16_777_216  # max_position_embeddings (2**24 tokens)
MAX_RANK = 16_384  # LoRA rank r

# --- training and generation
MAX_SEQ_LENGTH = 1_048_576  # tokens in one training sample (2**20)
MAX_BATCH = 1_048_576  # examples in one micro-batch
MAX_SEED = 2**63 - 1  # seeds are non-negative 64-bit integers

# --- untrusted text
MAX_CONFIG_BYTES = 16 * 2**20  # config.json, adapter_config.json, YAML, chat templates
MAX_YAML_NODES = 100_000  # YAML nodes after expanding every alias (stops "billion laughs")
TEMPLATE_SECONDS = 2.0  # wall time for one chat-template rendering
TEMPLATE_CHARS = 16_000_000  # characters one chat-template rendering may write
MAX_HEADER_BYTES = 100 * 2**20  # a safetensors JSON header
MAX_TOKENIZER_BYTES = 2**30  # a tokenizer.model (a few MB in practice)


def physical_memory() -> int | None:
    """Bytes of RAM in this machine, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A real number that is finite (not bool, not NaN, not inf)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def int_in_range(value, name: str, low: int, high: int) -> str | None:
    """Why ``value`` is not an integer in [low, high] (None: it is), for a message naming ``name``."""
    if not is_int(value):
        return f"{name} must be an integer, got {type(value).__name__} {repr(value)[:60]}"
    if not low <= value <= high:
        return f"{name}={value} is outside [{low}, {high}] (the bound is in lora_course/limits.py)"
    return None


def memory_problem(nbytes: float, what: str) -> str | None:
    """Why ``nbytes`` cannot fit in this machine's memory (None: it may)."""
    total = physical_memory()
    if total is not None and nbytes > total:
        return (
            f"{what} needs about {nbytes / 2**30:,.1f} GiB, more than this machine's "
            f"{total / 2**30:,.1f} GiB of memory"
        )
    return None
