"""``lora-course quickstart`` end to end, with tiny settings."""

import json
from pathlib import Path

import lora_course
from lora_course.recipes.cli import main

import mlx.core as mx
import pytest

ASSETS = Path(lora_course.__file__).parent / "assets" / "base"
TINY_FLAGS = [
    "--iters",
    "4",
    "--batch-size",
    "4",
    "--max-samples",
    "16",
    "--max-seq-length",
    "64",
    "--questions",
    "2",
    "--answer-tokens",
    "8",
    "--quiet",
]


def _check_outputs(out: Path, printed: str, n_questions: int) -> dict:
    for name in (
        "adapters/adapters.safetensors",
        "adapters/adapter_config.json",
        "loss_curve.png",
        "results.json",
    ):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert "before" in printed and "after" in printed and "perplexity" in printed
    assert f"{results['before']['loss']:.3f}" in printed and f"{results['after']['loss']:.3f}" in printed
    assert len(results["questions"]) == n_questions
    for qa in results["questions"]:
        assert qa["question"].endswith("\nA:") and qa["question"].split("\n")[0] in printed
    assert len(results["train_loss"]) == 4
    assert results["loss_reduction"] == pytest.approx(
        1 - results["after"]["loss"] / results["before"]["loss"]
    )
    return results


@pytest.mark.skipif(not (ASSETS / "config.json").is_file(), reason="the base model assets are not built")
def test_quickstart_on_the_embedded_model(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), *TINY_FLAGS]) == 0
    printed = capsys.readouterr().out
    results = _check_outputs(out, printed, 2)
    assert "mlx" in printed and results["held_out_split"] == "test.jsonl"
    assert (out / "data" / "train.jsonl").is_file()
    # the adapters load back onto a fresh base model and give the fine-tuned model's answers
    model, tokenizer = lora_course.load()
    lora_course.load_adapters(model, out / "adapters")
    q = results["questions"][0]
    assert lora_course.model.generate(model, tokenizer, q["question"], max_tokens=8).strip() == q["after"]


def _tiny_checkpoint(folder: Path) -> None:
    from lora_course import Model, ModelArgs, save, train_tokenizer

    text = [f"Q: What is f{i} in pkg?\nA: pkg.f{i} returns {i} plus one, as an integer." for i in range(60)]
    tok = train_tokenizer(text, 300, None)
    mx.random.seed(0)
    model = Model(
        ModelArgs(
            dim=32,
            n_layers=2,
            hidden_dim=64,
            n_heads=4,
            n_kv_heads=2,
            vocab_size=tok.vocab_size,
            tie_word_embeddings=True,
        )
    )
    save(model, tok, folder)


def test_quickstart_with_your_own_model_and_data(tmp_path, capsys):
    ckpt, data = tmp_path / "model", tmp_path / "data"
    _tiny_checkpoint(ckpt)
    data.mkdir()
    for split, rng in (("train", range(40)), ("valid", range(40, 48))):
        rows = [{"text": f"Q: What is g{i} in pkg?\nA: pkg.g{i} returns {i} times two."} for i in rng]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "qs"
    assert (
        main(
            [
                "quickstart",
                "--model",
                str(ckpt),
                "--data",
                str(data),
                "--out",
                str(out),
                "--learning-rate",
                "0.01",
                *TINY_FLAGS,
            ]
        )
        == 0
    )
    results = _check_outputs(out, capsys.readouterr().out, 2)
    assert results["held_out_split"] == "valid.jsonl"  # no test.jsonl: valid is the held-out set
    assert not (out / "data").exists()  # nothing was built
    assert results["after"]["loss"] < results["before"]["loss"]


def test_quickstart_names_a_missing_data_folder(tmp_path, capsys):
    assert main(["quickstart", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "qs")]) == 1
    err = capsys.readouterr().err
    assert "nope" in err and "train.jsonl" in err
