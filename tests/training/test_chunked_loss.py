"""The chunked cross-entropy equals the plain loss: value and gradients (LoRA parameters and
hidden states), tied, untied and quantized heads; and the trainer picks it by vocabulary size."""

import lora_course  # noqa: F401  (BLAS before mlx)
from lora_course import Model, ModelArgs
from lora_course.adapters.apply import apply_lora
from lora_course.model.fastmath import cross_entropy
from lora_course.quant.layers import quantize_model
from lora_course.training.args import TrainingArgs
from lora_course.training.chunked_loss import (
    CHUNKED_VOCAB,
    auto_chunk_size,
    chunked_cross_entropy,
    chunked_loss,
    default_loss,
)
from lora_course.training.evaluate import loss
from lora_course.training.trainer import train
from lora_course.tree import tree_flatten, tree_unflatten

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest


def make_model(tied: bool, quantized: bool = False, vocab: int = 256):
    mx.random.seed(0)
    args = ModelArgs(
        dim=64,
        n_layers=2,
        hidden_dim=128,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=vocab,
        tie_word_embeddings=tied,
    )
    model = Model(args)
    if quantized:  # every linear, the head and (tied) the embedding too
        quantize_model(model, group_size=32, bits=4, predicate=lambda p, m: True, quantize_embedding=True)
    apply_lora(model, num_layers=2, rank=4, alpha=8.0)
    # lora_b is zero at init; random values make every gradient non-trivial
    flat = dict(tree_flatten(model.trainable_parameters()))
    model.update(tree_unflatten([(k, 0.1 * mx.random.normal(v.shape)) for k, v in flat.items()]))
    mx.eval(model.parameters())
    return model


def make_batch(vocab=256, B=3, L=11):
    rng = np.random.default_rng(1)
    inputs = mx.array(rng.integers(0, vocab, (B, L)), mx.int32)
    targets = mx.array(rng.integers(0, vocab, (B, L)), mx.int32)
    mask = mx.array(rng.integers(0, 2, (B, L)), mx.float32)
    return inputs, targets, mask


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.array(a), np.array(b), rtol=tol, atol=tol)


@pytest.mark.parametrize("tied,quantized", [(True, False), (False, False), (True, True), (False, True)])
@pytest.mark.parametrize("chunk", [1, 7, 33, 1000])  # 33 positions in all: uneven, exact and one chunk
def test_value_and_lora_gradients_equal_the_plain_loss(tied, quantized, chunk):
    model = make_model(tied, quantized)
    batch = make_batch()
    results = []
    for fn in (loss, chunked_loss(chunk)):
        (value, n), grads = nn.value_and_grad(model, fn)(model, *batch)
        results.append((value, n, dict(tree_flatten(grads))))
    (v0, n0, g0), (v1, n1, g1) = results
    assert n0.item() == n1.item()
    close(v0, v1)
    assert g0.keys() == g1.keys() and len(g0) == 2 * 2 * 7
    for k in g0:
        close(g0[k], g1[k])


@pytest.mark.parametrize("tied", [True, False])
def test_gradient_wrt_hidden_states_equals_the_plain_one(tied):
    model = make_model(tied)
    inputs, targets, mask = make_batch()
    h = model.hidden(inputs)  # (B, L, dim)

    def plain(h):
        return (cross_entropy(model.head(h).astype(mx.float32), targets) * mask).sum()

    def chunked(h):
        return chunked_cross_entropy(model, h, targets, mask, 4)

    close(plain(h), chunked(h))
    close(mx.grad(plain)(h), mx.grad(chunked)(h))


def test_a_trainable_head_gets_its_gradient_too():
    model = make_model(tied=False)
    model.lm_head.unfreeze()
    batch = make_batch()
    g0 = dict(tree_flatten(nn.value_and_grad(model, loss)(model, *batch)[1]))
    g1 = dict(tree_flatten(nn.value_and_grad(model, chunked_loss(5))(model, *batch)[1]))
    assert "lm_head.weight" in g1
    for k in g0:
        close(g0[k], g1[k])


def test_model_call_is_hidden_then_head():
    model = make_model(tied=True)
    inputs = make_batch()[0]
    assert mx.array_equal(model(inputs), model.head(model.hidden(inputs))).item()


def test_the_trainer_chunks_large_vocabularies_only():
    assert default_loss(make_model(True), None) is loss  # vocab 256
    assert default_loss(make_model(True), 0) is loss
    assert default_loss(make_model(True), 8) is not loss
    big = make_model(True, vocab=CHUNKED_VOCAB)
    assert default_loss(big, None) is not loss and default_loss(big, 0) is loss
    assert auto_chunk_size(128256) == 130 and auto_chunk_size(49152) == 341
    with pytest.raises(ValueError, match="loss_chunk_size"):
        TrainingArgs(loss_chunk_size=-1)


def test_training_with_chunks_follows_the_plain_trajectory(tmp_path):
    rng = np.random.default_rng(3)
    data = [([int(t) for t in rng.integers(1, 256, size=int(rng.integers(5, 20)))], None) for _ in range(8)]
    runs = []
    for size in (0, 6):
        args = TrainingArgs(
            iters=3,
            batch_size=4,
            learning_rate=1e-2,
            steps_per_eval=0,
            loss_chunk_size=size,
            adapter_path=str(tmp_path / str(size)),
        )
        runs.append(train(make_model(True), data, args=args, progress=False, verbose=False).losses)
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-4)


@pytest.mark.parametrize("tied", [True, False])
def test_the_evaluation_twin_gives_the_same_value(tied):
    model = make_model(tied)
    batch = make_batch()
    fn = chunked_loss(5)
    (v0, n0), (v1, n1) = loss(model, *batch), fn.value_only(model, *batch)
    close(v0, v1)
    assert n0.item() == n1.item()
    close(fn(model, *batch)[0], v1)


def test_the_compiled_chunked_step_equals_the_plain_one():
    batch = make_batch()
    results = []
    for fn in (loss, chunked_loss(4)):
        model = make_model(True)
        value_and_grad = nn.value_and_grad(model, fn)
        step = mx.compile(lambda *b: value_and_grad(model, *b), inputs=model.state)  # noqa: B023
        (value, _), grads = step(*batch)
        results.append((value, dict(tree_flatten(grads))))
    close(results[0][0], results[1][0])
    for k, g in results[0][1].items():
        close(g, results[1][1][k])


@pytest.mark.parametrize("tied", [True, False])
def test_a_half_precision_quantized_head_gives_the_plain_loss(tied):
    """The frozen 4-bit head that the chunked loss de-quantizes once per step makes the
    logits in the dtype the quantized layer itself would (bfloat16 here), as the plain loss sees them."""
    model = make_model(tied, quantized=True)
    model.set_dtype(mx.bfloat16)
    model.output_layer.freeze()
    mx.eval(model.parameters())
    inputs, targets, mask = make_batch()
    plain, _ = loss(model, inputs, targets, mask)
    chunked, _ = chunked_loss(5)(model, inputs, targets, mask)
    close(chunked, plain, tol=1e-6)
