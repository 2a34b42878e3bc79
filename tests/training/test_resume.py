"""Crash safety: SIGKILL a training process at random moments, several times.

After every kill the adapter directory must hold a complete, loadable checkpoint, and
resuming must reproduce the uninterrupted run's per-step losses bitwise (on CPU).
"""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lora_course  # noqa: F401  (BLAS before mlx)
from lora_course import Model
from lora_course.adapters.files import load_adapters
from lora_course.training import resume as ckpt

import pytest

WORKER = textwrap.dedent(
    """
    import sys
    import lora_course
    import mlx.core as mx
    import numpy as np
    from lora_course import Model, ModelArgs
    from lora_course.adapters.apply import apply_lora
    from lora_course.training.args import TrainingArgs
    from lora_course.training.trainer import train

    adapter_path, log_path, resume = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    mx.random.seed(0)
    model = Model(ModelArgs(dim=32, n_layers=2, hidden_dim=64, n_heads=4, n_kv_heads=2, vocab_size=64))
    apply_lora(model, num_layers=2, rank=4, dropout=0.1)
    rng = np.random.default_rng(0)
    data = [([int(t) for t in rng.integers(1, 64, int(rng.integers(4, 30)))], None) for _ in range(18)]

    class Log:
        def on_report(self, info):
            with open(log_path, "a") as f:
                f.write(f"{info['step']} {info['train_loss'].hex()}\\n")

    args = TrainingArgs(iters=40, batch_size=4, grad_accumulation_steps=2, learning_rate=3e-3,
                        lr_schedule="cosine", warmup=4, steps_per_report=1, steps_per_eval=0,
                        save_every=2, adapter_path=adapter_path)
    train(model, data, args=args, callbacks=[Log()], resume=resume, progress=False, verbose=False)
    """
)

ITERS = 40


def _start(script, adapters, log, resume):
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    return subprocess.Popen(
        [sys.executable, str(script), str(adapters), str(log), "1" if resume else "0"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _read_log(log):
    if not log.exists():
        return []
    lines = [ln.split() for ln in log.read_text().splitlines() if ln.strip()]
    return [(int(s), float.fromhex(v)) for s, v in lines]


def _assert_loadable(adapters: Path):
    params, opt_state, meta, _ = ckpt.load_training_state(adapters)
    assert params and "step" in opt_state and 0 <= meta["step"] <= ITERS
    from lora_course import ModelArgs

    load_adapters(
        Model(ModelArgs(dim=32, n_layers=2, hidden_dim=64, n_heads=4, n_kv_heads=2, vocab_size=64)), adapters
    )
    return meta["step"]


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_is_bitwise(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)

    ref_log = tmp_path / "ref.log"
    ref = _start(script, tmp_path / "ref", ref_log, resume=False)
    assert ref.wait(timeout=600) == 0, ref.stderr.read().decode()
    reference = dict(_read_log(ref_log))
    assert sorted(reference) == list(range(1, ITERS + 1))

    rng = random.Random(1234)
    adapters, log = tmp_path / "crashy", tmp_path / "crashy.log"
    trajectory = {}
    kills = 0
    for attempt in range(4):
        proc = _start(script, adapters, log, resume=attempt > 0)
        done = max(trajectory, default=0)
        target = min(done + rng.randint(3, 9), ITERS - 2)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if max((step for step, _ in _read_log(log)), default=0) >= target:
                time.sleep(rng.random() * 0.05)  # land anywhere in a step, a save included
                break
            time.sleep(0.005)
        assert proc.poll() is None, f"worker ended early: {proc.stderr.read().decode()}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        for step, loss in _read_log(log):
            trajectory[step] = loss  # a resumed run re-logs the steps after its checkpoint
        log.unlink()
        resumed_from = _assert_loadable(adapters)  # complete and loadable after every kill
        assert resumed_from <= max(trajectory)
        trajectory = {s: v for s, v in trajectory.items() if s <= resumed_from}

    proc = _start(script, adapters, log, resume=True)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()
    for step, loss in _read_log(log):
        trajectory[step] = loss
    assert kills == 4
    assert sorted(trajectory) == list(range(1, ITERS + 1))
    mismatched = [s for s in trajectory if trajectory[s] != reference[s]]
    assert not mismatched, f"steps {mismatched} differ from the uninterrupted run"
    assert _assert_loadable(adapters) == ITERS
