"""LoRA and DoRA layers, model surgery, fusing and parameter counts (lora.py, dora.py)."""

import math

import lora_course as lc
from lora_course.adapters.apply import LoRAConfig, apply_lora, count_parameters, fuse
from lora_course.adapters.dora import DoRALinear, dora_reference, row_norms
from lora_course.adapters.lora import LoRALinear
from lora_course.tree import tree_flatten

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest


def max_err(a, b):
    return mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()


def make_linear(in_dims=64, out_dims=48, bias=False, quantized=False, seed=0):
    mx.random.seed(seed)
    lin = nn.Linear(in_dims, out_dims, bias=bias)
    if bias:
        lin.bias = mx.random.normal((out_dims,)) * 0.1
    if quantized:
        lin = nn.QuantizedLinear.from_linear(lin, group_size=32, bits=4)
    mx.eval(lin.parameters())
    return lin


def randomize(layer, seed=1):
    """Give lora_b (and m) non-zero values so the adapter does something."""
    k1, k2 = mx.random.split(mx.random.key(seed))
    layer.lora_b = mx.random.normal(layer.lora_b.shape, key=k1) * 0.2
    if "m" in layer:
        layer.m = layer.m * mx.random.uniform(0.5, 1.5, layer.m.shape, key=k2)
    return layer


X = mx.random.normal((2, 5, 64), key=mx.random.key(42))
LAYERS = [LoRALinear, DoRALinear]
BASES = [dict(), dict(bias=True), dict(quantized=True), dict(quantized=True, bias=True)]


# ----------------------------------------------------------------------------- the layers


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("base", BASES, ids=["linear", "bias", "q4", "q4-bias"])
def test_from_linear_shapes_init_and_attributes(cls, base):
    lin = make_linear(**base)
    layer = cls.from_linear(lin, rank=4, alpha=8.0)
    assert (layer.input_dims, layer.output_dims) == (64, 48)  # packed width recovered
    assert layer.lora_a.shape == (64, 4) and layer.lora_b.shape == (4, 48)
    assert mx.abs(layer.lora_a).max().item() <= 1 / math.sqrt(64)
    assert mx.abs(layer.lora_a).max().item() > 0.5 / math.sqrt(64)  # uniform, not tiny
    assert not mx.any(layer.lora_b).item()
    assert (layer.rank, layer.alpha, layer.scale) == (4, 8.0, 2.0)
    assert "rank=4" in repr(layer) and "alpha=8" in repr(layer) and "scale=2" in repr(layer)
    assert layer.linear is lin


def test_rslora_scale_and_bad_hyperparameters():
    layer = LoRALinear.from_linear(make_linear(), rank=16, alpha=8.0, use_rslora=True)
    assert layer.scale == 8.0 / 4.0 and "rslora" in repr(layer)
    with pytest.raises(ValueError, match="rank"):
        LoRALinear.from_linear(make_linear(), rank=0)
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear.from_linear(make_linear(), dropout=1.0)
    with pytest.raises(TypeError, match="Embedding"):
        LoRALinear.from_linear(nn.Embedding(10, 8))


@pytest.mark.parametrize("base", BASES, ids=["linear", "bias", "q4", "q4-bias"])
def test_fresh_lora_layer_is_exactly_the_base(base):
    lin = make_linear(**base)
    assert mx.array_equal(LoRALinear.from_linear(lin)(X), lin(X)).item()


