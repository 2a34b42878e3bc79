"""Our quantizer against MLX's: same packed words, scales and biases, bit for bit."""

import lora_course  # noqa: F401  (BLAS before mlx)

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lora_course.quant import (
    MAX_ABS_WEIGHT,
    SUPPORTED_BITS,
    SUPPORTED_GROUP_SIZES,
    QuantizationError,
    dequantize,
    pack,
    quantize,
    unpack,
)

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
