"""The training loop: config checking, loss, batching, schedules, accumulation, compile,
checkpointing, exact resume, early stopping, the NaN guard and write failures."""

import errno
import json
import math
import re

import lora_course  # noqa: F401  (BLAS before mlx)
from lora_course import Model, ModelArgs, atomic
from lora_course.adapters.apply import apply_lora
from lora_course.adapters.files import load_adapters
from lora_course.config import ConfigError
from lora_course.data.batching import iterate_batches
from lora_course.training import resume as ckpt
from lora_course.training.args import TrainingArgs
from lora_course.training.evaluate import evaluate, loss
from lora_course.training.optimizers import build_optimizer
from lora_course.training.run import TrainingDivergedError
from lora_course.training.schedules import build_schedule
from lora_course.training.step import enable_grad_checkpoint, make_step
from lora_course.training.trainer import train
from lora_course.tree import tree_flatten, tree_unflatten

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest

ARGS = ModelArgs(dim=32, n_layers=2, hidden_dim=64, n_heads=4, n_kv_heads=2, vocab_size=64)


def make_model(dropout=0.0, seed=0):
    mx.random.seed(seed)
    model = Model(ARGS)
    apply_lora(model, num_layers=2, rank=4, alpha=8.0, dropout=dropout)
    mx.eval(model.parameters())
    return model


def make_data(n, seed=0, lo=3, hi=30, vocab=64, masked=False):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        toks = [int(t) for t in rng.integers(1, vocab, size=int(rng.integers(lo, hi)))]
        mask = [0] * (len(toks) // 2) + [1] * (len(toks) - len(toks) // 2) if masked else None
        out.append((toks, mask))
    return out


def quiet(**kw):
    base = dict(iters=8, batch_size=4, learning_rate=1e-2, steps_per_report=4, steps_per_eval=0, save_every=4)
    base.update(kw)
    return TrainingArgs(**base)


# ----------------------------------------------------------------------------- TrainingArgs


def test_from_dict_accepts_known_keys_and_converts_floats():
    args = TrainingArgs.from_dict({"iters": 5, "learning_rate": "1e-5", "grad_clip": 1, "epochs": None})
    assert args.iters == 5 and args.learning_rate == 1e-5 and args.grad_clip == 1.0
    assert isinstance(args.grad_clip, float) and args.epochs is None


def test_from_dict_unknown_key_names_it_and_suggests():
    with pytest.raises(
        ConfigError, match=r"run.yaml: unknown key 'learnin_rate' \(did you mean 'learning_rate'"
    ):
        TrainingArgs.from_dict({"learnin_rate": 1e-4}, source="run.yaml")
    assert TrainingArgs.from_dict({"nonsense": 1}, strict=False) == TrainingArgs()


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("iters", "ten", "an integer"),
        ("iters", 2.5, "an integer"),
        ("compile", "yes", "true/false"),
        ("learning_rate", [1], "a finite number"),
        ("grad_clip", "big", "a finite number or null"),
        ("batch_size", True, "an integer"),
    ],
)
def test_from_dict_wrong_type_names_key_expected_and_got(key, value, expected):
    with pytest.raises(ConfigError) as e:
        TrainingArgs.from_dict({key: value}, source="c.yaml")
    msg = str(e.value)
    assert f"c.yaml: key '{key}' must be {expected}" in msg and repr(value) in msg
    assert e.value.key == key


@pytest.mark.parametrize(
    "key,value",
    [
        ("batch_size", 0),
        ("optimizer", "lamb"),
        ("lr_schedule", "step"),
        ("val_batches", 0),
        ("early_stopping_patience", 0),
        ("seed", -1),
    ],
)
def test_bad_values_name_the_field(key, value):
    with pytest.raises(ValueError, match=f"{key}="):
        TrainingArgs(**{key: value})


# ----------------------------------------------------------------------------- loss