@pytest.mark.parametrize("base", BASES, ids=["linear", "bias", "q4", "q4-bias"])
def test_fresh_dora_layer_is_the_base(base):
    lin = make_linear(**base)
    assert max_err(DoRALinear.from_linear(lin)(X), lin(X)) <= 1e-5


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("base", BASES, ids=["linear", "bias", "q4", "q4-bias"])
def test_fast_forward_matches_plain_math(cls, base):
    layer = randomize(cls.from_linear(make_linear(**base), rank=4))
    assert max_err(layer(X), layer.reference(X)) <= 1e-5
    # and the plain math is the textbook formula on the dense weight
    w = lc.quant.layers.dense_weight(layer.linear)
    if cls is LoRALinear:
        expected = X @ w.T + layer.scale * (X @ layer.lora_a @ layer.lora_b)
    else:
        v = w + layer.scale * (layer.lora_a @ layer.lora_b).T
        expected = X @ (layer.m[:, None] * v / mx.linalg.norm(v, axis=1, keepdims=True)).T
    if "bias" in layer.linear:
        expected = expected + layer.linear.bias
    assert max_err(layer(X), expected) <= 1e-5


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("base", BASES, ids=["linear", "bias", "q4", "q4-bias"])
def test_fused_equals_wrapped(cls, base):
    layer = randomize(cls.from_linear(make_linear(**base), rank=4))
    fused = layer.fuse(de_quantize=True)
    assert type(fused) is nn.Linear
    assert max_err(fused(X), layer(X)) <= 1e-5
    if base.get("quantized"):
        requant = layer.fuse()
        assert isinstance(requant, nn.QuantizedLinear)
        assert (requant.group_size, requant.bits) == (32, 4)
        # re-quantizing the merged weight is the only error left: 4-bit rounding
        assert mx.array_equal(requant.weight, nn.QuantizedLinear.from_linear(fused, 32, 4).weight).item()


def test_lora_gradients_reach_only_lora_a_and_lora_b():
    layer = randomize(LoRALinear.from_linear(make_linear(bias=True), rank=4))
    names = {k for k, _ in tree_flatten(layer.trainable_parameters())}
    assert names == {"lora_a", "lora_b"}
    loss, grads = nn.value_and_grad(layer, lambda x: (layer(x) ** 2).sum())(X)
    flat = dict(tree_flatten(grads))
    assert set(flat) == {"lora_a", "lora_b"}
    assert all(mx.abs(g).max().item() > 0 for g in flat.values())

    # gradient of the plain formula with respect to A and B
    def plain(a, b):
        return ((layer.linear(X) + layer.scale * (X @ a) @ b) ** 2).sum()

    ga, gb = mx.grad(plain, argnums=(0, 1))(layer.lora_a, layer.lora_b)
    assert max_err(flat["lora_a"], ga) <= 1e-3 * mx.abs(ga).max().item()
    assert max_err(flat["lora_b"], gb) <= 1e-3 * mx.abs(gb).max().item()


@pytest.mark.parametrize("quantized", [False, True])
def test_dora_gradients_reach_m_a_b_and_norm_is_detached(quantized):
    layer = randomize(DoRALinear.from_linear(make_linear(quantized=quantized), rank=4))
    assert {k for k, _ in tree_flatten(layer.trainable_parameters())} == {"m", "lora_a", "lora_b"}
    _, grads = nn.value_and_grad(layer, lambda x: (layer(x) ** 2).sum())(X)
    flat = dict(tree_flatten(grads))
    assert set(flat) == {"m", "lora_a", "lora_b"}

    w = lc.quant.layers.dense_weight(layer.linear)
    s = layer.scale

    def ref(detach):
        f = lambda m, a, b: (dora_reference(X, w, m, a, b, s, detach_norm=detach) ** 2).sum()
        return mx.grad(f, argnums=(0, 1, 2))(layer.m, layer.lora_a, layer.lora_b)

    detached, through_norm = ref(True), ref(False)
    for name, g_ref, g_full in zip(("m", "lora_a", "lora_b"), detached, through_norm):
        scale = mx.abs(g_ref).max().item()
        assert max_err(flat[name], g_ref) <= 1e-3 * scale, name
    # differentiating through the norm gives different gradients for the direction
    assert max_err(detached[2], through_norm[2]) > 1e-2 * mx.abs(detached[2]).max().item()


def test_dora_magnitude_is_per_output_row():
    lin = make_linear(in_dims=64, out_dims=48)
    layer = DoRALinear.from_linear(lin)
    assert layer.m.shape == (48,)
    np.testing.assert_allclose(np.asarray(layer.m), np.linalg.norm(np.asarray(lin.weight), axis=1), rtol=1e-6)
    assert mx.allclose(row_norms(lin.weight), layer.m).item()


def test_dropout_only_in_training():
    layer = randomize(LoRALinear.from_linear(make_linear(), rank=4, dropout=0.5))
    layer.train()
    mx.random.seed(3)
    a = layer(X)
    layer.eval()
    b = layer(X)
    assert max_err(a, b) > 1e-3
    assert max_err(b, layer.reference(X)) <= 1e-5


