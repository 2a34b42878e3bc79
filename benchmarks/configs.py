"""Model shapes and workloads the benchmarks run, the same for every peer.

A Llama-style decoder (SwiGLU, RoPE, RMSNorm) with random weights (``weights.py``):
small and medium have no GQA and an untied head; the real shapes (SmolLM2-135M,
Llama-3.2-1B) have their models' grouped K/V heads and tied embeddings. LoRA rank 8,
alpha 16 (scale 2), on every linear layer of attention and MLP (q/k/v/o/gate/up/down)
of every block; the embedding, the norms and the output head stay frozen and
unadapted. Random tokens; the loss mask is all ones, so every position is a loss
token for every peer.
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
    n_kv_heads: int | None = None  # K/V heads (grouped-query attention); None: n_heads
    tie: bool = False  # the output head is the embedding's transpose (no lm_head weight)
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
    max_rounds: int | None = None  # run this config in at most N rounds (big shapes: 1)
    # peers not run at this size, "peer" (every bench) or "bench:peer" (the reason is SKIP_REASONS')
    skip_peers: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)  # anything else, carried into the JSON

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def hf_config(self) -> dict[str, Any]:
        """The shape as a Hugging Face config.json: lora_course's ModelArgs.from_dict and
        mlx-lm's ModelArgs both read it, so every peer builds the same model."""
        return {
            "model_type": "llama",
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "intermediate_size": self.hidden_dim,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": self.tie,
        }

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["keys"] = list(self.keys)
        d["skip_peers"] = list(self.skip_peers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchConfig:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        for key in ("keys", "skip_peers"):
            if key in kw:
                kw[key] = tuple(kw[key])
        return cls(**kw)


SMALL = BenchConfig("small", dim=256, n_layers=4, hidden_dim=704, n_heads=4, seq=128)
MEDIUM = BenchConfig(
    "medium", dim=512, n_layers=8, hidden_dim=1408, n_heads=8, seq=256, skip_peers=("mlx_lm_stock",)
)
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

# The real shapes' features at micro size (tied head, GQA, a vocabulary the trainer chunks):
# tests/test_benchmarks.py runs it.
MICRO_TIED = BenchConfig(
    **{
        **MICRO.to_dict(),
        "name": "micro-tied",
        "n_heads": 4,
        "n_kv_heads": 2,
        "vocab_size": 32768,
        "tie": True,
        "keys": LORA_KEYS,
        "skip_peers": ("mlx_lm_stock",),
    }
)

# Real model shapes, random weights. One round each, few steps: a 1B step takes tens of
# seconds on 2 cores. Batch x seq fit a 24 GB machine with every peer's fp32 weights.
SMOLLM2_135M = BenchConfig(
    "smollm2-135m",
    dim=576,
    n_layers=30,
    hidden_dim=1536,
    n_heads=9,
    n_kv_heads=3,
    vocab_size=49152,
    tie=True,
    batch=2,
    seq=512,
    prompt_len=128,
    gen_tokens=32,
    steps=3,
    warmup=1,
    max_seconds=60.0,
    max_rounds=1,
    skip_peers=("mlx_lm_stock", "qlora:mlx_lm_same_blas"),
)
LLAMA_32_1B = BenchConfig(
    "llama-3.2-1b",
    dim=2048,
    n_layers=16,
    hidden_dim=8192,
    n_heads=32,
    n_kv_heads=8,
    vocab_size=128256,
    tie=True,
    batch=1,
    seq=512,
    prompt_len=128,
    gen_tokens=16,
    steps=2,
    warmup=1,
    max_seconds=60.0,
    max_rounds=1,
    skip_peers=("mlx_lm_stock", "torch_peft_1t", "qlora:mlx_lm_same_blas"),
)
# lora_course.training.chunked_loss.CHUNKED_VOCAB (the orchestrator does not import MLX;
# tests/test_benchmarks.py checks the two agree)
CHUNKED_VOCAB = 32768
SKIP_REASONS = {
    "mlx_lm_stock": "not run at this size: MLX's bundled reference BLAS is over 10x slower than "
    "an optimized one (see small), so one step would take minutes",
    "qlora:mlx_lm_same_blas": "not run at this size: mlx-lm's QLoRA runs MLX's CPU quantized matmul, "
    "over 10x slower than our step at medium, so one step would take many minutes",
    "torch_peft_1t": "not run at this size, to keep the whole run short; PyTorch runs on all cores",
}

PRESETS = {c.name: c for c in (SMALL, MEDIUM, SMOLLM2_135M, LLAMA_32_1B, MICRO, MICRO_TIED)}