def test_loss_is_masked_token_mean_cross_entropy():
    model = make_model()
    rng = np.random.default_rng(1)
    inputs = mx.array(rng.integers(0, 64, (2, 6)).astype(np.int32))
    targets = mx.array(rng.integers(0, 64, (2, 6)).astype(np.int32))
    mask = mx.array(np.array([[1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 0]], np.float32))
    value, ntoks = loss(model, inputs, targets, mask)
    logits = np.array(model(inputs), np.float64)
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    nll = -np.take_along_axis(logp, np.array(targets)[..., None], -1)[..., 0]
    m = np.array(mask)
    assert ntoks.item() == 7
    assert value.item() == pytest.approx((nll * m).sum() / m.sum(), rel=1e-5)


def test_loss_with_no_loss_tokens_is_zero_not_nan():
    model = make_model()
    x = mx.zeros((1, 4), mx.int32)
    value, ntoks = loss(model, x, x, mx.zeros((1, 4)))
    assert value.item() == 0.0 and ntoks.item() == 0


# ----------------------------------------------------------------------------- batching


def test_eval_batches_cover_every_example_once_sorted_and_padded_to_8():
    data = make_data(13)
    seen = []
    for inputs, targets, mask in iterate_batches(data, 4, 2048):
        assert inputs.shape == targets.shape == mask.shape and inputs.shape[1] % 8 == 0
        seen.extend(int(mask[j].sum().item()) + 1 for j in range(inputs.shape[0]))
    assert sorted(seen) == sorted(len(t) for t, _ in data) and seen == sorted(seen)


def test_targets_are_inputs_shifted_and_prompt_mask_shifted():
    data = [([5, 6, 7, 8, 9], [0, 0, 1, 1, 1])]
    inputs, targets, mask = next(iterate_batches(data, 1, 2048))
    assert np.array(inputs)[0, :4].tolist() == [5, 6, 7, 8]
    assert np.array(targets)[0, :4].tolist() == [6, 7, 8, 9]
    # target j is token j+1, so it carries loss iff token j+1 does
    assert np.array(mask)[0].tolist() == [0, 1, 1, 1, 0, 0, 0, 0]


def test_train_order_is_a_function_of_seed_and_epoch_and_drops_a_remainder():
    data = make_data(30)

    def order(seed, epoch, start=0):
        return [
            np.array(b[0]).tolist()
            for b in iterate_batches(data, 4, 2048, train=True, seed=seed, epoch=epoch, start=start)
        ]

    a = order(0, 0)
    assert len(a) == 7  # 30 // 4 batches, 2 examples left out
    assert order(0, 0) == a and order(0, 1) != a and order(1, 0) != a
    assert order(0, 0, start=3) == a[3:]


def test_ranks_split_each_batch():
    data = make_data(16)
    full = [np.array(b[0]) for b in iterate_batches(data, 4, 2048, train=True, seed=3)]
    parts = [
        [np.array(b[0]) for b in iterate_batches(data, 4, 2048, train=True, seed=3, rank=r, world_size=2)]
        for r in range(2)
    ]
    for whole, a, b in zip(full, *parts):
        assert whole.shape[0] == 4 and a.shape[0] == b.shape[0] == 2
        n = min(a.shape[1], whole.shape[1])
        assert (whole[:2, :n] == a[:, :n]).all() and (whole[2:, : b.shape[1]] == b[:, : whole.shape[1]]).all()


def test_batch_larger_than_dataset_is_an_error_naming_both_numbers():
    with pytest.raises(ValueError, match=r"batch_size=8 is larger than the training set \(5 examples\)"):
        next(iterate_batches(make_data(5), 8, 2048, train=True))
    with pytest.raises(ValueError, match=r"batch_size=8 is larger than the training set \(5 examples\)"):
        train(make_model(), make_data(5), args=quiet(batch_size=8), progress=False, verbose=False)


def test_long_examples_are_truncated_with_a_counted_warning():
    data = make_data(3, lo=40, hi=50)
    with pytest.warns(UserWarning, match="3 of 3 examples are longer than max_seq_length=16"):
        batches = list(iterate_batches(data, 3, 16))
    assert batches[0][0].shape[1] == 16


# ----------------------------------------------------------------------------- schedules


