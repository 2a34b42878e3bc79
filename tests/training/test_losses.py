"""Distillation losses against NumPy, and training a student toward a teacher."""

import math

import lora_course  # noqa: F401  (BLAS before mlx)
from lora_course import Model, ModelArgs
from lora_course.adapters.apply import apply_lora
from lora_course.training.args import TrainingArgs
from lora_course.training.evaluate import evaluate
from lora_course.training.losses import distillation_loss, js_div_loss, kl_div_loss
from lora_course.training.trainer import train

import mlx.core as mx
import numpy as np
import pytest


def np_log_softmax(x, t):
    x = np.asarray(x, np.float64) / t
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_kl(s, t, temp):
    lq, lp = np_log_softmax(s, temp), np_log_softmax(t, temp)
    return (np.exp(lp) * (lp - lq)).sum(-1) * temp**2


def np_js(s, t, temp):
    lq, lp = np_log_softmax(s, temp), np_log_softmax(t, temp)
    p, q = np.exp(lp), np.exp(lq)
    m = (p + q) / 2
    return 0.5 * ((p * (lp - np.log(m))).sum(-1) + (q * (lq - np.log(m))).sum(-1)) * temp**2


@pytest.fixture
def logits():
    rng = np.random.default_rng(0)
    s = rng.normal(0, 3, (2, 5, 50)).astype(np.float32)
    t = rng.normal(0, 3, (2, 5, 50)).astype(np.float32)
    mask = (rng.random((2, 5)) > 0.3).astype(np.float32)
    return s, t, mask


@pytest.mark.parametrize("temp", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("fn,ref", [(kl_div_loss, np_kl), (js_div_loss, np_js)])
def test_matches_numpy(logits, fn, ref, temp):
    s, t, mask = logits
    per = np.array(fn(mx.array(s), mx.array(t), temp, reduction="none"))
    np.testing.assert_allclose(per, ref(s, t, temp), rtol=1e-4, atol=1e-6)
    masked = fn(mx.array(s), mx.array(t), temp, mx.array(mask)).item()
    assert masked == pytest.approx((ref(s, t, temp) * mask).sum() / mask.sum(), rel=1e-4)
    assert fn(mx.array(s), mx.array(t), temp).item() == pytest.approx(ref(s, t, temp).mean(), rel=1e-4)


def test_divergence_properties(logits):
    s, t, _ = logits
    s, t = mx.array(s), mx.array(t)
    assert kl_div_loss(s, s).item() == pytest.approx(0.0, abs=1e-6)
    assert js_div_loss(s, t).item() == pytest.approx(js_div_loss(t, s).item(), rel=1e-5)  # symmetric
    assert kl_div_loss(s, t).item() != pytest.approx(kl_div_loss(t, s).item(), rel=1e-3)  # KL is not
    per = np.array(js_div_loss(s * 100, -t * 100, reduction="none"))
    assert (per <= math.log(2) + 1e-4).all() and (per >= -1e-6).all()  # JS is bounded by log 2


def test_gradient_flows_to_the_student_only(logits):
    s, t, _ = logits
    g_s, g_t = mx.grad(lambda a, b: kl_div_loss(a, mx.stop_gradient(b)), argnums=(0, 1))(
        mx.array(s), mx.array(t)
    )
    assert float(mx.abs(g_s).sum().item()) > 0 and float(mx.abs(g_t).sum().item()) == 0
    # d KL / d student_logits = (q - p) / n_positions at T = 1
    q, p = np.exp(np_log_softmax(s, 1)), np.exp(np_log_softmax(t, 1))
    np.testing.assert_allclose(np.array(g_s), (q - p) / 10, atol=1e-6)


def test_bad_arguments():
    teacher = Model(ModelArgs(dim=32, n_layers=1, hidden_dim=64, n_heads=4, vocab_size=64))
    with pytest.raises(ValueError, match="unknown divergence 'mse'"):
        distillation_loss(teacher, kind="mse")
    with pytest.raises(ValueError, match="temperature must be positive"):
        distillation_loss(teacher, temperature=0)
    with pytest.raises(ValueError, match="reduction"):
        kl_div_loss(mx.zeros((1, 3)), mx.zeros((1, 3)), reduction="max")


@pytest.mark.parametrize("kind", ["kl", "js"])
def test_training_with_a_teacher_pulls_the_student_toward_it(tmp_path, kind):
    args = ModelArgs(dim=32, n_layers=2, hidden_dim=64, n_heads=4, vocab_size=64)
    mx.random.seed(1)
    teacher = Model(args)
    mx.random.seed(2)
    student = Model(args)
    apply_lora(student, num_layers=2, rank=8)
    rng = np.random.default_rng(0)
    data = [([int(t) for t in rng.integers(1, 64, 16)], None) for _ in range(8)]
    objective = distillation_loss(teacher, kind=kind, temperature=2.0)
    before = evaluate(student, data, 8, loss_fn=objective)[0]
    hist = train(
        student,
        data,
        args=TrainingArgs(
            iters=30, batch_size=8, learning_rate=3e-2, steps_per_eval=0, adapter_path=str(tmp_path)
        ),
        teacher=teacher,
        distill=kind,
        temperature=2.0,
        progress=False,
        verbose=False,
    )
    after = evaluate(student, data, 8, loss_fn=objective)[0]
    assert hist.losses[0] == pytest.approx(before, rel=1e-4)
    assert after < 0.7 * before
