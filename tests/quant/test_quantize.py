"""Our quantizer against MLX's: same packed words, scales and biases, bit for bit."""

import lora_course  # noqa: F401  (BLAS before mlx)
from lora_course.quant.quantize import (
    MAX_ABS_WEIGHT,
    SUPPORTED_BITS,
    SUPPORTED_GROUP_SIZES,
    QuantizationError,
    dequantize,
    pack,
    quantize,
    unpack,
)

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

DTYPES = [mx.float32, mx.float16, mx.bfloat16]


def assert_same_as_mlx(w, group_size, bits):
    ours = quantize(w, group_size, bits)
    theirs = mx.quantize(w, group_size, bits)
    for name, a, b in zip(("w_q", "scales", "biases"), ours, theirs):
        assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{name}: shape {a.shape} != {b.shape}"
        assert mx.array_equal(a, b).item(), f"{name} differs (bits={bits}, group={group_size})"
    deq = dequantize(*ours, group_size, bits)
    ref = mx.dequantize(*theirs, group_size, bits)
    assert deq.dtype == ref.dtype == w.dtype
    assert mx.array_equal(deq, ref).item(), f"dequantize differs (bits={bits}, group={group_size})"


def adversarial_matrices():
    """Matrices (rows, 256) that poke at every branch of the scale/bias recipe."""
    mx.random.seed(0)
    cols = 256
    normal = mx.random.normal((6, cols))
    outliers = normal * 0.02
    outliers[0, 3] = 1e4  # one huge positive weight in a group
    outliers[1, 200] = -3e4  # and a huge negative one
    outliers[2, :] = outliers[2, :] * 1e-6
    mixed = mx.concatenate(
        [mx.zeros((1, 128)), mx.full((1, 128), -0.75)], axis=1
    )  # a zero group and a constant negative group in one row
    return {
        "normal": normal,
        "small": normal * 0.02,
        "zeros": mx.zeros((3, cols)),
        "constant_rows": mx.stack([mx.full((cols,), v) for v in (3.7, -0.01, 1.0, 1e-9)]),
        "outliers": outliers,
        "symmetric": mx.concatenate([mx.ones((2, cols // 2)), -mx.ones((2, cols // 2))], axis=1),
        "integers": mx.random.randint(-8, 8, (4, cols)).astype(mx.float32),
        "positive_only": mx.abs(normal) + 5.0,
        "mixed_groups": mx.concatenate([mixed, mixed], axis=1)[:, :cols],
        "subnormal": normal * 1e-39,
        "huge": normal * 1e6,
        "three_dims": mx.random.normal((2, 3, cols)),
    }


@pytest.mark.parametrize("group_size", SUPPORTED_GROUP_SIZES)
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_bit_identical_to_mlx(bits, group_size):
    for name, w in adversarial_matrices().items():
        for dtype in DTYPES:
            if name == "huge" and dtype == mx.float16:
                continue  # 1e6 is beyond float16's range (inf): covered by the error tests
            assert_same_as_mlx(w.astype(dtype), group_size, bits)


def test_dequantize_error_is_at_most_one_step_and_shrinks_with_bits():
    # Rounding costs half a step; snapping the grid onto zero can shift it by another half.
    mx.random.seed(1)
    w = mx.random.normal((16, 128))
    groups = w.reshape(16, 2, 64)
    mean_errors = []
    for bits in SUPPORTED_BITS:
        back = dequantize(*quantize(w, 64, bits), 64, bits).reshape(16, 2, 64)
        err = mx.abs(back - groups)
        step = (groups.max(-1, keepdims=True) - groups.min(-1, keepdims=True)) / (2**bits - 1)
        assert mx.all(err <= step * (1 + 1e-5)).item(), f"bits={bits}"
        mean_errors.append(err.mean().item())
    assert mean_errors == sorted(mean_errors, reverse=True)


def test_zero_is_exact_when_the_group_holds_it():
    w = mx.array([[-1.0, -0.3, 0.0, 0.2, 0.9] + [0.5] * 27])
    back = dequantize(*quantize(w, 32, 4), 32, 4)
    assert back[0, 2].item() == 0.0
    assert back[0, 0].item() == -1.0  # the larger-magnitude edge is exact too


def test_pack_layout_4_bits():
    codes = mx.array([list(range(8)) + list(range(15, 7, -1))], dtype=mx.uint32)
    words = pack(codes, 4)
    # code 0 sits in the lowest 4 bits, code 7 in the highest
    assert words.tolist() == [[0x76543210, 0x89ABCDEF]]
    assert mx.array_equal(unpack(words, 4), codes).item()


def test_pack_layout_3_bits_straddles_words():
    codes = [0] * 32
    codes[10] = 0b111  # bits 30, 31 (word 0) and bit 32 (bit 0 of word 1)
    codes[21] = 0b101  # bits 63 (word 1) and 64, 65 (word 2): low bit in word 1
    words = pack(mx.array([codes], dtype=mx.uint32), 3).tolist()[0]
    assert words == [0b11 << 30, 0b1 | (1 << 31), 0b10]
    assert unpack(mx.array([words], dtype=mx.uint32), 3).tolist()[0] == codes


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_pack_matches_mlx_layout(bits):
    """Codes packed by us are the words MLX produces for the same codes."""
    levels = 2**bits - 1
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, levels + 1, size=(3, 128))
    codes[:, 0], codes[:, 1] = 0, levels  # pin both ends: w spans [-levels, 0] ...
    w = mx.array((codes - levels).astype(np.float32))  # ... so scale = 1, bias = -levels
    w_q, scales, biases = mx.quantize(w, 128, bits)
    assert mx.array_equal(pack(mx.array(codes.astype(np.uint32)), bits), w_q).item()


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "w, group_size, bits, match",
    [
        (mx.zeros((4, 100)), 32, 4, r"\(4, 100\).*group_size=32"),
        (mx.zeros((4, 128)), 32, 7, r"bits=7"),
        (mx.zeros((4, 128)), 32, 0, r"bits=0"),
        (mx.zeros((4, 128)), 16, 4, r"group_size=16"),
        (mx.zeros((4, 256)), 256, 4, r"group_size=256"),
        (mx.zeros((128,)), 32, 4, r"shape \(128,\)"),
        (mx.zeros((4, 128), dtype=mx.int32), 32, 4, r"int32"),
        (mx.zeros((4, 128), dtype=mx.float64), 32, 4, r"float64"),
        (mx.full((2, 64), float("nan")), 32, 4, r"finite"),
        (mx.full((2, 64), float("inf")), 32, 4, r"finite"),
        (mx.full((2, 64), 1e31), 32, 4, r"finite"),
    ],
)
def test_errors_name_the_problem(w, group_size, bits, match):
    with pytest.raises(QuantizationError, match=match):
        quantize(w, group_size, bits)


def test_error_is_a_value_error():
    assert issubclass(QuantizationError, ValueError)
    with pytest.raises(ValueError, match="mx.array"):
        quantize(np.zeros((4, 64), np.float32), 32, 4)


def test_dequantize_rejects_mismatched_parameters():
    w_q, scales, biases = quantize(mx.random.normal((4, 128)), 32, 4)
    with pytest.raises(QuantizationError, match=r"group_size=64, bits=4"):
        dequantize(w_q, scales, biases, 64, 4)
    with pytest.raises(QuantizationError, match=r"bits=3"):
        dequantize(w_q, scales, biases, 32, 3)
    with pytest.raises(QuantizationError, match=r"uint32"):
        dequantize(w_q.astype(mx.int32), scales, biases, 32, 4)
    with pytest.raises(QuantizationError, match=r"float16"):
        dequantize(w_q, scales, biases.astype(mx.float16), 32, 4)


def test_empty_matrix():
    ours, theirs = quantize(mx.zeros((0, 64)), 32, 4), mx.quantize(mx.zeros((0, 64)), 32, 4)
    assert [a.shape for a in ours] == [b.shape for b in theirs] == [(0, 8), (0, 2), (0, 2)]
    assert dequantize(*ours, 32, 4).shape == (0, 64)  # (mx.dequantize cannot reshape empties)


# -- property test: bit-identical or the documented error --------------------------------

_special = st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-40, 65504.0, 1e29, float("nan"), float("inf")])
_regimes = [  # each matrix draws its values from one regime
    st.floats(-1.0, 1.0, width=32),  # weight-like
    st.floats(-1e6, 1e6, width=32),  # outliers (inf once cast to float16)
    st.floats(width=32, allow_nan=False, allow_infinity=False),  # anything finite
    st.one_of(st.floats(-10.0, 10.0, width=32), _special),  # sprinkled special values
]


