"""The one-call API (``finetune``) and the ``lora-course train`` CLI, end to end on a
tiny checkpoint built here (random weights, a small SentencePiece tokenizer)."""

import json
import math
import random
import re

import lora_course  # noqa: F401  (BLAS before mlx)
from lora_course import Model, ModelArgs, load, save, train_tokenizer
from lora_course.config import ConfigError
from lora_course.recipes.cli import build_parser, main
from lora_course.recipes.finetune import FineTuneConfig, FineTuneResult, finetune
from lora_course.recipes.train_cli import build_config
from lora_course.training.resume import load_training_state

import mlx.core as mx
import pytest

WORDS = "the model layer token weight rank alpha learns fast slow small big".split()


def sentences(n, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    tok = train_tokenizer(sentences(300, 0), 120, root / "tok" / "tiny", byte_fallback=False)
    mx.random.seed(0)
    model = Model(
        ModelArgs(dim=32, n_layers=2, hidden_dim=64, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size)
    )
    mx.eval(model.parameters())
    save(model, tok, root / "model")
    data = root / "data"
    data.mkdir()
    for split, n, seed in (("train", 24, 1), ("valid", 6, 2), ("test", 6, 3)):
        rows = [{"prompt": "Q: " + s.split()[0], "completion": " " + s} for s in sentences(n, seed)]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def cli(*argv, capsys):
    code = main(list(map(str, argv)))
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- finetune


def test_finetune_from_paths_then_generate_and_fuse(checkpoint, tmp_path):
    result = finetune(
        str(checkpoint / "model"),
        str(checkpoint / "data"),
        iters=6,
        batch_size=4,
        learning_rate=1e-2,
        num_layers=2,
        rank=4,
        mask_prompt=True,
        steps_per_eval=3,
        adapter_path=str(tmp_path / "ad"),
        progress=False,
        verbose=False,
    )
    assert isinstance(result, FineTuneResult) and result.history.step == 6
    assert result.adapter_path == tmp_path / "ad" and (result.adapter_path / "adapters.safetensors").exists()
    config = json.loads((result.adapter_path / "adapter_config.json").read_text())
    assert config["lora_parameters"]["rank"] == 4 and config["mask_prompt"] is True
    text = result.generate("Q: the", max_tokens=5)
    assert isinstance(text, str)
    x = mx.array([[1, 5, 9, 13]])
    before = result.model(x)
    result.fuse(tmp_path / "fused")
    fused, _ = load(tmp_path / "fused")
    assert mx.allclose(fused(x), before, atol=1e-4)
    assert result.generate("Q: the", max_tokens=5) == text  # same model, now fused


def test_finetune_takes_objects_and_datasets_without_paths(checkpoint, tmp_path):
    model, tok = load(checkpoint / "model")
    train_set = [(tok.encode(s), None) for s in sentences(8, 4)]
    result = finetune(
        model,
        (train_set, train_set[:4]),
        tokenizer=tok,
        iters=3,
        batch_size=4,
        fine_tune_type="dora",
        num_layers=1,
        adapter_path=str(tmp_path),
        progress=False,
        verbose=False,
    )
    assert result.model is model and result.tokenizer is tok and len(result.history.losses) == 3
    assert model.lora_config.fine_tune_type == "dora"


def test_finetune_qlora(checkpoint, tmp_path):
    result = finetune(
        str(checkpoint / "model"),
        str(checkpoint / "data"),
        iters=3,
        batch_size=4,
        quantize=True,
        q_bits=4,
        q_group_size=32,
        num_layers=2,
        adapter_path=str(tmp_path),
        progress=False,
        verbose=False,
    )
    assert result.model.args.quantization == {"group_size": 32, "bits": 4}
    assert all(math.isfinite(v) for v in result.history.losses)


def test_finetune_unknown_option_names_it(checkpoint):
    with pytest.raises(
        ConfigError, match=r"finetune\(\): unknown key 'learning_rat' \(did you mean 'learning_rate'"
    ):
        finetune(str(checkpoint / "model"), str(checkpoint / "data"), learning_rat=1e-3)
    with pytest.raises(ValueError, match="fine_tune_type='qlora'"):
        FineTuneConfig(fine_tune_type="qlora")


def test_finetune_resume_from_an_interrupted_run(checkpoint, tmp_path):
    common = dict(
        batch_size=4,
        learning_rate=1e-2,
        num_layers=2,
        rank=4,
        save_every=2,
        adapter_path=str(tmp_path / "run"),
        progress=False,
        verbose=False,
    )
    full = finetune(
        str(checkpoint / "model"),
        str(checkpoint / "data"),
        iters=6,
        **{**common, "adapter_path": str(tmp_path / "full")},
    )
    finetune(str(checkpoint / "model"), str(checkpoint / "data"), iters=4, **common)
    resumed = finetune(str(checkpoint / "model"), str(checkpoint / "data"), iters=6, resume=True, **common)
    assert resumed.history.start_step == 4 and resumed.history.losses == full.history.losses[4:]


# ----------------------------------------------------------------------------- CLI


def test_cli_train_and_test_end_to_end(checkpoint, tmp_path, capsys):
    ad = tmp_path / "adapters"
    code, out, err = cli(
        "train",
        "--model",
        checkpoint / "model",
        "--train",
        "--data",
        checkpoint / "data",
        "--iters",
        6,
        "--batch-size",
        4,
        "--lora-layers",
        2,
        "--rank",
        4,
        "--learning-rate",
        1e-2,
        "--steps-per-report",
        3,
        "--steps-per-eval",
        3,
        "--val-batches",
        -1,
        "--adapter-path",
        ad,
        "--test",
        "--test-batches",
        -1,
        "--no-progress",
        capsys=capsys,
    )
    assert code == 0, err
    m = re.search(r"Test loss (\d+\.\d+), Test ppl (\d+\.\d+)\.", out)
    assert m and float(m.group(2)) == pytest.approx(math.exp(float(m.group(1))), rel=2e-3)
    assert "step 6: val loss" in out and "step 3: train loss" in out
    assert (ad / "adapters.safetensors").exists() and load_training_state(ad)[2]["step"] == 6

    # --test alone loads the adapters from --adapter-path and reports the same numbers
    code, out2, err = cli(
        "train",
        "--model",
        checkpoint / "model",
        "--data",
        checkpoint / "data",
        "--adapter-path",
        ad,
        "--test",
        "--test-batches",
        -1,
        "--batch-size",
        4,
        capsys=capsys,
    )
    assert code == 0, err
    assert re.search(r"Test loss .*\.", out2).group(0) == m.group(0)


def test_cli_resume_adapter_file_continues_exactly(checkpoint, tmp_path, capsys):
    ad = tmp_path / "a"
    base = [
        "train",
        "--model",
        checkpoint / "model",
        "--train",
        "--data",
        checkpoint / "data",
        "--batch-size",
        4,
        "--lora-layers",
        2,
        "--save-every",
        2,
        "--steps-per-eval",
        0,
        "--no-progress",
    ]
    assert cli(*base, "--iters", 4, "--adapter-path", ad, capsys=capsys)[0] == 0
    code, out, err = cli(
        *base, "--iters", 6, "--adapter-path", tmp_path / "b", "--resume-adapter-file", ad, capsys=capsys
    )
    assert code == 0, err
    assert "finished at step 6" in out
    assert load_training_state(tmp_path / "b")[2]["step"] == 6


def test_yaml_then_flags_precedence(checkpoint, tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(
        "iters: 40\nlearning_rate: 2e-4\nlora_layers: 1\n"
        "lora_parameters:\n  rank: 16\n  scale: 2.0\n  dropout: 0.05\n"
    )
    args = build_parser().parse_args(["train", "-c", str(cfg_file), "--iters", "7", "--train"])
    cfg = build_config(args)
    assert cfg.iters == 7  # flag beats file
    assert cfg.learning_rate == 2e-4 and cfg.num_layers == 1  # file beats default
    assert cfg.rank == 16 and cfg.alpha == 32.0 and cfg.dropout == 0.05  # mlx-lm's nested form
    assert cfg.batch_size == FineTuneConfig().batch_size and cfg.train is True


def test_optimizer_options_from_yaml_and_flags(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("optimizer: lion\noptimizer_config:\n  betas: [0.9, 0.95]\nlora_plus_ratio: 16\n")
    cfg = build_config(build_parser().parse_args(["train", "-c", str(cfg_file)]))
    assert cfg.optimizer == "lion" and cfg.optimizer_config == {"betas": [0.9, 0.95]}
    assert cfg.lora_plus_ratio == 16.0 and cfg.loss_chunk_size is None  # automatic by default
    argv = ["train", "--optimizer", "muon", "--optimizer-config", '{"ns_steps": 3}', "--lora-plus-ratio", "4"]
    cfg = build_config(build_parser().parse_args([*argv, "--loss-chunk-size", "256"]))
    assert (cfg.optimizer, cfg.optimizer_config, cfg.lora_plus_ratio) == ("muon", {"ns_steps": 3}, 4.0)
    assert cfg.loss_chunk_size == 256
    with pytest.raises(ValueError, match="muon has no setting 'betas'"):
        build_config(
            build_parser().parse_args(
                ["train", "--optimizer", "muon", "--optimizer-config", '{"betas": [1]}']
            )
        )


@pytest.mark.parametrize(
    "text,pattern",
    [
        (
            "iters: 5\nlearnin_rate: 1e-3\n",
            r"run.yaml, line 2: unknown key 'learnin_rate' \(did you mean 'learning_rate'",
        ),
        (
            "iters: 5\n\nbatch_size: four\n",
            r"run.yaml, line 3: key 'batch_size' must be an integer, got str 'four'",
        ),
        ("lora_parameters:\n  rank: 4\n  ranks: 8\n", r"run.yaml, line 3: unknown key 'ranks'"),
        ("iters: [1, 2\n", r"run.yaml, line \d+: not valid YAML"),
        ("- iters\n- 5\n", r"run.yaml: expected a mapping"),
        ("grad_checkpoint: 3\n", r"key 'grad_checkpoint' must be true/false, got int 3"),
    ],
)
def test_bad_yaml_is_an_error_naming_file_line_and_key(tmp_path, capsys, text, pattern):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(text)
    code, out, err = cli("train", "-c", cfg_file, "--train", capsys=capsys)
    assert code == 1 and re.search(pattern, err), err
    assert err.startswith("lora-course train: error:") and len(err.strip().splitlines()) == 1


def test_yaml_never_constructs_python_objects(tmp_path, capsys):
    cfg_file = tmp_path / "evil.yaml"
    cfg_file.write_text("iters: !!python/object/apply:os.system ['echo pwned > %s']\n" % (tmp_path / "pwned"))
    code, out, err = cli("train", "-c", cfg_file, "--train", capsys=capsys)
    assert code == 1 and "not valid YAML" in err and not (tmp_path / "pwned").exists()


def test_cli_usage_errors(checkpoint, tmp_path, capsys):
    code, out, err = cli("train", "--model", checkpoint / "model", capsys=capsys)
    assert code == 1 and "nothing to do: pass --train" in err
    code, out, err = cli(
        "train",
        "--model",
        checkpoint / "model",
        "--test",
        "--data",
        checkpoint / "data",
        "--adapter-path",
        tmp_path / "none",
        capsys=capsys,
    )
    assert code == 1 and "has no adapter_config.json" in err
    with pytest.raises(SystemExit):
        main(["train", "--optimizer", "lamb"])
    code, out, err = cli(
        "train",
        "--model",
        checkpoint / "model",
        "--train",
        "--data",
        checkpoint / "data",
        "--batch-size",
        64,
        "--adapter-path",
        tmp_path / "x",
        "--no-progress",
        capsys=capsys,
    )
    assert code == 1 and "batch_size=64 is larger than the training set (24 examples)" in err
