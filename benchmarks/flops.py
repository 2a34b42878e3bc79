"""Analytic FLOP counts for one LoRA training step and for generation.

We count the useful multiply-adds of the matmuls (2 FLOPs each) and nothing else:
norms, RoPE, softmax, the loss, the optimizer and dequantization are memory-bound
and left out, so achieved GFLOP/s is a lower bound on the work the machine did.
The same count is used for every peer; it depends only on the shape.

With T = batch * seq tokens, per block linear weights
N_block = dim * (q + k + v + o widths) + 3 * dim * hidden, head N_head = dim * vocab,
and per adapted linear (in, out) with rank r the adapter width r * (in + out):

forward
    base linears   2 * T * (n_layers * N_block + N_head)
    LoRA           2 * T * sum over adapters of r * (in + out)       (x A, then (x A) B)
    attention      2 * B * n_layers * n_heads * head_dim * seq^2     (q k^T and p v, causal
                                                                      half: seq^2 / 2 each)
backward (the base is frozen: only gradients with respect to inputs)
    base linears   2 * T * (n_layers * N_block + N_head)             (dx = dy W, same as forward)
    LoRA           2 * (LoRA forward)                                (dA, dB and dx for each)
    attention      2 * (attention forward)                           (dq, dk, dv and dp)

so a step is 2 * base + 3 * LoRA + 3 * attention (forward); a full fine-tune would add
another base term for the weight gradients (the familiar 6N per token). The gradient
with respect to the inputs of block 0's q/k/v/gate/up projections is not needed
(nothing below them trains) and a good implementation skips it, so the count slightly
over-states the necessary work at 1 block (micro config) and by about 1/(2 n_layers)
of the base term otherwise; every peer is measured against the same count.

Generation: the prompt pass needs the blocks for every prompt token but the head only
for the last one (its logits pick the first new token); each decoded token is one
forward pass, 2 * (n_layers * N_block + N_head), plus attention over the cache
(2 * 2 * n_layers * n_heads * head_dim * context per token).
"""

from __future__ import annotations

from benchmarks.configs import BenchConfig


def linear_shapes(cfg: BenchConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of every linear inside one block, by its key."""
    d, h, a = cfg.dim, cfg.hidden_dim, cfg.n_heads * cfg.head_dim
    kv = cfg.kv_heads * cfg.head_dim  # grouped-query attention: fewer K/V heads
    return {
        "self_attn.q_proj": (d, a),
        "self_attn.k_proj": (d, kv),
        "self_attn.v_proj": (d, kv),
        "self_attn.o_proj": (a, d),
        "mlp.gate_proj": (d, h),
        "mlp.up_proj": (d, h),
        "mlp.down_proj": (h, d),
    }


def base_params(cfg: BenchConfig) -> int:
    """Weights that take part in matmuls: the blocks' linears and the head (no embedding)."""
    block = sum(i * o for i, o in linear_shapes(cfg).values())
    return cfg.n_layers * block + cfg.dim * cfg.vocab_size


def lora_params(cfg: BenchConfig) -> int:
    """Trainable adapter parameters: r * (in + out) per adapted linear, every block."""
    shapes = linear_shapes(cfg)
    return cfg.n_layers * sum(cfg.rank * (shapes[k][0] + shapes[k][1]) for k in cfg.keys)


def train_step_flops(cfg: BenchConfig) -> dict[str, float]:
    """FLOPs of one LoRA training step, by part, and their ``total``."""
    T = cfg.tokens_per_step
    base_fwd = 2.0 * T * base_params(cfg)
    lora_fwd = 2.0 * T * lora_params(cfg)
    attn_fwd = 2.0 * cfg.batch * cfg.n_layers * cfg.n_heads * cfg.head_dim * cfg.seq**2
    parts = {"base": 2 * base_fwd, "lora": 3 * lora_fwd, "attention": 3 * attn_fwd}
    parts["total"] = sum(parts.values())
    return parts


def generation_flops(cfg: BenchConfig) -> dict[str, float]:
    """FLOPs of the prompt pass (prefill) and of the decoded tokens (decode), total each."""
    per_token = 2.0 * base_params(cfg)
    head = 2.0 * cfg.dim * cfg.vocab_size
    attn = 4.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim  # per (query, key) pair
    P, G = cfg.prompt_len, cfg.gen_tokens
    prefill = P * (per_token - head) + head + attn * P * (P + 1) / 2
    # decode token i (i = 1..G-1) attends over P + i positions
    decode = (G - 1) * per_token + attn * sum(P + i for i in range(1, G))
    return {"prefill": prefill, "decode": decode}
