"""The transformer: fused kernels agree with the plain math and with mlx.nn; the KV cache is exact."""

import lora_course as lc
from lora_course.model.attention import attention_reference
from lora_course.model.norm import rms_norm_reference
from lora_course.model.rope import rope_reference

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest


def max_err(a, b):
    return mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()


def test_public_names():
    for name in ["ModelArgs", "Model", "RMSNorm", "Attention", "FeedForward", "TransformerBlock"]:
        assert hasattr(lc, name), name


def test_rmsnorm_fast_reference_and_mlx_nn_agree():
    x = mx.random.normal((3, 7, 64), key=mx.random.key(0)) * 3 + 1
    norm = lc.RMSNorm(64, eps=1e-5)
    norm.weight = mx.random.uniform(0.5, 1.5, (64,), key=mx.random.key(1))
    ref = nn.RMSNorm(64, eps=1e-5)
    ref.weight = norm.weight
    assert max_err(norm(x), norm.reference(x)) <= 1e-5
    assert max_err(norm(x), ref(x)) <= 1e-5
    # The reference is the textbook formula.
    expected = np.asarray(x) / np.sqrt((np.asarray(x) ** 2).mean(-1, keepdims=True) + 1e-5)
    assert np.abs(np.asarray(rms_norm_reference(x, mx.ones(64), 1e-5)) - expected).max() <= 1e-5


@pytest.mark.parametrize("traditional", [True, False])
@pytest.mark.parametrize("offset", [0, 5])
def test_rope_fast_reference_and_mlx_nn_agree(traditional, offset):
    x = mx.random.normal((2, 4, 9, 16), key=mx.random.key(2))
    fast = lc.model.RoPE(16, traditional=traditional, base=500.0)
    ref = nn.RoPE(16, traditional=traditional, base=500.0)
    assert max_err(fast(x, offset), fast.reference(x, offset)) <= 1e-5
    assert max_err(fast(x, offset), ref(x, offset=offset)) <= 1e-5


def test_rope_relative_position_property():
    # <rope(q, m), rope(k, n)> depends only on m - n.
    q = mx.random.normal((1, 1, 1, 32), key=mx.random.key(3))
    k = mx.random.normal((1, 1, 1, 32), key=mx.random.key(4))
    dots = [
        (rope_reference(q, m, 10000.0, False) * rope_reference(k, m - 3, 10000.0, False)).sum().item()
        for m in (3, 10, 40)
    ]
    assert np.allclose(dots, dots[0], atol=1e-4)


def test_attention_reference_matches_fused_with_gqa():
    q = mx.random.normal((2, 8, 6, 16), key=mx.random.key(5))
    k = mx.random.normal((2, 2, 6, 16), key=mx.random.key(6))
    v = mx.random.normal((2, 2, 6, 16), key=mx.random.key(7))
    fused = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask="causal")
    assert max_err(fused, attention_reference(q, k, v, 0.25, causal=True)) <= 1e-5


def test_model_reference_and_fast_paths_agree(tiny_model):
    tokens = mx.random.randint(0, 256, (2, 12), key=mx.random.key(8))
    logits = tiny_model(tokens)
    assert logits.shape == (2, 12, 256)
    assert max_err(logits, tiny_model(tokens, reference=True)) <= 1e-5


@pytest.mark.parametrize("tied", [False, True])
def test_kv_cache_decoding_equals_full_forward(tiny_args, tied):
    tiny_args.tie_word_embeddings = tied
    mx.random.seed(1)
    model = lc.Model(tiny_args)
    tokens = mx.random.randint(0, 256, (2, 20), key=mx.random.key(9))
    full = model(tokens)
    cache = lc.make_cache(model)
    steps = [model(tokens[:, :7], cache)]
    steps += [model(tokens[:, i : i + 1], cache) for i in range(7, 20)]
    assert max_err(mx.concatenate(steps, axis=1), full) <= 1e-4
    assert cache[0].offset == 20


def test_kv_cache_grows_past_its_step(tiny_model, monkeypatch):
    monkeypatch.setattr(lc.KVCache, "step", 4)
    tokens = mx.random.randint(0, 256, (1, 11), key=mx.random.key(10))
    cache = lc.make_cache(tiny_model)
    out = [tiny_model(tokens[:, i : i + 1], cache) for i in range(11)]
    assert max_err(mx.concatenate(out, axis=1), tiny_model(tokens)) <= 1e-4


def test_parameter_names_follow_the_ecosystem(tiny_model):
    from mlx.utils import tree_flatten

    names = {k for k, _ in tree_flatten(tiny_model.parameters())}
    for expected in [
        "model.embed_tokens.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.norm.weight",
        "lm_head.weight",
    ]:
        assert expected in names
    assert tiny_model.model.layers[0].self_attn.k_proj.weight.shape == (2 * 16, 64)  # GQA


def test_model_args_from_hf_config():
    hf = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "vocab_size": 256,
        "rope_parameters": {"rope_theta": 123.0, "rope_type": "default"},
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "some_unknown_key": 1,
    }
    args = lc.ModelArgs.from_dict(hf)
    assert (args.dim, args.n_layers, args.hidden_dim, args.n_heads, args.n_kv_heads) == (64, 2, 128, 4, 2)
    assert args.rope_theta == 123.0 and args.tie_word_embeddings and args.head_dim == 16
    assert args.rope_traditional is False
    assert lc.ModelArgs.from_dict(args.to_hf_dict()) == args


def test_model_args_from_meta_params():
    meta = {
        "dim": 64,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "vocab_size": 256,
        "multiple_of": 32,
        "norm_eps": 1e-5,
        "rope_theta": 1e6,
    }
    args = lc.ModelArgs.from_dict(meta)
    assert args.rope_traditional is True  # Meta weights rotate interleaved pairs
    assert args.hidden_dim == 192  # 2 * 4 * 64 / 3 = 170 -> rounded up to a multiple of 32


def test_bad_model_args_are_explained():
    with pytest.raises(ValueError, match="n_kv_heads"):
        lc.ModelArgs(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="rope_scaling"):
        lc.ModelArgs(rope_scaling={"type": "yarn", "factor": 2.0})