@st.composite
def weight_matrices(draw):
    bits = draw(st.sampled_from(SUPPORTED_BITS + (7,)))
    group_size = draw(st.sampled_from(SUPPORTED_GROUP_SIZES))
    rows = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 2))
    elements = draw(st.sampled_from(_regimes))
    values = draw(hnp.arrays(np.float32, (rows, groups * group_size), elements=elements))
    dtype = draw(st.sampled_from(DTYPES))
    return mx.array(values).astype(dtype), group_size, bits


@settings(max_examples=1000)
@given(weight_matrices())
def test_property_bit_identical_or_documented_error(case):
    w, group_size, bits = case
    largest = mx.max(mx.abs(w)).item()
    if bits not in SUPPORTED_BITS or not largest < MAX_ABS_WEIGHT:
        event("documented error")
        with pytest.raises(QuantizationError):
            quantize(w, group_size, bits)
        return
    event("bit-identical")
    assert_same_as_mlx(w, group_size, bits)


@settings(max_examples=200)
@given(st.sampled_from(SUPPORTED_BITS), st.integers(1, 3), st.data())
def test_property_pack_unpack_round_trip(bits, packs, data):
    cols = packs * 32
    codes = data.draw(hnp.arrays(np.uint32, (2, cols), elements=st.integers(0, 2**bits - 1)))
    words = pack(mx.array(codes), bits)
    assert words.shape == (2, cols * bits // 32)
    assert np.array_equal(np.array(unpack(words, bits)), codes)


# -- whole models ------------------------------------------------------------------------

from lora_course import Model, ModelArgs, apply_lora, fuse  # noqa: E402
from lora_course.quant.dequant import (
    DequantEmbedding,  # noqa: E402
    DequantLinear,
    dequant_matmul,
)
from lora_course.quant.layers import quantize_model, use_dequant_layers
from lora_course.quant.size import effective_bits, model_size
from lora_course.tree import tree_flatten  # noqa: E402

import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402

BLOCK_LINEARS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]


