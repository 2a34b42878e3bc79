"""fastmath: every fast function equals the MLX op it replaces, values and gradients."""

import lora_course  # noqa: F401  (BLAS before mlx)
from lora_course.model import fastmath as fastmath

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setenv(fastmath.ENV, "1")
    monkeypatch.setattr(fastmath, "SMALL", 0)  # the fast path even for these small inputs
    assert fastmath.enabled()


def test_small_inputs_use_the_mlx_op(monkeypatch):
    monkeypatch.setenv(fastmath.ENV, "1")
    x = mx.random.normal((1, 1, 64))  # one token's SiLU input
    np.testing.assert_array_equal(np.array(fastmath.silu(x)), np.array(nn.silu(x)))
    q, k = mx.random.normal((1, 4, 1, 16)), mx.random.normal((1, 4, 30, 16))  # decoding one token
    np.testing.assert_array_equal(
        np.array(fastmath.attention(q, k, k, 0.25, causal=False)),
        np.array(mx.fast.scaled_dot_product_attention(q, k, k, scale=0.25)),
    )


def rel_err(a, b, floor=1e-6):
    """Largest |a - b| / max(|b|, floor): relative error, absolute below ``floor``."""
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), floor)))


def test_switch(monkeypatch):
    monkeypatch.setenv(fastmath.ENV, "0")
    assert not fastmath.enabled()
    monkeypatch.setenv(fastmath.ENV, "1")
    assert fastmath.enabled()
    monkeypatch.delenv(fastmath.ENV)
    assert fastmath.enabled() == (fastmath._X86_LINUX and mx.default_device() == mx.cpu)


def test_exp_matches_mlx(fast):
    mx.random.seed(0)
    x = mx.random.normal((64, 300)) * 20
    assert rel_err(fastmath.exp(x), mx.exp(x)) < 1e-6
    special = mx.array([0.0, -0.0, -mx.inf, mx.inf, -1e30, 1e30, -87.0, 88.0, -104.0, 1e-8])
    np.testing.assert_array_equal(np.array(fastmath.exp(special)), np.array(mx.exp(special)))
    # below -88 MLX flushes to 0; we return the (subnormal) value libm gives
    assert 0.0 <= fastmath.exp(mx.array([-88.5])).item() < 1e-38
    assert mx.isnan(fastmath.exp(mx.array([mx.nan]))).item()


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_activations_match_mlx(fast, dtype):
    mx.random.seed(1)
    x = (mx.random.normal((8, 96)) * 6).astype(dtype)
    # Half types are computed in float32 and rounded once: compare with MLX in float32.
    tol = {mx.float32: 1e-6, mx.float16: 1e-3, mx.bfloat16: 8e-3}[dtype]
    x32 = x.astype(mx.float32)
    for got, want in [
        (fastmath.sigmoid(x), mx.sigmoid(x32)),
        (fastmath.silu(x), nn.silu(x32)),
        (fastmath.softmax(x), mx.softmax(x32, axis=-1)),
    ]:
        assert got.dtype == dtype
        assert rel_err(got, want, floor=1e-3) < tol
    assert rel_err(fastmath.logsumexp(x, axis=0), mx.logsumexp(x32, axis=0)) < tol
    assert fastmath.logsumexp(x, keepdims=True).shape == (8, 1)


def test_gradients_match_mlx(fast):
    mx.random.seed(2)
    x = mx.random.normal((4, 33)) * 3
    w = mx.random.normal((4, 33))
    pairs = [
        (fastmath.silu, nn.silu),
        (fastmath.sigmoid, mx.sigmoid),
        (fastmath.softmax, lambda a: mx.softmax(a, axis=-1)),
        (lambda a: fastmath.logsumexp(a)[:, None], lambda a: mx.logsumexp(a, axis=-1)[:, None]),
    ]
    for ours, theirs in pairs:
        g1 = mx.grad(lambda a: (ours(a) * w).sum())(x)
        g2 = mx.grad(lambda a: (theirs(a) * w).sum())(x)
        np.testing.assert_allclose(np.array(g1), np.array(g2), rtol=1e-5, atol=1e-6)