# ----------------------------------------------------------------------------- the model


def trainable_names(model):
    return {k for k, _ in tree_flatten(model.trainable_parameters())}


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_apply_lora_adapts_last_blocks_and_starts_at_the_base(tiny_model, kind):
    tokens = mx.array([[1, 2, 3, 4, 5]])
    before = tiny_model(tokens)
    out = apply_lora(tiny_model, num_layers=1, keys=["self_attn.q_proj", "mlp.down_proj"], rank=4, kind=kind)
    assert out is tiny_model
    leaves = {"lora_a", "lora_b"} | ({"m"} if kind == "dora" else set())
    expected = {
        f"model.layers.1.{k}.{leaf}" for k in ("self_attn.q_proj", "mlp.down_proj") for leaf in leaves
    }
    assert trainable_names(tiny_model) == expected
    assert isinstance(tiny_model.layers[0].self_attn.q_proj, nn.Linear)  # block 0 untouched
    assert max_err(tiny_model(tokens), before) <= 1e-5
    cfg = tiny_model.lora_config
    assert (cfg.fine_tune_type, cfg.num_layers, cfg.rank, cfg.scale) == (kind, 1, 4, 4.0)
    assert cfg.keys == ["mlp.down_proj", "self_attn.q_proj"]


def test_apply_lora_defaults_to_every_linear_and_minus_one_means_all(tiny_model):
    apply_lora(tiny_model, num_layers=-1, rank=2)
    names = trainable_names(tiny_model)
    assert len(names) == 2 * 7 * 2  # blocks x linears x (A, B)
    assert "model.layers.0.mlp.gate_proj.lora_a" in names


def test_apply_lora_errors_name_the_problem(tiny_model):
    with pytest.raises(ValueError, match=r"num_layers=5 but the model has 2 layers"):
        apply_lora(tiny_model, num_layers=5)
    with pytest.raises(ValueError, match=r"'self_attn.qq_proj'.*valid keys: .*self_attn.q_proj"):
        apply_lora(tiny_model, num_layers=2, keys=["self_attn.qq_proj"])
    with pytest.raises(ValueError, match="kind='lorax'"):
        apply_lora(tiny_model, num_layers=2, kind="lorax")
    apply_lora(tiny_model, num_layers=2)
    with pytest.raises(ValueError, match="already has adapters"):
        apply_lora(tiny_model, num_layers=2)


@pytest.mark.parametrize("kind", ["full_fine_tuning", "full"])  # the plain name and mlx-lm's
def test_apply_full_unfreezes_whole_blocks(tiny_model, kind):
    apply_lora(tiny_model, num_layers=1, kind=kind)
    assert tiny_model.lora_config.fine_tune_type == "full"  # files keep mlx-lm's word
    names = trainable_names(tiny_model)
    assert names and all(n.startswith("model.layers.1.") for n in names)
    assert "model.layers.1.input_layernorm.weight" in names
    block = dict(tree_flatten(tiny_model.layers[1].parameters()))
    assert len(names) == len(block)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_fuse_model_matches_adapted_model(tiny_model, kind):
    tokens = mx.array([[5, 6, 7, 8]])
    apply_lora(tiny_model, num_layers=2, rank=4, kind=kind)
    for _, m in tiny_model.named_modules():
        if isinstance(m, LoRALinear):
            randomize(m)
    adapted = tiny_model(tokens)
    assert max_err(adapted, tiny_model(tokens)) == 0
    fuse(tiny_model)
    assert not any(isinstance(m, LoRALinear) for _, m in tiny_model.named_modules())
    assert tiny_model.lora_config is None
    assert max_err(tiny_model(tokens), adapted) <= 1e-4


def test_fuse_quantized_model_requantizes_or_dequantizes(tiny_model):
    nn.quantize(tiny_model, group_size=32, bits=4)
    tokens = mx.array([[5, 6, 7, 8]])
    apply_lora(tiny_model, num_layers=2, rank=4)
    for _, m in tiny_model.named_modules():
        if isinstance(m, LoRALinear):
            randomize(m)
    adapted = tiny_model(tokens)
    fuse(tiny_model, de_quantize=True)
    assert not any(lc.quant.layers.is_quantized(m) for _, m in tiny_model.named_modules())
    assert max_err(tiny_model(tokens), adapted) <= 1e-4


