"""Checkpoints and generation without torch: round trips, sharding, bad files, the CLI."""

import importlib
import json
import os
import random
import subprocess
import sys

import lora_course  # noqa: F401  (BLAS before mlx)
from lora_course import CheckpointError, Model, ModelArgs, atomic, load, save, stream_generate
from lora_course import checkpoint as ck
from lora_course.model import generate as generate
from lora_course.model.generate import DiffDetokenizer, detokenize, filter_logits, generate_tokens, sample
from lora_course.recipes import convert as conversion
from lora_course.recipes.cli import main
from lora_course.tokenizer.train import train_tokenizer

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

WORDS = "the model layer token weight rank def return import self for in if else".split()
VOCAB = 400  # byte fallback needs 256 byte pieces plus the characters


def corpus(n=200, seed=0):
    rng = random.Random(seed)
    for i in range(n):
        yield " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))) + "."
        yield "    " * rng.randint(0, 2) + f"x_{i} = f({rng.randint(0, 99)})"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(corpus(), VOCAB, tmp_path_factory.mktemp("tok") / "tiny")


def tiny(tie=False, traditional=False, seed=0):
    mx.random.seed(seed)
    args = ModelArgs(
        dim=64,
        n_layers=2,
        hidden_dim=128,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=VOCAB,
        rope_theta=500.0,
        tie_word_embeddings=tie,
        rope_traditional=traditional,
    )
    model = Model(args)
    mx.eval(model.parameters())
    return model


def params(model):
    return dict(lora_course.tree_flatten(model.parameters()))


def assert_same(a, b):
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert pa[k].dtype == pb[k].dtype, k
        assert mx.array_equal(pa[k], pb[k]).item(), k


