"""The pretraining corpus, ``lora-course pretrain`` and the shipped base model."""

import json
from pathlib import Path

import lora_course  # noqa: F401  (BLAS before mlx)
from lora_course.data.corpus import build_corpus, module_names, save_corpus
from lora_course.recipes.pretrain import PretrainConfig, init_weights, pack, pretrain

import mlx.core as mx
import numpy as np
import pytest

ASSETS = Path(lora_course.__file__).parent / "assets" / "base"
TINY = dict(
    dim=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    hidden_dim=64,
    vocab_size=400,
    seq_length=32,
    packages=("json",),
    iters=6,
    batch_size=4,
    warmup=2,
    steps_per_eval=3,
    val_batches=2,
    valid_fraction=0.2,
)


# ----------------------------------------------------------------------------- corpus


def test_corpus_is_deterministic_and_split_by_seed():
    a = build_corpus(["json", "textwrap"], valid_fraction=0.2, seed=0)
    b = build_corpus(["json", "textwrap"], valid_fraction=0.2, seed=0)
    assert a.train == b.train and a.valid == b.valid and a.stats == b.stats
    c = build_corpus(["json", "textwrap"], valid_fraction=0.2, seed=1)
    assert sorted(a.train + a.valid) == sorted(c.train + c.valid)  # same documents, other split
    assert a.valid != c.valid
    assert a.stats["documents"] == len(a.train) + len(a.valid)
    assert not set(a.train) & set(a.valid)


def test_corpus_is_walked_in_a_fresh_process():
    import sys

    if "tabnanny" in sys.modules:
        pytest.skip("tabnanny is already imported here")
    isolated = build_corpus(["json", "tabnanny"], valid_fraction=0.2)
    assert "tabnanny" not in sys.modules  # the walk imported it elsewhere
    here = build_corpus(["json", "tabnanny"], valid_fraction=0.2, isolated=False)
    assert isolated.train == here.train and isolated.stats == here.stats


def test_corpus_documents_look_like_documentation():
    corpus = build_corpus(["json"], valid_fraction=0.2)
    docs = corpus.train + corpus.valid
    dumps = next(d for d in docs if d.startswith("json.dumps("))
    assert "\n\n" in dumps and "Serialize" in dumps  # signature, blank line, docstring
    assert any(d.startswith("json\n\n") for d in docs)  # the module's own docstring
    assert not any(" at 0x" in d for d in docs)  # no memory addresses: deterministic
    assert len(docs) == len(set(docs))


def test_signatures_keep_this_machine_out_of_the_corpus(monkeypatch):
    import os
    import sys

    from lora_course.data.corpus import _signature

    monkeypatch.setenv("LORA_COURSE_TEST_SECRET", "do-not-train-on-me")

    def f(a, environ=os.environ, exe=sys.executable, home=os.path.expanduser("~"), n=3, sep="/"):
        pass

    assert _signature(f) == "(a, environ=..., exe=..., home=..., n=3, sep='/')"


def test_mlx_is_held_out():
    with pytest.raises(ValueError, match="held out"):
        module_names("mlx")
    corpus = build_corpus(["json"], valid_fraction=0.2)
    assert "mlx" in corpus.stats["held_out"]


def test_stdlib_walk_skips_modules_with_side_effects():
    names = module_names("stdlib")
    assert "json" in names and "json.decoder" in names and "collections.abc" in names
    for bad in ("antigravity", "this", "idlelib", "tkinter", "test", "_thread"):
        assert bad not in names