def test_count_parameters_float_and_quantized(tiny_model, tiny_args, capsys):
    a = tiny_args
    kv = a.n_kv_heads * a.head_dim
    per_block = 2 * a.dim * a.dim + 2 * a.dim * kv + 3 * a.dim * a.hidden_dim + 2 * a.dim
    total = a.n_layers * per_block + 2 * a.vocab_size * a.dim + a.dim
    c = count_parameters(tiny_model)
    assert (c["trainable"], c["total"], c["quantized"]) == (total, total, False)

    apply_lora(tiny_model, num_layers=1, keys=["self_attn.q_proj"], rank=4)
    lora = 4 * (a.dim + a.dim)
    c = lc.print_trainable_parameters(tiny_model)
    assert (c["trainable"], c["total"]) == (lora, total + lora)
    out = capsys.readouterr().out
    assert out.startswith(f"trainable params: {lora:,} || all params: {total + lora:,} || trainable%: ")
    assert f"{100 * lora / (total + lora):.4f}" in out and "quantized" not in out

    nn.quantize(
        tiny_model,
        group_size=32,
        bits=4,
        class_predicate=lambda p, m: (
            isinstance(m, (nn.Linear, nn.Embedding)) and not p.endswith("q_proj.linear")
        ),
    )
    c = lc.print_trainable_parameters(tiny_model)
    assert (c["trainable"], c["total"], c["quantized"]) == (lora, total + lora, True)
    assert c["quantization_overhead"] > 0 and c["quantized_params"] > 0
    assert "logical size" in capsys.readouterr().out


def test_lora_config_reads_mlx_lm_format():
    cfg = LoRAConfig.from_dict(
        {
            "fine_tune_type": "lora",
            "num_layers": 4,
            "model": "x",
            "lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.1},
        }
    )
    assert (cfg.rank, cfg.alpha, cfg.scale, cfg.dropout, cfg.keys) == (8, 160.0, 20.0, 0.1, None)
    back = LoRAConfig.from_dict(LoRAConfig("dora", 2, ["self_attn.q_proj"], 16, 8.0, 0.0, True).to_dict())
    assert back == LoRAConfig("dora", 2, ["self_attn.q_proj"], 16, 8.0, 0.0, True)


def test_fuse_keeps_the_quantized_layer_class():
    from lora_course.quant.dequant import DequantLinear
    from lora_course.quant.layers import quantize_model

    mx.random.seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    model.layers = [nn.Linear(64, 64)]  # a "block" list, as apply_lora expects model.layers
    quantize_model(model, group_size=32, bits=4, predicate=lambda p, m: True)
    assert type(model.layers[0]) is DequantLinear
    layer = randomize(LoRALinear.from_linear(model.layers[0], rank=4))
    fused = layer.fuse()
    assert type(fused) is DequantLinear and (fused.group_size, fused.bits) == (32, 4)
    requant = nn.QuantizedLinear.from_linear(layer.fuse(de_quantize=True), 32, 4)
    assert mx.array_equal(fused.weight, requant.weight).item()
    assert max_err(fused(X), requant(X)) <= 1e-4  # DequantLinear's BLAS path == MLX's kernel


def test_bad_arguments_leave_the_model_untouched(tiny_model):
    before = trainable_names(tiny_model)
    for kw in [
        dict(num_layers=3),
        dict(num_layers=2, keys=["mlp.nope"]),
        dict(num_layers=2, rank=0),
        dict(num_layers=2, kind="full", keys=["mlp.up_proj"]),
    ]:
        with pytest.raises(ValueError):
            apply_lora(tiny_model, **kw)
        assert trainable_names(tiny_model) == before and getattr(tiny_model, "lora_config", None) is None
    apply_lora(tiny_model, num_layers=2, keys="self_attn.q_proj")  # one key as a plain string
    assert tiny_model.lora_config.keys == ["self_attn.q_proj"]


def test_full_fine_tuning_refuses_a_quantized_model(tiny_model):
    nn.quantize(tiny_model, group_size=32, bits=4)
    with pytest.raises(ValueError, match="kind='full' needs float weights"):
        apply_lora(tiny_model, num_layers=1, kind="full")