def tiny(**overrides):
    cfg = dict(dim=64, n_layers=2, hidden_dim=128, n_heads=4, n_kv_heads=2, vocab_size=256)
    mx.random.seed(0)
    model = Model(ModelArgs(**{**cfg, **overrides}))
    mx.eval(model.parameters())
    return model


def test_quantize_model_swaps_block_linears_with_our_quantizer():
    model = tiny()
    floats = {k: v for k, v in tree_flatten(model.parameters())}
    quantize_model(model, group_size=32, bits=4)
    modules = dict(model.named_modules())
    for i in range(2):
        for key in BLOCK_LINEARS:
            path = f"model.layers.{i}.{key}"
            layer = modules[path]
            assert isinstance(layer, DequantLinear) and (layer.group_size, layer.bits) == (32, 4)
            ref = mx.quantize(floats[f"{path}.weight"], 32, 4)
            for ours, theirs in zip((layer.weight, layer.scales, layer.biases), ref):
                assert mx.array_equal(ours, theirs).item(), path
    assert type(modules["lm_head"]) is nn.Linear  # output size == vocab: the head stays float
    assert type(modules["model.embed_tokens"]) is nn.Embedding
    assert model.args.quantization == {"group_size": 32, "bits": 4}
    assert model.args.to_hf_dict()["quantization"] == {"group_size": 32, "bits": 4}


def test_default_predicate_skips_widths_that_do_not_divide():
    model = tiny(hidden_dim=96)  # down_proj's input width 96 is not a multiple of 64
    quantize_model(model, group_size=64, bits=4)
    block = model.layers[0]
    assert type(block.mlp.down_proj) is nn.Linear
    assert isinstance(block.mlp.up_proj, DequantLinear)  # input width 64 divides


def test_custom_predicate_embedding_and_tied_head():
    model = tiny(tie_word_embeddings=True)
    tokens = mx.random.randint(0, 256, (2, 8))
    before = model(tokens)
    quantize_model(
        model, 64, 8, predicate=lambda path, m: "mlp" in path or "embed" in path, quantize_embedding=True
    )
    assert isinstance(model.model.embed_tokens, DequantEmbedding)
    assert type(model.layers[0].self_attn.q_proj) is nn.Linear
    assert isinstance(model.layers[0].mlp.up_proj, DequantLinear)
    after = model(tokens)  # the tied head runs through DequantEmbedding.as_linear
    assert after.shape == (2, 8, 256)
    assert mx.abs(after - before).max().item() < 0.1  # 8 bits: close to the float model


def test_quantize_model_names_the_bad_layer():
    model = tiny()
    model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(QuantizationError, match=r"model\.layers\.1\.mlp\.up_proj.*finite"):
        quantize_model(model)