def test_no_overflow_at_extremes(fast):
    x = mx.array([-1e4, -200.0, -90.0, -20.0, 0.0, 20.0, 90.0, 200.0, 1e4])
    for fn, ref in [(fastmath.sigmoid, mx.sigmoid), (fastmath.silu, nn.silu)]:
        np.testing.assert_allclose(np.array(fn(x)), np.array(ref(x)), rtol=1e-6, atol=1e-30 * 1e4)
        grad = mx.grad(lambda a: fn(a).sum())(x)
        assert mx.all(mx.isfinite(grad)).item(), fn.__name__
    wide = mx.array([[-1e4, 0.0, 1e4], [-mx.inf, 1.0, 2.0]])
    for fn in (fastmath.softmax, lambda a: fastmath.logsumexp(a)[:, None]):
        assert mx.all(mx.isfinite(mx.grad(lambda a: (fn(a) * a.shape[-1]).sum())(wide)[:, 1:])).item()
    ce_grad = mx.grad(lambda a: fastmath.cross_entropy(a, mx.array([0, 2])).sum())(wide)
    assert mx.all(mx.isfinite(ce_grad[0])).item() and mx.all(mx.isfinite(ce_grad[1, 1:])).item()


def test_cross_entropy_matches_mlx(fast):
    mx.random.seed(3)
    logits = mx.random.normal((2, 5, 50)) * 4
    targets = mx.random.randint(0, 50, (2, 5))
    ours = fastmath.cross_entropy(logits, targets)
    theirs = nn.losses.cross_entropy(logits, targets)
    assert ours.shape == (2, 5) and ours.dtype == mx.float32
    assert rel_err(ours, theirs) < 1e-6
    g1 = mx.grad(lambda a: fastmath.cross_entropy(a, targets).mean())(logits)
    g2 = mx.grad(lambda a: nn.losses.cross_entropy(a, targets).mean())(logits)
    np.testing.assert_allclose(np.array(g1), np.array(g2), rtol=1e-5, atol=1e-7)
    # huge logits stay finite, -inf logits (a masked vocabulary) carry no probability
    big = mx.array([[1e4, 0.0, -mx.inf]])
    np.testing.assert_allclose(np.array(fastmath.cross_entropy(big, mx.array([1]))), [1e4])


@pytest.mark.parametrize(
    "heads,kv_heads,q_len,k_len", [(4, 4, 7, 7), (4, 2, 7, 7), (4, 1, 3, 9), (2, 2, 1, 6)]
)
def test_attention_matches_fast_sdpa(fast, heads, kv_heads, q_len, k_len):
    mx.random.seed(4)
    q = mx.random.normal((2, heads, q_len, 16))
    k = mx.random.normal((2, kv_heads, k_len, 16))
    v = mx.random.normal((2, kv_heads, k_len, 16))
    causal = q_len > 1
    ours = fastmath.attention(q, k, v, 0.25, causal)
    theirs = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask="causal" if causal else None)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(np.array(ours), np.array(theirs), rtol=1e-5, atol=1e-5)

    def loss(fn):
        return lambda q, k, v: (fn(q, k, v) * v.mean()).sum()

    g1 = mx.grad(loss(lambda q, k, v: fastmath.attention(q, k, v, 0.25, causal)), argnums=(0, 1, 2))(q, k, v)
    g2 = mx.grad(
        loss(
            lambda q, k, v: mx.fast.scaled_dot_product_attention(
                q, k, v, scale=0.25, mask="causal" if causal else None
            )
        ),
        argnums=(0, 1, 2),
    )(q, k, v)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-5)


def test_off_path_is_the_mlx_op(monkeypatch):
    monkeypatch.setenv(fastmath.ENV, "0")
    x = mx.random.normal((3, 8))
    np.testing.assert_array_equal(np.array(fastmath.exp(x)), np.array(mx.exp(x)))
    np.testing.assert_array_equal(np.array(fastmath.silu(x)), np.array(nn.silu(x)))
    t = mx.array([1, 2, 3])
    np.testing.assert_array_equal(
        np.array(fastmath.cross_entropy(x, t)), np.array(nn.losses.cross_entropy(x, t))
    )


def test_compiles(fast):
    x = mx.random.normal((4, 64))
    f = mx.compile(lambda a: fastmath.softmax(fastmath.silu(a)))
    assert rel_err(f(x), mx.softmax(nn.silu(x), axis=-1)) < 1e-6