def test_save_corpus_writes_jsonl(tmp_path):
    corpus = build_corpus(["json"], valid_fraction=0.2)
    save_corpus(corpus, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == corpus.train
    assert json.loads((tmp_path / "stats.json").read_text())["sha256"] == corpus.stats["sha256"]


# ----------------------------------------------------------------------------- packing and init


class _CharTokenizer:
    bos_id, eos_id = 1, 2

    def encode(self, text, bos=True, eos=False):
        return [1] * bos + [ord(c) for c in text] + [2] * eos


def test_pack_cuts_one_stream_into_overlapping_windows():
    windows = pack(["abc", "defgh"], _CharTokenizer(), seq_length=4)
    stream = [1, 97, 98, 99, 2, 1, 100, 101, 102, 103, 104, 2]
    assert windows == [stream[0:5], stream[4:9]]  # 12 tokens -> (12 - 1) // 4 = 2 windows
    assert all(len(w) == 5 for w in windows)
    # every target (window[1:]) appears exactly once across windows
    assert sum(len(w) - 1 for w in windows) == 8


def test_init_weights_follows_gpt2():
    from lora_course import Model

    cfg = PretrainConfig(**{**TINY, "dim": 64, "n_layers": 4, "hidden_dim": 128})
    mx.random.seed(0)
    model = Model(cfg.model_args())
    init_weights(model, std=0.02)
    params = dict(lora_course.tree_flatten(model.parameters()))
    assert abs(float(np.std(np.array(params["model.layers.0.self_attn.q_proj.weight"]))) - 0.02) < 0.002
    want = 0.02 / np.sqrt(2 * 4)
    assert abs(float(np.std(np.array(params["model.layers.3.mlp.down_proj.weight"]))) - want) < 0.001
    assert np.all(np.array(params["model.norm.weight"]) == 1.0)


# ----------------------------------------------------------------------------- a tiny run


def test_tiny_pretrain_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "tiny"
    log = pretrain(PretrainConfig(**TINY), out, progress=False, verbose=False)
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.model",
        "training_log.json",
        "training_curve.png",
    ):
        assert (out / name).is_file(), name
    model, tokenizer = lora_course.load(out)
    assert model.args.dim == 32 and model.args.n_kv_heads == 2 and model.args.tie_word_embeddings
    assert tokenizer.vocab_size == 400
    assert log["parameters"] == sum(v.size for _, v in lora_course.tree_flatten(model.parameters()))
    assert len(log["train_loss"]) == 6 and [e["step"] for e in log["evals"]] == [0, 3, 6]
    assert log["evals"][-1]["val_loss"] < log["evals"][0]["val_loss"]  # it learned something
    saved = json.loads((out / "training_log.json").read_text())
    assert saved["final_val_loss"] == log["final_val_loss"]
    logits = model(mx.array([tokenizer.encode("json.dumps")]))
    assert logits.shape[-1] == 400 and bool(mx.all(mx.isfinite(logits)))
    # a second run may overwrite its own output directory
    pretrain(PretrainConfig(**{**TINY, "iters": 2, "steps_per_eval": 0}), out, progress=False, verbose=False)


def test_pretrain_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt"):
        pretrain(PretrainConfig(**TINY), tmp_path, progress=False, verbose=False)


def test_pretrain_cli_parses_flags():
    from lora_course.recipes.cli import build_parser

    args = build_parser().parse_args(
        [
            "pretrain",
            "--out",
            "x",
            "--iters",
            "5",
            "--packages",
            "json",
            "--learning-rate",
            "0.01",
            "--init",
            "gpt2",
        ]
    )
    cfg = PretrainConfig.from_dict(vars(args))
    assert cfg.iters == 5 and cfg.packages == ("json",) and cfg.learning_rate == 0.01 and cfg.init == "gpt2"
    assert cfg.dim == PretrainConfig().dim and PretrainConfig().init == "mlx"


def test_pretrain_config_rejects_bad_values():
    with pytest.raises(ValueError, match="init='xavier'"):
        PretrainConfig(init="xavier")
    with pytest.raises(ValueError, match="iters=0"):
        PretrainConfig(iters=0)


# ----------------------------------------------------------------------------- the shipped model


@pytest.mark.skipif(not (ASSETS / "config.json").is_file(), reason="the base model assets are not built")
def test_shipped_base_model_loads_and_matches_its_log():
    size = sum(p.stat().st_size for p in ASSETS.iterdir())
    assert size < 20 * 2**20
    log = json.loads((ASSETS / "training_log.json").read_text())
    for path in (None, "base"):
        model, tokenizer = lora_course.load(path)
        n = sum(v.size for _, v in lora_course.tree_flatten(model.parameters()))
        assert n == log["parameters"]
    assert tokenizer.vocab_size == log["config"]["vocab_size"]
    assert "mlx" in log["held_out_packages"]
    assert log["final_val_loss"] < log["evals"][0]["val_loss"]
