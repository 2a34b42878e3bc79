"""One seeded random checkpoint and token set per configuration, shared by every peer.

Written once by the orchestrator with numpy (``.npz``, read back with
``allow_pickle=False``) under the Hugging Face Llama names, which lora_course,
mlx-lm and transformers all use. Identical weights make the peers' first-step
losses and greedy tokens comparable: the benchmark checks they agree.

Scales: embeddings N(0, 1), linear weights N(0, 1/in) (unit-variance outputs),
norm weights 1. Logits then spread over a few units, so greedy argmax ties that
float rounding could flip are unlikely.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.configs import BenchConfig
from benchmarks.flops import linear_shapes


def make_checkpoint(cfg: BenchConfig, folder: Path) -> tuple[Path, Path]:
    """Write ``weights.npz`` and ``data.npz`` for ``cfg`` into ``folder``; returns both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    w = {"model.embed_tokens.weight": rng.standard_normal((cfg.vocab_size, cfg.dim), np.float32)}
    for i in range(cfg.n_layers):
        for key, (n_in, n_out) in linear_shapes(cfg).items():
            w[f"model.layers.{i}.{key}.weight"] = rng.standard_normal((n_out, n_in), np.float32) / np.float32(
                np.sqrt(n_in)
            )
        w[f"model.layers.{i}.input_layernorm.weight"] = np.ones(cfg.dim, np.float32)
        w[f"model.layers.{i}.post_attention_layernorm.weight"] = np.ones(cfg.dim, np.float32)
    w["model.norm.weight"] = np.ones(cfg.dim, np.float32)
    if cfg.tie:  # the head is the embedding: scale it like a linear's weight
        w["model.embed_tokens.weight"] /= np.float32(np.sqrt(cfg.dim))
    else:
        w["lm_head.weight"] = rng.standard_normal((cfg.vocab_size, cfg.dim), np.float32) / np.float32(
            np.sqrt(cfg.dim)
        )
    tokens = rng.integers(0, cfg.vocab_size, (cfg.batch, cfg.seq + 1), dtype=np.int32)
    prompt = rng.integers(0, cfg.vocab_size, (cfg.prompt_len,), dtype=np.int32)
    weights_path, data_path = folder / "weights.npz", folder / "data.npz"
    np.savez(weights_path, **w)
    np.savez(data_path, tokens=tokens, prompt=prompt)
    return weights_path, data_path


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Arrays of an ``.npz`` file, never unpickling anything."""
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def load_into_mlx(model, path: str | Path) -> None:
    """Copy the checkpoint into an MLX model (ours or mlx-lm's), strictly by name."""
    import mlx.core as mx

    with np.load(path, allow_pickle=False) as f:  # one numpy array in memory at a time
        arrays = [(k, mx.array(f[k])) for k in f.files]
    model.load_weights(arrays, strict=True)
    mx.eval(model.parameters())