def test_model_size_counts_scales_and_biases():
    model = tiny()
    fp32 = model_size(model)
    assert fp32.bits_per_weight == 32.0 and fp32.quantized_parameters == 0
    quantize_model(model, group_size=64, bits=4)
    q = model_size(model)
    assert q.parameters == fp32.parameters  # logical count unchanged
    # per block: q, o (64x64); k, v (32x64, two kv heads); gate, up, down (128x64)
    assert q.quantized_parameters == 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64)
    assert q.quantized_bits_per_weight == effective_bits(4, 64, mx.float32) == 5.0  # 4 + 2*32/64
    assert q.total_bytes < fp32.total_bytes
    assert "bits/weight" in str(q)
    assert effective_bits(4, 64) == 4.5 and effective_bits(3, 32, mx.bfloat16) == 4.0


def test_model_size_of_half_precision_model():
    model = tiny()
    model.update(tree_map_float16(model.parameters()))
    quantize_model(model, group_size=64, bits=4)
    assert model.layers[0].mlp.up_proj.scales.dtype == mx.float16
    assert model_size(model).quantized_bits_per_weight == 4.5


def tree_map_float16(params):
    from lora_course.tree import tree_map

    return tree_map(lambda a: a.astype(mx.float16), params)


# -- the fast CPU path --------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequant_linear_matches_quantized_matmul_with_gradients(bits):
    mx.random.seed(bits)
    linear = nn.Linear(128, 96, bias=True)
    stock = nn.QuantizedLinear.from_linear(linear, group_size=64, bits=bits)
    fast = DequantLinear.from_linear(linear, group_size=64, bits=bits)
    assert isinstance(fast, DequantLinear)
    fast.path = "dequant"
    x = mx.random.normal((3, 5, 128))
    cot = mx.random.normal((3, 5, 96))

    def loss(layer):
        return lambda x: (layer(x) * cot).sum()

    assert mx.abs(fast(x) - stock(x)).max().item() <= 1e-4
    g_fast, g_stock = mx.grad(loss(fast))(x), mx.grad(loss(stock))(x)
    assert mx.abs(g_fast - g_stock).max().item() <= 1e-4
    fast.path = "kernel"  # the GPU path is MLX's own kernel, exactly
    assert mx.array_equal(fast(x), stock(x)).item()


def test_dequant_path_is_chosen_by_device():
    fast = DequantLinear(64, 32, bias=False, group_size=64, bits=4)
    from lora_course.quant.dequant import _dequant_path

    assert _dequant_path(fast) == (mx.default_device() == mx.cpu)
    fast.path = "kernel"
    assert not _dequant_path(fast)


def test_dequant_matmul_gradient_via_value_and_grad_keeps_weights_frozen():
    mx.random.seed(0)
    w_q, scales, biases = quantize(mx.random.normal((32, 64)), 64, 4)
    x = mx.random.normal((4, 64))
    dx = mx.grad(lambda x: dequant_matmul(x, w_q, scales, biases, 64, 4).sum())(x)
    dense = mx.dequantize(w_q, scales, biases, 64, 4)
    assert mx.allclose(dx, mx.broadcast_to(dense.sum(0), (4, 64)), atol=1e-5).item()


def test_use_dequant_layers_swaps_stock_layers_sharing_arrays():
    model = tiny()
    nn.quantize(
        model, 64, 4, class_predicate=lambda p, m: isinstance(m, nn.Linear) and m.weight.shape[0] != 256
    )
    tokens = mx.random.randint(0, 256, (1, 8))
    before = model(tokens)
    stock_weight = model.layers[0].mlp.up_proj.weight
    use_dequant_layers(model)
    assert isinstance(model.layers[0].mlp.up_proj, DequantLinear)
    assert model.layers[0].mlp.up_proj.weight is stock_weight
    assert mx.abs(model(tokens) - before).max().item() <= 1e-4


# -- QLoRA --------------------------------------------------------------------------------


def _lm_loss(model, x, y):
    return nn.losses.cross_entropy(model(x), y, reduction="mean")


def test_qlora_trains_only_adapters_and_matches_kernel_path():
    model = tiny()
    quantize_model(model, group_size=32, bits=4)
    apply_lora(model, num_layers=2, rank=4)
    tokens = mx.random.randint(0, 256, (2, 17))
    x, y = tokens[:, :-1], tokens[:, 1:]
    loss_and_grad = nn.value_and_grad(model, _lm_loss)
    loss, grads = loss_and_grad(model, x, y)
    names = [k for k, _ in tree_flatten(grads)]
    assert names and all(k.endswith(("lora_a", "lora_b")) for k in names)
    assert len(names) == 2 * 2 * len(BLOCK_LINEARS)

    for _, m in model.named_modules():  # the same step through mx.quantized_matmul
        if isinstance(m, DequantLinear):
            m.path = "kernel"
    loss_k, grads_k = loss_and_grad(model, x, y)
    assert abs(loss.item() - loss_k.item()) <= 1e-4
    for (k, g), (_, gk) in zip(tree_flatten(grads), tree_flatten(grads_k)):
        assert mx.abs(g - gk).max().item() <= 1e-4, k


