"""``lora-course quickstart`` end to end, with tiny settings."""

import json
from pathlib import Path

import lora_course
from lora_course.recipes.cli import main
from lora_course.recipes.quickstart import is_right

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
    "--show",
    "1",
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
    assert len(results["seen"]) == n_questions and len(results["held_out"]) == n_questions
    assert results["metric"] in printed and "seen (trained on)" in printed
    for qa in results["seen"][:1] + results["held_out"][:1]:  # --show 1: the first of each kind is printed
        assert qa["question"].split("\n")[0] in printed
    for qa in results["seen"] + results["held_out"]:
        assert qa["question"].endswith("\nA:")
        assert qa["right_after"] == is_right(qa["after"], qa["reference"])
    lines = (Path(results["data_dir"]) / "train.jsonl").read_text().splitlines()[: results["train_samples"]]
    records = [json.loads(line) for line in lines]
    seen_refs = {
        (r["completion"] if "completion" in r else r["text"].split("\nA:")[1]).strip() for r in records
    }
    assert all(qa["reference"] in seen_refs for qa in results["seen"])  # seen questions were trained on
    assert not any(qa["reference"] in seen_refs for qa in results["held_out"])
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
    q = results["seen"][0]
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


def test_is_right_compares_whitespace_and_case_normalised_prefixes():
    ref = "mlx.nn.ReLU Applies the Rectified Linear Unit."
    assert is_right("mlx.nn.ReLU applies the  rectified\nLinear Unit. Simply more text", ref)
    assert not is_right("mlx.nn.ReLU Applies the Leaky Rectified Linear Unit.", ref)
    assert not is_right("anything", "")


def test_quickstart_names_a_missing_data_folder(tmp_path, capsys):
    assert main(["quickstart", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "qs")]) == 1
    err = capsys.readouterr().err
    assert "nope" in err and "train.jsonl" in err
