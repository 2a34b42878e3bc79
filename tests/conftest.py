"""Shared test setup: BLAS before mlx, a fast hypothesis profile, tiny seeded models."""

import os

import lora_course  # noqa: F401  (loads the optimized BLAS before mlx.core)

import mlx.core as mx
import pytest
from hypothesis import HealthCheck, settings

# "ci" keeps property tests fast and deterministic; "dev" explores more.
settings.register_profile("ci", deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def tiny_args():
    """A tiny GQA Llama config: dim 64, 2 layers, vocab 256."""
    from lora_course import ModelArgs

    return ModelArgs(
        dim=64, n_layers=2, hidden_dim=128, n_heads=4, n_kv_heads=2, vocab_size=256, rope_theta=500.0
    )


@pytest.fixture
def tiny_model(tiny_args):
    from lora_course import Model

    mx.random.seed(0)
    model = Model(tiny_args)
    mx.eval(model.parameters())
    return model
