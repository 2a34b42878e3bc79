"""Model shapes and workloads the benchmarks run, the same for every peer.

A Llama-style decoder (SwiGLU, RoPE, RMSNorm, no GQA, untied head) with random
weights (``weights.py``). LoRA rank 8, alpha 16 (scale 2), on every linear layer of
attention and MLP (q/k/v/o/gate/up/down) of every block; the embedding, the norms
and the output head stay frozen and unadapted. Random tokens; the loss mask is all
ones, so every position is a loss token for every peer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

LORA_KEYS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@dataclass
class BenchConfig:
    name: str = "small"  # label in the table
    dim: int = 256  # residual width (HF hidden_size)
    n_layers: int = 4  # transformer blocks
    hidden_dim: int = 704  # SwiGLU inner width (about 8/3 * dim, rounded to 64)
    n_heads: int = 4  # attention heads (head_dim = dim / n_heads = 64)
    vocab_size: int = 8192  # token ids; the output head is dim x vocab
    batch: int = 4  # sequences per training step
    seq: int = 128  # tokens per sequence (inputs; targets are shifted by one)
    rank: int = 8  # LoRA rank r
    alpha: float = 16.0  # LoRA alpha; scale = alpha / r
    keys: tuple[str, ...] = LORA_KEYS  # adapted linears inside each block
    bits: int = 4  # QLoRA: bits per quantized weight
    group_size: int = 64  # QLoRA: weights per quantization group
    prompt_len: int = 256  # generation: prompt tokens (batch 1)
    gen_tokens: int = 128  # generation: greedy tokens generated after the prompt
    steps: int = 10  # timed training steps per run (fewer when max_seconds runs out)
    warmup: int = 2  # untimed steps first (compilation, allocator warm-up)
    max_seconds: float = 60.0  # stop timing after this long (at least min_steps are timed)
    min_steps: int = 2  # timed steps even when max_seconds is exceeded
    seed: int = 0  # weights, tokens and LoRA initialization
    extra: dict = field(default_factory=dict)  # anything else, carried into the JSON

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["keys"] = list(self.keys)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchConfig:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if "keys" in kw:
            kw["keys"] = tuple(kw["keys"])
        return cls(**kw)


SMALL = BenchConfig("small", dim=256, n_layers=4, hidden_dim=704, n_heads=4, seq=128)
MEDIUM = BenchConfig("medium", dim=512, n_layers=8, hidden_dim=1408, n_heads=8, seq=256)
# --quick: a micro model for the smoke test; numbers from it mean nothing.
MICRO = BenchConfig(
    "micro",
    dim=32,
    n_layers=1,
    hidden_dim=64,
    n_heads=2,
    vocab_size=256,
    batch=2,
    seq=16,
    group_size=32,
    prompt_len=8,
    gen_tokens=4,
    steps=2,
    warmup=1,
    max_seconds=5.0,
    min_steps=1,
)

PRESETS = {c.name: c for c in (SMALL, MEDIUM, MICRO)}