def test_schedules_warmup_then_decay():
    cos = build_schedule("cosine", 1.0, total_steps=110, warmup=10, min_lr=0.1)
    assert cos(0).item() == 0.0 and cos(5).item() == pytest.approx(0.5)
    assert cos(10).item() == pytest.approx(1.0)
    assert cos(60).item() == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-6)
    assert cos(110).item() == pytest.approx(0.1, abs=1e-6)
    lin = build_schedule("linear", 2.0, total_steps=10)
    assert [round(lin(s).item(), 4) for s in (0, 5, 10)] == [2.0, 1.0, 0.0]
    assert build_schedule("constant", 3e-4, 10, warmup=2)(7).item() == pytest.approx(3e-4)


@pytest.mark.parametrize(
    "name,cls",
    [("adam", optim.Adam), ("adamw", optim.AdamW), ("sgd", optim.SGD), ("adafactor", optim.Adafactor)],
)
def test_optimizers_by_name(name, cls):
    assert type(build_optimizer(name, 1e-3)) is cls
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
        build_optimizer("lamb", 1e-3)


# ----------------------------------------------------------------------------- the step


def test_accumulating_micro_batches_equals_one_big_batch():
    data = make_data(8, seed=4)
    (big,) = list(iterate_batches(data, 8, 2048))
    halves = list(iterate_batches(data, 4, 2048))
    results = []
    for parts in ([big], halves):
        model = make_model()
        opt = optim.SGD(learning_rate=0.5)
        accumulate, update = make_step(model, opt, loss)
        acc = None
        for part in parts[:-1]:
            acc = accumulate(*part, acc)
        value, ntoks, norm = update(*parts[-1], acc)
        mx.eval(model.parameters())
        results.append((value.item(), ntoks.item(), ckpt.trainable_arrays(model)))
    (v1, n1, p1), (v2, n2, p2) = results
    assert n1 == n2 and v1 == pytest.approx(v2, rel=1e-6)
    for k in p1:
        np.testing.assert_allclose(np.array(p1[k]), np.array(p2[k]), rtol=1e-5, atol=1e-7)


def test_grad_clip_bounds_the_update_norm():
    model = make_model()
    batch = next(iterate_batches(make_data(4), 4, 2048))
    opt = optim.SGD(learning_rate=1.0)
    before = ckpt.trainable_arrays(model)
    _, update = make_step(model, opt, loss, grad_clip=1e-3)
    _, _, norm = update(*batch, None)
    after = ckpt.trainable_arrays(model)
    step_norm = math.sqrt(sum(float(((after[k] - before[k]) ** 2).sum().item()) for k in before))
    assert norm.item() > 1e-3 and step_norm == pytest.approx(1e-3, rel=1e-3)