def test_qlora_loss_goes_down_and_fuse_dequantizes():
    model = tiny()
    quantize_model(model, group_size=64, bits=4)
    apply_lora(model, num_layers=2, rank=4)
    frozen = model.layers[0].mlp.up_proj.linear.weight
    tokens = mx.random.randint(0, 256, (2, 17))
    x, y = tokens[:, :-1], tokens[:, 1:]
    loss_and_grad = nn.value_and_grad(model, _lm_loss)
    optimizer = optim.Adam(learning_rate=1e-2)
    losses = []
    for _ in range(6):
        loss, grads = loss_and_grad(model, x, y)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert model.layers[0].mlp.up_proj.linear.weight is frozen  # the packed base never moved
    logits = model(x)
    fuse(model, de_quantize=True)
    assert not any(
        isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules()
    )
    assert model.args.quantization is None
    assert mx.abs(model(x) - logits).max().item() <= 1e-4


def test_quantized_model_save_load_round_trip(tmp_path):
    from lora_course import train_tokenizer
    from lora_course.checkpoint.load import load
    from lora_course.checkpoint.save import save

    tokenizer = train_tokenizer([f"line {i}: cats, dogs and quantized weights" for i in range(50)], 300, None)
    model = tiny(vocab_size=tokenizer.vocab_size)
    quantize_model(model, group_size=32, bits=4)
    save(model, tokenizer, tmp_path / "ckpt")
    loaded, _ = load(tmp_path / "ckpt")
    assert loaded.args.quantization == {"group_size": 32, "bits": 4}
    assert isinstance(loaded.layers[1].mlp.down_proj, DequantLinear)
    tokens = mx.array([[1, 2, 3, 4, 5]])
    assert mx.array_equal(loaded(tokens), model(tokens)).item()


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_dequant_linear_half_precision_dtype_and_values(dtype):
    mx.random.seed(0)
    linear = nn.Linear(128, 64, bias=False)
    linear.weight = linear.weight.astype(dtype)
    stock = nn.QuantizedLinear.from_linear(linear, group_size=64, bits=4)
    fast = DequantLinear.from_linear(linear, group_size=64, bits=4)
    fast.path = "dequant"
    x = mx.random.normal((4, 128)).astype(dtype)
    y_fast, y_stock = fast(x), stock(x)
    assert y_fast.dtype == y_stock.dtype == dtype
    # both round to the half dtype; the fast path accumulates in float32
    assert mx.allclose(y_fast.astype(mx.float32), y_stock.astype(mx.float32), rtol=2e-2, atol=2e-2).item()
    dx = mx.grad(lambda x: fast(x).astype(mx.float32).sum())(x)
    assert dx.dtype == dtype


@pytest.mark.parametrize("compiled", [False, True])
def test_dequant_path_memory_does_not_grow_with_depth(compiled):
    """Forward and backward through n frozen 4-bit layers (4 MiB of float weight each):
    the peak must not grow with n, compiled (where mx.compile could merge the two
    dequantizations) or not. Keeping float weights alive would add 4 MiB per layer."""
    dims = 1024

    def extra_peak_mib(n_layers):
        mx.random.seed(0)
        layers = [
            DequantLinear.from_linear(nn.Linear(dims, dims, bias=False), 64, 4) for _ in range(n_layers)
        ]
        for layer in layers:
            layer.path = "dequant"
        mx.eval([layer.parameters() for layer in layers])

        def loss(x):
            for layer in layers:
                x = layer(x)
            return x.sum()

        grad = mx.compile(mx.grad(loss)) if compiled else mx.grad(loss)
        x = mx.random.normal((4, dims))
        mx.eval(x, grad(x))  # warm up (compilation)
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        mx.eval(grad(x))
        return (mx.get_peak_memory() - base) / 2**20

    shallow, deep = extra_peak_mib(6), extra_peak_mib(14)  # 8 more layers: 32 MiB if kept
    assert deep - shallow < 8.0, f"peak grew from {shallow:.1f} to {deep:.1f} MiB"