def test_swiglu_matches_silu_times_up(fast):
    mx.random.seed(5)
    gate, up = mx.random.normal((2, 9, 40)) * 4, mx.random.normal((2, 9, 40))
    w = mx.random.normal((2, 9, 40))
    assert rel_err(fastmath.swiglu(gate, up), nn.silu(gate) * up, floor=1e-3) < 1e-6

    def loss(fn):
        return lambda g, u: (fn(g, u) * w).sum()

    ours = mx.grad(loss(fastmath.swiglu), argnums=(0, 1))(gate, up)
    theirs = mx.grad(loss(lambda g, u: nn.silu(g) * u), argnums=(0, 1))(gate, up)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-6)
    compiled = mx.compile(mx.grad(loss(fastmath.swiglu), argnums=(0, 1)))(gate, up)
    for a, b in zip(compiled, theirs):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-6)
    half = fastmath.swiglu(gate.astype(mx.bfloat16), up.astype(mx.bfloat16))
    assert half.dtype == mx.bfloat16 and half.shape == gate.shape


@pytest.mark.parametrize("window", [None, 3])
def test_attention_gradients_compiled_and_masked(fast, window):
    """The recomputing backward under mx.compile (the trainer's step), GQA, with and without
    a sliding-window mask, equals MLX's fused attention's gradients."""
    from lora_course.model.attention import sliding_window_mask

    mx.random.seed(6)
    q, k, v = (
        mx.random.normal((1, 4, 8, 16)),
        mx.random.normal((1, 2, 8, 16)),
        mx.random.normal((1, 2, 8, 16)),
    )
    w = mx.random.normal((1, 4, 8, 16))
    mask = None if window is None else sliding_window_mask(8, 8, window)

    def ours(q, k, v):
        return (fastmath.attention(q, k, v, 0.25, causal=True, mask=mask) * w).sum()

    def theirs(q, k, v):
        m = "causal" if mask is None else mask
        return (mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=m) * w).sum()

    got = mx.compile(mx.grad(ours, argnums=(0, 1, 2)))(q, k, v)
    want = mx.grad(theirs, argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-5)


def _compiled_grad_peak_mib(fn, *inputs) -> float:
    step = mx.compile(mx.grad(fn, argnums=tuple(range(len(inputs)))))
    mx.eval(step(*inputs))  # compile first
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    mx.eval(step(*inputs))
    return (mx.get_peak_memory() - before) / 2**20


def test_backward_keeps_no_probabilities_or_hidden_products(fast):
    """The compiled gradient of n stacked attentions (8 heads x 512 x 512 probabilities:
    8 MiB each) or SwiGLUs (4 MiB hidden products): eight more of them must not add eight
    times what autodiff keeps per layer, only transients of one or two layers."""
    mx.random.seed(7)
    x = mx.random.normal((1, 8, 512, 16))

    def attention_stack(attend, n):
        def fn(x):
            for _ in range(n):
                x = attend(x)
            return x.sum()

        return fn

    def growth(fn, make, *inputs):  # extra peak of 16 layers over 8
        return _compiled_grad_peak_mib(make(fn, 16), *inputs) - _compiled_grad_peak_mib(make(fn, 8), *inputs)

    def sdpa(x):
        return mx.fast.scaled_dot_product_attention(x, x, x, scale=0.25, mask="causal")

    assert growth(sdpa, attention_stack, x) > 56  # MLX keeps the 8 x 8 MiB of probabilities
    assert growth(lambda x: fastmath.attention(x, x, x, 0.25, causal=True), attention_stack, x) < 16

    # a feed-forward stack, x + swiglu(x w1, x w2) w3, hidden products of 4 MiB
    x = mx.random.normal((256, 256))
    w1, w2 = mx.random.normal((256, 4096)) * 0.05, mx.random.normal((256, 4096)) * 0.05
    w3 = mx.random.normal((4096, 256)) * 0.05

    def ffn_stack(product, n):
        def fn(x):
            for _ in range(n):
                x = x + product(x @ w1, x @ w2) @ w3
            return x.sum()

        return fn

    # gate, up, the product (w3's input) and, through silu, sigmoid(gate) and silu(gate)
    keep_all = growth(lambda g, u: fastmath.silu(g) * u, ffn_stack, x)
    assert keep_all > 8 * 3 * 4  # at least three of them per layer (measured: 128 MiB)
    assert growth(fastmath.swiglu, ffn_stack, x) < keep_all - 8 * 4  # at least one matrix less per layer