def test_grad_checkpoint_gives_the_same_gradients():
    batch = next(iterate_batches(make_data(4), 4, 2048))
    grads = []
    for ckpt_on in (False, True):
        model = make_model()
        undo = enable_grad_checkpoint(model) if ckpt_on else None
        _, g = nn.value_and_grad(model, lambda m, *b: loss(m, *b)[0])(model, *batch)
        grads.append(dict(tree_flatten(g)))
        if undo:
            undo()
            assert type(model.layers[0]).__call__ is lora_course.TransformerBlock.__call__
    for k in grads[0]:
        np.testing.assert_allclose(np.array(grads[0][k]), np.array(grads[1][k]), rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- train


def test_train_lowers_the_loss_and_writes_loadable_adapters(tmp_path):
    model = make_model()
    data = [([1, 2, 3, 4, 5, 6, 7, 8] * 3, None)] * 8
    reports, evals = [], []

    class Recorder:
        def on_report(self, info):
            reports.append(info)

        def on_eval(self, info):
            evals.append(info)

    args = quiet(iters=20, steps_per_report=5, steps_per_eval=10, val_batches=-1, adapter_path=str(tmp_path))
    hist = train(model, data, data[:4], args, callbacks=[Recorder()], progress=False, verbose=False)
    assert hist.stop_reason == "finished" and len(hist.losses) == 20 and hist.step == 20
    # lr 1e-2 on 8 copies of one sequence oscillates: float-level changes (another BLAS, the
    # fastmath exp) move the last loss by +-0.5, so judge the best of the last five steps.
    assert min(hist.losses[-5:]) < 0.6 * hist.losses[0]
    assert [r["step"] for r in reports] == [5, 10, 15, 20] and [e["step"] for e in evals] == [0, 10, 20]
    assert {
        "train_loss",
        "learning_rate",
        "iterations_per_second",
        "tokens_per_second",
        "trained_tokens",
        "peak_memory_gb",
    } <= set(reports[0])
    assert evals[-1]["val_perplexity"] == pytest.approx(math.exp(evals[-1]["val_loss"]))
    fresh = load_adapters(Model(ARGS), tmp_path)
    for k, v in ckpt.trainable_arrays(model).items():
        assert mx.array_equal(ckpt.trainable_arrays(fresh)[k], v)


def test_epochs_set_the_number_of_steps(tmp_path):
    hist = train(
        make_model(),
        make_data(10),
        args=quiet(epochs=3, grad_accumulation_steps=1, adapter_path=str(tmp_path)),
        progress=False,
        verbose=False,
    )
    assert hist.step == 3 * (10 // 4)


def test_compiled_and_eager_steps_agree(tmp_path):
    runs = [
        train(
            make_model(),
            make_data(16),
            args=quiet(compile=c, adapter_path=str(tmp_path / str(c))),
            progress=False,
            verbose=False,
        ).losses
        for c in (True, False)
    ]
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-5)


class StopAt:
    """Simulates a crash: raises at a given step (after the step, before its checkpoint)."""

    def __init__(self, step):
        self.step = step

    def on_report(self, info):
        if info["step"] == self.step:
            raise KeyboardInterrupt


@pytest.mark.parametrize("stop", [5, 9])
def test_resume_reproduces_the_uninterrupted_run_bitwise(tmp_path, stop):
    data, val = make_data(14, seed=2, masked=True), make_data(6, seed=3)
    kw = dict(
        iters=12,
        batch_size=4,
        grad_accumulation_steps=2,
        learning_rate=3e-3,
        lr_schedule="cosine",
        warmup=3,
        grad_clip=5.0,
        optimizer="adamw",
        weight_decay=0.01,
        steps_per_report=1,
        steps_per_eval=4,
        save_every=4,
        early_stopping_patience=50,
    )
    full = train(
        make_model(dropout=0.1),
        data,
        val,
        TrainingArgs(adapter_path=str(tmp_path / "a"), **kw),
        progress=False,
        verbose=False,
    )
    with pytest.raises(KeyboardInterrupt):
        train(
            make_model(dropout=0.1),
            data,
            val,
            TrainingArgs(adapter_path=str(tmp_path / "b"), **kw),
            callbacks=[StopAt(stop)],
            progress=False,
            verbose=False,
        )
    meta = ckpt.load_training_state(tmp_path / "b")[2]
    assert meta["step"] == 4 * (stop // 4)
    fresh = make_model(dropout=0.1)  # same base weights; scramble the adapter to prove it is restored
    fresh.update(
        tree_unflatten([(k, mx.random.normal(v.shape)) for k, v in ckpt.trainable_arrays(fresh).items()])
    )
    resumed = train(
        fresh,
        data,
        val,
        TrainingArgs(adapter_path=str(tmp_path / "b"), **kw),
        resume=True,
        progress=False,
        verbose=False,
    )
    assert resumed.start_step == meta["step"]
    assert resumed.losses == full.losses[meta["step"] :]  # bitwise, not approx
    assert resumed.best_val_loss == full.best_val_loss
    a, b = (ckpt.trainable_arrays(load_adapters(Model(ARGS), tmp_path / d)) for d in "ab")
    assert all(mx.array_equal(a[k], b[k]) for k in a)


def test_resume_with_changed_settings_warns(tmp_path):
    train(make_model(), make_data(8), args=quiet(adapter_path=str(tmp_path)), progress=False, verbose=False)
    with pytest.warns(UserWarning, match=r"learning_rate 0.01 -> 0.02"):
        train(
            make_model(),
            make_data(8),
            args=quiet(iters=10, learning_rate=2e-2, adapter_path=str(tmp_path)),
            resume=True,
            progress=False,
            verbose=False,
        )


def test_resume_without_state_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing to resume.*training_state.safetensors"):
        train(
            make_model(),
            make_data(8),
            args=quiet(adapter_path=str(tmp_path)),
            resume=True,
            progress=False,
            verbose=False,
        )


def test_early_stopping_keeps_the_best_adapter(tmp_path):
    model = make_model()
    mx.random.seed(0)
    base = Model(ARGS)  # the same base weights as make_model's, without adapters
    train_data = [([3] * 20, None)] * 8  # learn "3 follows 3"...
    val_data = [([3, 5] * 10, None)] * 4  # ...which makes this validation set worse
    args = quiet(
        iters=40, learning_rate=5e-2, steps_per_eval=2, early_stopping_patience=2, adapter_path=str(tmp_path)
    )
    hist = train(model, train_data, val_data, args, progress=False, verbose=False)
    assert hist.stop_reason == "early stopping" and hist.step < 40
    assert hist.best_val_loss == min(e["val_loss"] for e in hist.evals)
    x = mx.array([[3, 5, 3, 5]])
    best = load_adapters(Model(ARGS), tmp_path / "best")
    saved = load_adapters(Model(ARGS), tmp_path)
    for k, v in ckpt.trainable_arrays(best).items():
        assert mx.array_equal(ckpt.trainable_arrays(saved)[k], v)
        assert mx.array_equal(ckpt.trainable_arrays(model)[k], v)
    if hist.best_step == 0:  # lora_b is zero at step 0: the best model is the base model
        assert mx.allclose(model(x), base(x), atol=1e-6)


def test_nan_mid_training_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path):
    poisoned = [([t % 62 + 1 for t in toks], m) for toks, m in make_data(12, seed=5)]  # no token 63
    # Put a marker token (63) into an example of the 5th batch; the loss below turns NaN on it.
    # Same length, so the batch order (a function of lengths, seed and epoch) does not change.
    fifth = np.array(list(iterate_batches(poisoned, 2, 2048, train=True, seed=0))[4][0])[0]
    i = next(i for i, (t, _) in enumerate(poisoned) if t[:-1] == fifth[: len(t) - 1].tolist())
    poisoned[i] = ([63] * len(poisoned[i][0]), None)

    def fragile_loss(model, inputs, targets, mask):
        value, ntoks = loss(model, inputs, targets, mask)
        return mx.where((inputs == 63).any(), mx.array(float("nan")), value), ntoks

    model = make_model()
    args = quiet(iters=30, batch_size=2, save_every=2, adapter_path=str(tmp_path))
    with pytest.raises(TrainingDivergedError, match=r"training diverged at step (\d+): the loss is nan") as e:
        train(model, poisoned, args=args, loss_fn=fragile_loss, progress=False, verbose=False)
    bad_step = int(re.search(r"step (\d+)", str(e.value)).group(1))
    assert bad_step == 5 and "micro-batch 5" in str(e.value)
    meta = ckpt.load_training_state(tmp_path)[2]
    assert f"last good checkpoint (step {meta['step']})" in str(e.value)
    assert meta["step"] == 2 * ((bad_step - 1) // 2)
    assert len(e.value.history.losses) == bad_step - 1
    for k, v in ckpt.trainable_arrays(model).items():  # the model was rolled back
        assert mx.all(mx.isfinite(v)).item()
    state = ckpt.load_training_state(tmp_path)[0]
    assert all(mx.array_equal(state[k], v) for k, v in ckpt.trainable_arrays(model).items())


class FullDisk:
    """A file whose writes fail with ENOSPC after `budget` bytes, like a full disk."""

    def __init__(self, path, mode, budget):
        self.f = open(path, mode)
        self.budget = budget

    def write(self, b):
        if self.budget < len(b):
            raise OSError(errno.ENOSPC, "No space left on device")
        self.budget -= len(b)
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.f.close()


def test_full_disk_is_a_clear_error_and_the_previous_checkpoint_survives(tmp_path, monkeypatch):
    calls = {"n": 0}

    def opener(path, mode="r", *a, **kw):
        if "w" in mode and str(path).endswith("training_state.safetensors"):
            calls["n"] += 1
            if calls["n"] == 3:  # step 0 and step 4 succeed, step 8 hits a full disk
                return FullDisk(path, mode, budget=100)
        return open(path, mode, *a, **kw)

    monkeypatch.setattr(atomic, "open", opener, raising=False)
    with pytest.raises(ckpt.CheckpointWriteError) as e:
        train(
            make_model(),
            make_data(12),
            args=quiet(iters=12, adapter_path=str(tmp_path)),
            progress=False,
            verbose=False,
        )
    msg = str(e.value)
    assert "step-8 checkpoint" in msg and str(tmp_path) in msg and "No space left on device" in msg
    assert "previous checkpoint (step 4) is intact" in msg and e.value.errno == errno.ENOSPC
    assert ckpt.load_training_state(tmp_path)[2]["step"] == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left behind
    load_adapters(Model(ARGS), tmp_path)


def test_unwritable_adapter_path_fails_before_training(tmp_path, monkeypatch):
    def opener(path, mode="r", *a, **kw):
        if "w" in mode:
            raise PermissionError(errno.EACCES, "Permission denied")
        return open(path, mode, *a, **kw)

    monkeypatch.setattr(ckpt, "open", opener, raising=False)
    model = make_model()
    before = ckpt.trainable_arrays(model)
    with pytest.raises(
        ckpt.CheckpointWriteError, match=r"adapter path .* is not writable \(Permission denied\)"
    ):
        train(
            model, make_data(8), args=quiet(adapter_path=str(tmp_path / "out")), progress=False, verbose=False
        )
    assert all(mx.array_equal(before[k], v) for k, v in ckpt.trainable_arrays(model).items())


@pytest.mark.skipif(
    not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0,
    reason="root ignores directory permissions",
)
def test_read_only_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ckpt.CheckpointWriteError, match="is not writable"):
            train(make_model(), make_data(8), args=quiet(adapter_path=str(ro)), progress=False, verbose=False)
    finally:
        ro.chmod(0o700)


def test_training_state_file_holds_everything_for_resume(tmp_path):
    train(make_model(), make_data(8), args=quiet(adapter_path=str(tmp_path)), progress=False, verbose=False)
    params, opt_state, meta, best = ckpt.load_training_state(tmp_path)
    assert meta["step"] == 8 and meta["micro_batches"] == 8 and meta["args"]["learning_rate"] == 1e-2
    assert int(opt_state["step"].item()) == 8 and set(params) == set(ckpt.trainable_arrays(make_model()))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fine_tune_type"] == "lora"


def test_live_plot_and_plot_history(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from lora_course.training.plots import LivePlot, plot_history

    live = LivePlot("run")
    hist = train(
        make_model(),
        make_data(8),
        make_data(4, seed=1),
        quiet(steps_per_report=2, steps_per_eval=4, val_batches=-1, adapter_path=str(tmp_path)),
        callbacks=[live],
        progress=False,
        verbose=False,
    )
    assert live.train_steps == [2, 4, 6, 8] and live.val_steps == [0, 4, 8]
    assert live.val_losses == [e["val_loss"] for e in hist.evals]
    lines = live.figure().axes[0].get_lines()
    assert [len(line.get_xdata()) for line in lines] == [4, 3]
    lines = plot_history(hist).axes[0].get_lines()
    assert list(lines[0].get_xdata()) == list(range(1, 9)) and list(lines[0].get_ydata()) == hist.losses


def test_eval_shuffle_and_limit_pick_a_fixed_fair_subset():
    data = make_data(40)
    sorted_first = [np.array(b[2]).sum() for b in iterate_batches(data, 4, 2048, limit=3)]
    shuffled = [np.array(b[2]).sum() for b in iterate_batches(data, 4, 2048, shuffle=True, limit=3)]
    every = [np.array(b[2]).sum() for b in iterate_batches(data, 4, 2048, shuffle=True)]
    assert len(sorted_first) == len(shuffled) == 3 and len(every) == 10
    assert shuffled == every[:3] and sorted(every) != every  # a fixed, unsorted order
    assert sum(sorted_first) < sum(shuffled)  # the first sorted batches hold the shortest examples
    model = make_model()
    assert evaluate(model, data, 4, 3) == evaluate(model, data, 4, 3)
    full = evaluate(model, data, 4, -1)[0]
    ref = sum(loss(model, *b)[0].item() * loss(model, *b)[1].item() for b in iterate_batches(data, 4, 2048))
    assert full == pytest.approx(ref / sum(len(t) - 1 for t, _ in data), rel=1e-5)
