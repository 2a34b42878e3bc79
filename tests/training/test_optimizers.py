"""Optimizers by name (all ten of mlx.optimizers), their settings, LoRA+, and exact resume with each."""

import lora_course  # noqa: F401  (BLAS before mlx)
from lora_course import Model, ModelArgs
from lora_course.adapters.apply import apply_lora
from lora_course.data.batching import iterate_batches
from lora_course.training import resume as ckpt
from lora_course.training.args import TrainingArgs
from lora_course.training.evaluate import loss
from lora_course.training.optimizers import OPTIMIZERS, build_optimizer, is_lora_b
from lora_course.training.step import make_step
from lora_course.training.trainer import train
from lora_course.tree import tree_unflatten

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest

ARGS = ModelArgs(dim=32, n_layers=2, hidden_dim=64, n_heads=4, n_kv_heads=2, vocab_size=64)
# A learning rate at which a few steps of each clearly lower the loss of the tiny model.
RATES = dict(
    sgd=0.5,
    rmsprop=3e-3,
    adagrad=3e-2,
    adadelta=3.0,
    adam=1e-2,
    adamw=1e-2,
    adamax=1e-2,
    lion=3e-3,
    adafactor=1e-2,
    muon=3e-2,
)


def make_model(seed=0):
    mx.random.seed(seed)
    model = Model(ARGS)
    apply_lora(model, num_layers=2, rank=4, alpha=8.0)
    # lora_b starts at zero; give it values so both A and B get gradients from step one
    flat = ckpt.trainable_arrays(model)
    model.update(
        tree_unflatten([(k, 0.05 * mx.random.normal(v.shape)) for k, v in flat.items() if is_lora_b(k)])
    )
    mx.eval(model.parameters())
    return model


def make_data(n, seed=0):
    rng = np.random.default_rng(seed)
    return [([int(t) for t in rng.integers(1, 64, size=int(rng.integers(5, 20)))], None) for _ in range(n)]


def test_all_ten_are_mlx_optimizers():
    assert list(OPTIMIZERS) == list(RATES)
    for name, cls in OPTIMIZERS.items():
        assert type(build_optimizer(name, 1e-3)) is cls
    assert isinstance(build_optimizer("lion", 1e-3, lora_plus_ratio=4.0), optim.MultiOptimizer)


def test_bad_settings_are_errors_naming_them():
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
        build_optimizer("lamb", 1e-3)
    with pytest.raises(ValueError, match="weight_decay=0.1: adam has no weight decay.*adamw"):
        TrainingArgs(optimizer="adam", weight_decay=0.1)
    with pytest.raises(ValueError, match="sgd has no setting 'betas'; it takes momentum"):
        TrainingArgs(optimizer="sgd", optimizer_config={"betas": [0.9, 0.99]})
    with pytest.raises(ValueError, match="eps='tiny' must be a number"):
        TrainingArgs(optimizer="adam", optimizer_config={"eps": "tiny"})
    with pytest.raises(ValueError, match="lora_plus_ratio"):
        TrainingArgs(lora_plus_ratio=0.0)
    args = TrainingArgs.from_dict(
        {"optimizer": "sgd", "optimizer_config": {"momentum": 0.9, "nesterov": True}}
    )
    opt = build_optimizer(args.optimizer, 0.1, config=args.optimizer_config)
    assert opt.momentum == 0.9 and opt.nesterov


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_few_steps_lower_the_loss(name):
    model = make_model()
    batch = next(iterate_batches(make_data(4), 4, 2048))
    opt = build_optimizer(name, RATES[name])
    opt.init(model.trainable_parameters())
    _, update = make_step(model, opt, loss)
    losses = [update(*batch, None)[0].item() for _ in range(6)]
    assert losses[-1] < losses[0] - 1e-3, losses


def _run(tmp_path, name, iters, resume=False, **kw):
    model = make_model()
    args = TrainingArgs(
        iters=iters,
        batch_size=4,
        learning_rate=RATES[name],
        optimizer=name,
        weight_decay=0.01 if name in ("sgd", "adamw", "lion", "adafactor", "muon") else 0.0,
        steps_per_report=1,
        steps_per_eval=0,
        save_every=2,
        adapter_path=str(tmp_path),
        **kw,
    )
    train(model, make_data(12), args=args, resume=resume, progress=False, verbose=False)
    return ckpt.trainable_arrays(model)


@pytest.mark.parametrize("name,ratio", [(n, None) for n in OPTIMIZERS] + [("adam", 8.0), ("muon", 4.0)])
def test_resume_is_bitwise_with_every_optimizer(tmp_path, name, ratio):
    straight = _run(tmp_path / "a", name, 4, lora_plus_ratio=ratio)
    _run(tmp_path / "b", name, 2, lora_plus_ratio=ratio)
    resumed = _run(tmp_path / "b", name, 4, resume=True, lora_plus_ratio=ratio)
    assert all(mx.array_equal(straight[k], resumed[k]).item() for k in straight)


def test_lora_plus_moves_b_ratio_times_further():
    batch = next(iterate_batches(make_data(4), 4, 2048))
    deltas = []
    for ratio in (None, 16.0):
        model = make_model()
        before = ckpt.trainable_arrays(model)
        opt = build_optimizer("sgd", 0.1, lora_plus_ratio=ratio)
        opt.init(model.trainable_parameters())
        make_step(model, opt, loss)[1](*batch, None)
        after = ckpt.trainable_arrays(model)
        deltas.append({k: after[k] - before[k] for k in before})
    plain, plus = deltas
    assert any(is_lora_b(k) for k in plain) and any(not is_lora_b(k) for k in plain)
    for k in plain:
        factor = 16.0 if is_lora_b(k) else 1.0
        np.testing.assert_allclose(
            np.array(plus[k]), factor * np.array(plain[k]), rtol=1e-5, atol=1e-6
        )  # after - before: float32 rounding
    assert build_optimizer("adam", 1e-3, lora_plus_ratio=16.0).learning_rate.item() == pytest.approx(1e-3)