X = mx.array([[1, 17, 42, 99, 5, 300]])


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    """An untied GQA checkpoint in MLX format."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save(tiny(), tok, path)
    return path


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("lazy", [True, False])
def test_mlx_round_trip_exact(tok, tmp_path, tie, lazy):
    model = tiny(tie=tie)
    save(model, tok, tmp_path / "m")
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors", "tokenizer.model"]
    loaded, tok2 = load(tmp_path / "m", lazy=lazy)
    assert_same(model, loaded)
    assert loaded.args == model.args
    assert mx.array_equal(model(X), loaded(X)).item()
    assert tok2.encode("def f(x): return x") == tok.encode("def f(x): return x")
    assert os.listdir(tmp_path) == ["m"]  # no temp directories left behind


def test_sharded_save_has_index_and_loads(tok, tmp_path):
    model = tiny()
    save(model, tok, tmp_path / "m", shard_size_mb=0.02)
    files = sorted(os.listdir(tmp_path / "m"))
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 3 and "model.safetensors.index.json" in files
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(params(model))
    assert set(index["weight_map"].values()) == set(shards)
    assert_same(model, load(tmp_path / "m")[0])


def test_save_replaces_existing_checkpoint(tok, tmp_path):
    save(tiny(seed=0), tok, tmp_path / "m", shard_size_mb=0.02)  # sharded first ...
    lazy, _ = load(tmp_path / "m")  # ... and loaded lazily from the directory being replaced
    save(lazy, tok, tmp_path / "m")  # ... then one file
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors", "tokenizer.model"]
    assert_same(tiny(seed=0), load(tmp_path / "m")[0])
    assert os.listdir(tmp_path) == ["m"]


def test_save_refuses_directory_with_other_files(tok, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="notes.txt"):
        save(tiny(), tok, tmp_path / "m")
    assert os.listdir(tmp_path / "m") == ["notes.txt"]


def test_failed_save_leaves_previous_checkpoint(tok, tmp_path, monkeypatch):
    save(tiny(seed=0), tok, tmp_path / "m")

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic, "write_json", broken)
    with pytest.raises(CheckpointError, match="No space left.*unchanged"):
        save(tiny(seed=1), tok, tmp_path / "m")
    assert os.listdir(tmp_path) == ["m"]
    assert_same(tiny(seed=0), load(tmp_path / "m")[0])


def test_quantized_mlx_round_trip(tok, tmp_path):
    model = tiny()
    conversion._quantize(model, group_size=32, bits=4)
    save(model, tok, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4}
    loaded, _ = load(tmp_path / "q")
    assert isinstance(loaded.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert_same(model, loaded)
    assert mx.array_equal(model(X), loaded(X)).item()


def test_hf_save_of_quantized_model_is_dequantized(tok, tmp_path):
    model = tiny()
    conversion._quantize(model, group_size=32, bits=8)
    save(model, tok, tmp_path / "hf", format="hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "quantization" not in config and config["torch_dtype"] == "float32"
    plain, _ = load(tmp_path / "hf")
    assert not any(k.endswith(".scales") for k in params(plain))
    assert mx.allclose(model(X), plain(X), atol=1e-5).item()


def test_hf_save_permutes_traditional_rope(tok, tmp_path):
    model = tiny(traditional=True)
    save(model, tok, tmp_path / "hf", format="hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "rope_traditional" not in config
    hf, _ = load(tmp_path / "hf")
    assert hf.args.rope_traditional is False
    assert mx.allclose(model(X), hf(X), atol=1e-5).item()
    save(model, tok, tmp_path / "mlx")  # MLX format keeps the layout and says so
    assert load(tmp_path / "mlx")[0].args.rope_traditional is True


def test_meta_names_from_consolidated_safetensors(tok, tmp_path):
    """Newer Mistral originals: Meta names in consolidated.safetensors (no torch needed)."""
    model = tiny(traditional=True)
    meta_names = {
        v: k
        for k, v in (
            (m, ck.meta_to_hf_name(m))
            for m in [
                "tok_embeddings.weight",
                "norm.weight",
                "output.weight",
                *[
                    f"layers.{i}.{n}.weight"
                    for i in range(2)
                    for n in [
                        "attention.wq",
                        "attention.wk",
                        "attention.wv",
                        "attention.wo",
                        "feed_forward.w1",
                        "feed_forward.w2",
                        "feed_forward.w3",
                        "attention_norm",
                        "ffn_norm",
                    ]
                ],
            ]
        )
    }
    d = tmp_path / "meta"
    d.mkdir()
    mx.save_safetensors(
        str(d / "consolidated.safetensors"), {meta_names[k]: v for k, v in params(model).items()}
    )
    (d / "params.json").write_text(
        json.dumps(
            {
                "dim": 64,
                "n_layers": 2,
                "hidden_dim": 128,
                "n_heads": 4,
                "n_kv_heads": 2,
                "norm_eps": 1e-5,
                "vocab_size": VOCAB,
                "rope_theta": 500.0,
            }
        )
    )
    tok.save(d)
    loaded, _ = load(d)
    assert loaded.args.rope_traditional is True
    assert_same(model, loaded)


def test_meta_pth_without_torch_says_what_to_install(tok, tmp_path, monkeypatch):
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4}))
    tok.save(tmp_path)
    (tmp_path / "consolidated.00.pth").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    with pytest.raises(CheckpointError, match=r"consolidated.00.pth.*pip install torch"):
        load(tmp_path)


# ----------------------------------------------------------------------------- bad checkpoints


def copy_of(saved, tmp_path, shard_mb=None, tok=None):
    """A fresh copy of the tiny checkpoint to break (sharded if ``shard_mb``)."""
    model, tok2 = load(saved)
    save(model, tok2, tmp_path / "c", **({"shard_size_mb": shard_mb} if shard_mb else {}))
    return tmp_path / "c"


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            del config[k]
        else:
            config[k] = v
    (path / "config.json").write_text(json.dumps(config))


def test_truncated_safetensors(saved, tmp_path):
    c = copy_of(saved, tmp_path)
    data = (c / "model.safetensors").read_bytes()
    (c / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors.*Tensor '[\w.]+'.*(corrupt|incomplete)"
    ) as e:
        load(c)
    assert "\n" not in str(e.value)


def test_garbage_safetensors(saved, tmp_path):
    c = copy_of(saved, tmp_path)
    (c / "model.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read"):
        load(c)


def test_missing_shard(saved, tmp_path):
    c = copy_of(saved, tmp_path, shard_mb=0.02)
    second = sorted(c.glob("model-*.safetensors"))[1]
    second.unlink()
    with pytest.raises(
        CheckpointError,
        match=rf"index\.json: shard '{second.name}' "
        r"\(holding tensor '[\w.]+'\) is missing",
    ):
        load(c)


@pytest.mark.parametrize("bad", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_path_escaping_directory(saved, tmp_path, bad):
    c = copy_of(saved, tmp_path, shard_mb=0.02)
    index = json.loads((c / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = bad
    (c / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.norm\.weight' points to .*outside"):
        load(c)


@pytest.mark.parametrize("key", ["hidden_size", "num_hidden_layers", "vocab_size", "model_type"])
def test_config_missing_required_key(saved, tmp_path, key):
    c = copy_of(saved, tmp_path)
    edit_config(c, **{key: None})
    with pytest.raises(CheckpointError, match=rf"config\.json: missing required key '{key}'"):
        load(c)


def test_config_wrong_type_and_unsupported_model(saved, tmp_path):
    c = copy_of(saved, tmp_path)
    edit_config(c, hidden_size="64")
    with pytest.raises(CheckpointError, match=r"config\.json: key 'hidden_size' must be a positive integer"):
        load(c)
    edit_config(c, hidden_size=64, model_type="gpt2")
    with pytest.raises(CheckpointError, match=r"config\.json: model_type 'gpt2' is not supported"):
        load(c)
    (c / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: line 1: not valid JSON"):
        load(c)


def test_vocab_size_disagrees_with_embedding(saved, tmp_path):
    c = copy_of(saved, tmp_path)
    edit_config(c, vocab_size=512)
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: tensor '(model\.embed_tokens|lm_head)"
        r"\.weight' has 400 rows .* vocab_size is 512",
    ):
        load(c)


def test_mismatched_tensor_shape_names_both_shapes(saved, tmp_path):
    c = copy_of(saved, tmp_path)
    edit_config(c, intermediate_size=96)
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: tensor 'model\.layers\.\d\.mlp\.\w+_proj"
        r"\.weight' has shape \((128, 64|64, 128)\), but .* expects "
        r"\((96, 64|64, 96)\)",
    ):
        load(c)


def rewrite(c, fn):
    tensors = dict(mx.load(str(c / "model.safetensors")))
    fn(tensors)
    mx.save_safetensors(str(c / "model.safetensors"), tensors)


def test_wrong_dtype(saved, tmp_path):
    c = copy_of(saved, tmp_path)
    rewrite(c, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].astype(mx.int32)}))
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: tensor 'model\.norm\.weight' has dtype "
        r"int32, expected float16, bfloat16 or float32",
    ):
        load(c)


def test_missing_and_unexpected_tensors(saved, tmp_path):
    c = copy_of(saved, tmp_path)
    rewrite(c, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(
        CheckpointError,
        match=r"tensor 'model\.layers\.1\.self_attn\.k_proj\.weight' \(shape "
        r"\(32, 64\)\) is missing",
    ):
        load(c)
    rewrite(
        c,
        lambda t: t.update(
            {
                "model.layers.1.self_attn.k_proj.weight": mx.zeros((32, 64)),
                "model.layers.7.mlp.up_proj.weight": mx.zeros((128, 64)),
            }
        ),
    )
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.7\.mlp\.up_proj\.weight'"):
        load(c)


def test_hf_extras_are_ignored(saved, tmp_path):
    c = copy_of(saved, tmp_path)
    rewrite(c, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": mx.ones((8,))}))
    assert_same(load(saved)[0], load(c)[0])


def test_missing_directory_tokenizer_and_base(saved, tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load(tmp_path / "nope")
    c = copy_of(saved, tmp_path)
    (c / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer.model"):
        load(c)
    monkeypatch.setattr(ck.files, "BASE_DIR", tmp_path / "assets" / "base")
    with pytest.raises(CheckpointError, match="base model is not there"):
        load()


def test_save_refuses_unfused_adapters(tok, tmp_path):
    model = tiny()
    model.layers[0].self_attn.q_proj.lora_a = mx.zeros((64, 4))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.q_proj\.lora_a.*fuse"):
        save(model, tok, tmp_path / "m")


# ----------------------------------------------------------------------------- generation


def test_greedy_generation_matches_uncached_argmax(saved):
    model, tok = load(saved)
    prompt = tok.encode("def f(x):")
    ids = list(prompt)
    for _ in range(12):  # the slow way: the whole sequence every step, no cache
        ids.append(int(mx.argmax(model(mx.array([ids]))[0, -1]).item()))
    assert list(generate_tokens(model, prompt, 12)) == ids[len(prompt) :]


def test_long_prompt_prefills_in_chunks(saved, monkeypatch):
    g = importlib.import_module("lora_course.model.generate")  # the attribute is the function

    model, tok = load(saved)
    prompt = [1] + list(range(3, 40))
    full = list(generate_tokens(model, prompt, 5))
    monkeypatch.setattr(g, "PREFILL_STEP", 8)
    assert list(generate_tokens(model, prompt, 5)) == full


def test_generate_is_stream_joined_and_seeded(saved):
    model, tok = load(saved)
    kw = dict(max_tokens=15, temp=1.0, top_p=0.9, top_k=40, seed=7)
    text = generate(model, tok, "import os", **kw)
    assert text == "".join(stream_generate(model, tok, "import os", **kw))
    assert text == generate(model, tok, "import os", **kw)  # same seed, same text
    prompt = tok.encode("import os")
    ids = prompt + list(generate_tokens(model, prompt, 15))
    assert generate(model, tok, "import os", max_tokens=15) == tok.decode(ids)[len("import os") :]


class _Scripted:
    """A stand-in model that emits a fixed token sequence (to test stopping)."""

    layers = []

    def __init__(self, script, vocab):
        self.script, self.vocab, self.calls = script, vocab, 0

    def __call__(self, tokens, cache=None):
        logits = mx.zeros((1, tokens.shape[1], self.vocab))
        nxt = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        return logits + (mx.arange(self.vocab) == nxt) * 10.0


def test_stops_at_eos(tok):
    hello = tok.encode("hello", bos=False)
    model = _Scripted([*hello, tok.eos_id, *hello], tok.vocab_size)
    assert generate(model, tok, "x", max_tokens=50) == tok.decode(tok.encode("x") + hello)[1:]
    assert model.calls == len(hello) + 2  # prefill, one step per token, and the step queued past eos


def test_multibyte_pieces_stream_whole_characters(tok):
    text = "caf\u00e9 \U0001f642 \u65e5\u672c"  # é, an emoji and two CJK characters: byte pieces
    ids = tok.encode(text, bos=False)
    assert any(tok.sp.is_byte(i) for i in ids)
    for detok in (None, DiffDetokenizer(tok)):
        if detok is None:
            pieces = list(detokenize(tok, ids, at_start=True))
        else:
            pieces = [p for p in (detok.add(i) for i in ids) if p] + [detok.finalize()]
        assert "".join(pieces) == text
        assert all("\ufffd" not in p for p in pieces)


def test_sampling_filters():
    logits = mx.log(mx.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    probs = lambda **kw: np.array(mx.softmax(filter_logits(logits, **kw), axis=-1))[0]  # noqa: E731
    np.testing.assert_allclose(probs(), [0.5, 0.2, 0.15, 0.1, 0.05], atol=1e-6)
    np.testing.assert_allclose(probs(top_k=2), [5 / 7, 2 / 7, 0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(probs(top_p=0.8), [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0], atol=1e-6)
    np.testing.assert_allclose(probs(top_p=0.3), [1, 0, 0, 0, 0], atol=1e-6)
    hot, cold = probs(temp=2.0), probs(temp=0.5)
    assert hot[0] < 0.5 < cold[0]  # temperature flattens or sharpens
    assert sample(logits, temp=0.0).item() == 0
    draws = mx.random.categorical(filter_logits(logits, 1.0, top_k=2), num_samples=2000, key=mx.random.key(0))
    assert set(np.unique(np.array(draws))) == {0, 1}
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(logits, 1.0, top_p=0.0)


# ----------------------------------------------------------------------------- command line


def test_cli_convert_and_generate(saved, tmp_path, capsys):
    out = tmp_path / "q"
    assert (
        main(
            [
                "convert",
                "--hf-path",
                str(saved),
                "--mlx-path",
                str(out),
                "-q",
                "--q-group-size",
                "32",
                "--q-bits",
                "4",
                "--dtype",
                "float16",
            ]
        )
        == 0
    )
    q, _ = load(out)
    assert isinstance(q.layers[1].mlp.down_proj, nn.QuantizedLinear)
    assert q.layers[0].input_layernorm.weight.dtype == mx.float16
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "-p", "def f", "-n", "8", "--write-every", "3"]) == 0
    captured = capsys.readouterr()
    model, tok = load(out)
    assert captured.out == "def f" + generate(model, tok, "def f", max_tokens=8) + "\n"
    assert "generation:" in captured.err


def test_cli_generate_with_adapters(saved, tmp_path, capsys):
    from lora_course import apply_lora
    from lora_course.adapters.files import save_adapters

    model, tok = load(saved)
    apply_lora(model, num_layers=2, rank=4)
    mx.random.seed(1)  # random A and B, so the adapters change the output
    model.update(
        lora_course.tree_map(lambda a: mx.random.normal(a.shape) * 0.5, model.trainable_parameters())
    )
    save_adapters(model, tmp_path / "adapters")
    expected = generate(model, tok, "def f", max_tokens=10)
    assert expected != generate(load(saved)[0], tok, "def f", max_tokens=10)
    assert (
        main(
            [
                "generate",
                "--model",
                str(saved),
                "--adapter-path",
                str(tmp_path / "adapters"),
                "-p",
                "def f",
                "-n",
                "10",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == "def f" + expected + "\n"


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["convert", "--hf-path", str(tmp_path / "missing"), "--mlx-path", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing: no such checkpoint directory" in err
    assert not (tmp_path / "o").exists()


def test_cli_generate_subprocess(saved):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lora_course",
            "generate",
            "--model",
            str(saved),
            "-p",
            "import",
            "-n",
            "5",
            "--temp",
            "0.7",
            "--seed",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("import")
    assert "tokens/s" in result.stderr
