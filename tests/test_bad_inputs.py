"""Bad input, tried systematically: every loader and the CLI, one table.

Each case builds one broken input and names what the error must say. The contract,
checked for every case in the same way:

- the exception has the documented type (a ``ValueError`` subclass or ``FileNotFoundError``);
- its message is ONE line and names the place (the file, and the line, key, tensor or
  layer) in so many words;
- on the command line (``lora-course ...``) the same error is one line on stderr,
  ``lora-course <cmd>: error: ...``, exit status 1, no traceback.

The owners' own test files check each loader in more depth; this file checks that
the whole surface keeps the contract, and adds the cases that cross modules.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import lora_course  # noqa: F401  (BLAS before mlx)
from lora_course import (
    AdapterError,
    CheckpointError,
    DatasetError,
    Model,
    ModelArgs,
    QuantizationError,
    TrainingArgs,
    apply_lora,
    load,
    load_adapters,
    load_dataset,
    quantize,
    quantize_model,
    save,
    save_adapters,
    train,
    train_tokenizer,
)
from lora_course.config import ConfigError
from lora_course.recipes.cli import main
from lora_course.tokenizer.base import TokenizerError
from lora_course.tokenizer.spm import Tokenizer
from lora_course.training.evaluate import loss
from lora_course.training.run import TrainingDivergedError

import mlx.core as mx
import pytest

VOCAB = 400  # byte fallback needs 256 byte pieces plus the characters
WORDS = "the model layer token weight rank def return import self for in if else".split()


def corpus(n=200, seed=0):
    rng = random.Random(seed)
    for i in range(n):
        yield " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))) + "."
        yield "    " * rng.randint(0, 2) + f"x_{i} = f({rng.randint(0, 99)})"


def tiny_model(dim=64, vocab=VOCAB, seed=0) -> Model:
    mx.random.seed(seed)
    model = Model(
        ModelArgs(
            dim=dim,
            n_layers=2,
            hidden_dim=2 * dim,
            n_heads=4,
            n_kv_heads=2,
            vocab_size=vocab,
            rope_theta=500.0,
        )
    )
    mx.eval(model.parameters())
    return model


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Good inputs, built once: a tokenizer, a checkpoint, a sharded one, an adapter, data."""
    root = tmp_path_factory.mktemp("good")
    tok = train_tokenizer(corpus(), VOCAB, root / "tok")
    save(tiny_model(), tok, root / "ckpt")
    save(tiny_model(), tok, root / "sharded", shard_size_mb=0.02)
    model = apply_lora(tiny_model(), num_layers=2, rank=4)
    save_adapters(model, root / "adapters")
    data = root / "data"
    data.mkdir()
    rng = random.Random(0)
    for split, n in (("train", 6), ("valid", 2), ("test", 2)):
        write_jsonl(
            data / f"{split}.jsonl",
            [{"text": " ".join(rng.choice(WORDS) for _ in range(6))} for _ in range(n)],
        )
    save(quantize_model(tiny_model(), group_size=64, bits=4), tok, root / "qckpt")
    train(small_lora(), SMALL_DATA, args=small_args(root / "run"), progress=False, verbose=False)
    return {"root": root, "tok": tok}


SMALL_DATA = [([(7 * i + j) % 63 + 1 for j in range(6 + i % 5)], None) for i in range(8)]


def small_lora(seed=0):
    """A dim-32, vocab-64 model with rank-2 LoRA on both blocks (what the "run" asset trained)."""
    return apply_lora(tiny_model(dim=32, vocab=64, seed=seed), num_layers=2, rank=2)


def small_args(out, **kw):
    kw = {"iters": 2, "batch_size": 2, "save_every": 1, "steps_per_eval": 0, "compile": False, **kw}
    return TrainingArgs(adapter_path=str(out), **kw)


class Env:
    """What a case needs: a fresh directory, the tokenizer, copies of the good inputs."""

    def __init__(self, assets, tmp: Path):
        self.tmp, self.tok, self._root = tmp, assets["tok"], assets["root"]

    def copy(self, name: str) -> Path:
        """A private copy of a good asset (``ckpt``, ``sharded``, ``adapters``, ``data``) to break."""
        dst = self.tmp / name
        shutil.copytree(self._root / name, dst)
        return dst

    def good(self, name: str) -> Path:
        return self._root / name

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(json.dumps(data))


def edit_tensors(path: Path, fn) -> None:
    tensors = dict(mx.load(str(path)))
    fn(tensors)
    mx.save_safetensors(str(path), tensors)


# ----------------------------------------------------------------------------- the API table
#
# A case is a function of an Env returning (call, exception type, words the message must
# contain[, check after the error]). The words are the names a person needs: the file
# and the line, key, tensor or layer.

CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def data(env, path):
    return lambda: load_dataset(path, env.tok)


# -- datasets


@case
def jsonl_malformed_line(env):
    p = env.file("d.jsonl", '{"text": "a"}\n{"text": "b"\n')
    return data(env, p), DatasetError, [f"{p}:2:", "malformed JSON"]


@case
def jsonl_empty_file(env):
    p = env.file("empty.jsonl", "")
    return data(env, p), DatasetError, [str(p), "empty file"]


@case
def jsonl_blank_line(env):
    p = env.file("d.jsonl", '{"text": "a"}\n\n{"text": "b"}\n')
    return data(env, p), DatasetError, [f"{p}:2:", "blank line"]


@case
def jsonl_missing_field(env):
    p = env.file("d.jsonl", '{"prompt": "Q", "completion": "A"}\n{"prompt": "Q"}\n')
    return data(env, p), DatasetError, [f"{p}:2:", "'completion'"]


@case
def jsonl_wrong_typed_field(env):
    p = env.file("d.jsonl", '{"text": "a"}\n{"text": 5}\n')
    return data(env, p), DatasetError, [f"{p}:2:", "'text'", "int"]


@case
def jsonl_mixed_formats(env):
    p = env.file("d.jsonl", '{"text": "a"}\n{"prompt": "Q", "completion": "A"}\n')
    return data(env, p), DatasetError, [f"{p}:2:", "mixed formats", "line 1"]


@case
def jsonl_not_an_object(env):
    p = env.file("d.jsonl", '["text", "a"]\n')
    return data(env, p), DatasetError, [f"{p}:1:", "list"]


@case
def jsonl_non_utf8_bytes(env):
    p = env.file("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    return data(env, p), DatasetError, [f"{p}:2:", "not UTF-8", "column 14"]


@case
def jsonl_10mb_broken_line(env):
    p = env.file("big.jsonl", '{"text": "' + "x" * 10_000_000 + "\n")  # the quote never closes
    return data(env, p), DatasetError, [f"{p}:1:", "malformed JSON"]


@case
def jsonl_10mb_unknown_role(env):
    # A huge bad value must not be pasted into the message whole.
    row = {"messages": [{"role": "r" * 10_000_000, "content": "hi"}]}
    p = write_jsonl(env.tmp / "huge_role.jsonl", [row])
    return data(env, p), DatasetError, [f"{p}:1:", "messages[0]", "unknown role"]


@case
def chat_unknown_role(env):
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}]}
    p = write_jsonl(env.tmp / "chat.jsonl", [row])
    return data(env, p), DatasetError, [f"{p}:1:", "messages[1]", "'tool'"]


@case
def chat_message_without_content(env):
    p = write_jsonl(env.tmp / "chat.jsonl", [{"messages": [{"role": "user"}]}])
    return data(env, p), DatasetError, [f"{p}:1:", "messages[0]", "'content'"]


@case
def csv_without_the_column(env):
    p = env.file("d.csv", "id,body\n1,hello\n")
    return data(env, p), DatasetError, [f"{p}:1:", "'text'", "id, body"]


@case
def txt_folder_empty(env):
    folder = env.tmp / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.txt").write_text("\n \n")
    return data(env, folder), DatasetError, [str(folder), ".txt"]


@case
def data_folder_without_train(env):
    folder = env.copy("data")
    (folder / "train.jsonl").unlink()
    return data(env, folder), DatasetError, [str(folder), "train.jsonl"]


@case
def data_unknown_file_type(env):
    p = env.file("d.parquet", b"PAR1")
    return data(env, p), DatasetError, [str(p), "'.parquet'"]


# -- checkpoints and tokenizers


@case
def checkpoint_truncated_safetensors(env):
    c = env.copy("ckpt")
    blob = (c / "model.safetensors").read_bytes()
    (c / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    return (lambda: load(c)), CheckpointError, [str(c / "model.safetensors")]


@case
def checkpoint_wrong_dtype(env):
    c = env.copy("ckpt")
    edit_tensors(
        c / "model.safetensors",
        lambda t: t.update({"model.norm.weight": t["model.norm.weight"].astype(mx.int32)}),
    )
    return (lambda: load(c)), CheckpointError, [str(c / "model.safetensors"), "'model.norm.weight'", "int32"]


@case
def checkpoint_missing_shard(env):
    c = env.copy("sharded")
    shard = sorted(c.glob("model-*.safetensors"))[-1]
    shard.unlink()
    return (
        (lambda: load(c)),
        CheckpointError,
        [str(c / "model.safetensors.index.json"), shard.name, "tensor '"],
    )


@case
def checkpoint_config_missing_required_key(env):
    c = env.copy("ckpt")
    edit_json(c / "config.json", num_attention_heads=None)
    return (lambda: load(c)), CheckpointError, [str(c / "config.json"), "'num_attention_heads'"]


@case
def checkpoint_config_wrong_type(env):
    c = env.copy("ckpt")
    edit_json(c / "config.json", num_hidden_layers="2")
    return (lambda: load(c)), CheckpointError, [str(c / "config.json"), "'num_hidden_layers'"]


@case
def checkpoint_config_not_json(env):
    c = env.copy("ckpt")
    (c / "config.json").write_text('{"model_type": "llama",\n "hidden_size": 64,,\n}')
    return (lambda: load(c)), CheckpointError, [str(c / "config.json"), "not valid JSON"]


@case
def checkpoint_vocab_size_disagrees_with_embedding(env):
    c = env.copy("ckpt")
    edit_json(c / "config.json", vocab_size=512)
    return (lambda: load(c)), CheckpointError, [str(c / "model.safetensors"), "vocab_size", "512", "400 rows"]


@case
def checkpoint_tensor_missing(env):
    c = env.copy("ckpt")
    edit_tensors(c / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    return (lambda: load(c)), CheckpointError, [str(c), "'model.layers.1.mlp.up_proj.weight'", "missing"]


@case
def checkpoint_more_layers_than_config(env):
    c = env.copy("ckpt")
    edit_json(c / "config.json", num_hidden_layers=1)
    return (lambda: load(c)), CheckpointError, [str(c / "model.safetensors"), "'model.layers.1."]


@case
def checkpoint_tokenizer_not_sentencepiece(env):
    c = env.copy("ckpt")
    (c / "tokenizer.model").write_text('{"model": {"type": "BPE"}}')  # a tokenizer.json renamed
    return (lambda: load(c)), TokenizerError, [str(c / "tokenizer.model"), "not a SentencePiece model"]


@case
def tokenizer_file_not_sentencepiece(env):
    p = env.file("vocab.model", b"\x00\x01 definitely not a protobuf \xff")
    return (lambda: Tokenizer(p)), TokenizerError, [str(p), "not a SentencePiece model"]


@case
def checkpoint_tokenizer_of_another_model(env):
    c = env.tmp / "small_vocab"
    save(tiny_model(vocab=256), env.tok, c)  # a 400-piece tokenizer beside a 256-token model
    return (lambda: load(c)), CheckpointError, [str(c / "tokenizer.model"), "400 pieces", "vocab_size is 256"]


@case
def checkpoint_quantized_without_quantization_entry(env):
    c = env.tmp / "q"
    save(quantize_model(tiny_model(), group_size=64, bits=4), env.tok, c)
    edit_json(c / "config.json", quantization=None)
    return (lambda: load(c)), CheckpointError, [str(c / "config.json"), "'quantization'", ".scales"]


# -- adapters


def fresh_model():
    return tiny_model(seed=1)


@case
def adapter_config_missing(env):
    a = env.copy("adapters")
    (a / "adapter_config.json").unlink()
    return (lambda: load_adapters(fresh_model(), a)), AdapterError, [str(a), "adapter_config.json"]


@case
def adapter_rank_mismatch(env):
    a = env.copy("adapters")
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["lora_parameters"].update(rank=8, scale=cfg["lora_parameters"]["alpha"] / 8)
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    return (
        (lambda: load_adapters(fresh_model(), a)),
        AdapterError,
        [str(a / "adapters.safetensors"), "rank mismatch", ".lora_", "rank 4", "rank 8"],
    )


@case
def adapter_keys_not_in_model(env):
    a = env.copy("adapters")
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["lora_parameters"]["keys"] = ["self_attn.qkv_proj"]
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    return (
        (lambda: load_adapters(fresh_model(), a)),
        AdapterError,
        [str(a / "adapter_config.json"), "'self_attn.qkv_proj'"],
    )


@case
def adapter_tensor_not_in_model(env):
    a = env.copy("adapters")
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["lora_parameters"]["keys"] = ["self_attn.q_proj"]  # but the file holds every key's tensors
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    return (
        (lambda: load_adapters(fresh_model(), a)),
        AdapterError,
        [str(a / "adapters.safetensors"), "tensor 'model.layers.", "not an adapter parameter"],
    )


@case
def adapter_shapes_for_another_model(env):
    a = env.copy("adapters")  # trained on a dim-64 model ...
    wider = tiny_model(dim=128)  # ... loaded into a dim-128 one
    return (
        (lambda: load_adapters(wider, a)),
        AdapterError,
        [str(a / "adapters.safetensors"), "tensor 'model.layers.", "(64, 4)", "(128, 4)"],
    )


@case
def adapter_more_layers_than_model(env):
    a = env.copy("adapters")
    edit_json(a / "adapter_config.json", num_layers=12)
    return (
        (lambda: load_adapters(fresh_model(), a)),
        AdapterError,
        [str(a / "adapter_config.json"), "num_layers=12", "2 layers"],
    )


@case
def adapter_tensor_missing(env):
    a = env.copy("adapters")
    edit_tensors(a / "adapters.safetensors", lambda t: t.pop("model.layers.0.mlp.down_proj.lora_b"))
    return (
        (lambda: load_adapters(fresh_model(), a)),
        AdapterError,
        [str(a / "adapters.safetensors"), "'model.layers.0.mlp.down_proj.lora_b'", "missing"],
    )


@case
def adapter_weights_file_missing(env):
    a = env.copy("adapters")
    (a / "adapters.safetensors").unlink()
    return (lambda: load_adapters(fresh_model(), a)), AdapterError, [str(a), "adapters.safetensors"]


@case
def adapter_config_not_json(env):
    a = env.copy("adapters")
    (a / "adapter_config.json").write_text('{\n  "num_layers": 2,\n  oops\n}')
    return (lambda: load_adapters(fresh_model(), a)), AdapterError, [str(a / "adapter_config.json"), "line 3"]


# -- configs (the YAML cases go through the CLI, in the table further down)


@case
def training_args_unknown_key(env):
    return (
        (lambda: TrainingArgs.from_dict({"iters": 2, "lerning_rate": 1e-3}, source="run.yaml")),
        ConfigError,
        ["run.yaml", "'lerning_rate'", "'learning_rate'"],
    )


@case
def training_args_wrong_type(env):
    return (
        (lambda: TrainingArgs.from_dict({"batch_size": "four"}, source="run.yaml")),
        ConfigError,
        ["run.yaml", "'batch_size'", "integer"],
    )


# -- settings that cannot work


@case
def batch_larger_than_dataset(env):
    model = apply_lora(tiny_model(), num_layers=1, rank=2)
    ds = [([1, 2, 3, 4], None)] * 3
    args = TrainingArgs(iters=1, batch_size=8, adapter_path=str(env.tmp / "a"))
    return (
        (lambda: train(model, ds, args=args, progress=False, verbose=False)),
        ValueError,
        ["batch_size=8", "3 examples"],
    )


@case
def train_on_data_of_another_tokenizer(env):
    p = write_jsonl(env.tmp / "d.jsonl", [{"text": "x_299 = f(299) import self weight"}] * 4)
    ds = load_dataset(p, env.tok).train  # ids up to 399 ...
    model = apply_lora(tiny_model(dim=32, vocab=64), num_layers=1, rank=2)  # ... for a 64-token model
    args = TrainingArgs(iters=1, batch_size=2, adapter_path=str(env.tmp / "a"))
    return (
        (lambda: train(model, ds, args=args, progress=False, verbose=False)),
        ValueError,
        [str(p), "sample 0", "vocab_size=64"],
    )


@case
def group_size_not_dividing_width(env):
    w = mx.zeros((4, 96))
    return (lambda: quantize(w, group_size=64)), QuantizationError, ["group_size=64", "(4, 96)", "96"]


@case
def group_size_not_dividing_a_layer(env):
    model = tiny_model(dim=96)  # q_proj is 96 wide: no 64-groups
    return (
        (lambda: quantize_model(model, group_size=64, predicate=lambda path, m: True)),
        QuantizationError,
        ["layer '", "96", "group_size=64"],
    )


@case
def unsupported_bits(env):
    model = tiny_model()
    return (lambda: quantize_model(model, bits=7)), QuantizationError, ["bits=7"]


@case
def num_layers_larger_than_model(env):
    model = tiny_model()
    return (lambda: apply_lora(model, num_layers=5)), ValueError, ["num_layers=5", "2 layers"]


@case
def lora_key_not_in_model(env):
    model = tiny_model()
    return (
        (lambda: apply_lora(model, num_layers=1, keys=["attention.wq"])),
        ValueError,
        ["'attention.wq'", "self_attn.q_proj"],
    )


@case
def nan_mid_training(env):
    calls = {"n": 0}

    def poisoned(model, inputs, targets, mask):  # the 5th micro-batch's loss is NaN
        calls["n"] += 1
        value, ntoks = loss(model, inputs, targets, mask)
        return (value * float("nan") if calls["n"] == 5 else value), ntoks

    model = apply_lora(tiny_model(dim=32, vocab=64), num_layers=2, rank=2)
    ds = [([(7 * i + j) % 63 + 1 for j in range(6 + i % 5)], None) for i in range(8)]
    out = env.tmp / "run"
    args = TrainingArgs(
        iters=10,
        batch_size=2,
        learning_rate=1e-3,
        save_every=2,
        steps_per_eval=0,
        adapter_path=str(out),
        compile=False,
    )

    def after(err):
        from lora_course.training import resume as ckpt

        assert ckpt.load_training_state(out)[2]["step"] == 4  # the last good checkpoint was kept
        load_adapters(tiny_model(dim=32, vocab=64), out)
        assert all(mx.all(mx.isfinite(v)).item() for v in ckpt.trainable_arrays(model).values())

    return (
        (lambda: train(model, ds, args=args, loss_fn=poisoned, progress=False, verbose=False)),
        TrainingDivergedError,
        ["step 5", "last good checkpoint (step 4)", str(out)],
        after,
    )


FIRST_API_CASES = list(CASES)  # the second pass below adds more, run by test_second_pass_api_case


# Known gaps, each waiting for a fix in the owning module (remove the entry with the fix).
PENDING: dict[str, str] = {}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(reason=PENDING[n], strict=True)) if n in PENDING else n
        for n in CASES
    ],
)
def test_bad_input_is_one_clear_line(name, assets, tmp_path):
    built = CASES[name](Env(assets, tmp_path))
    call, exc, words = built[:3]
    with pytest.raises(exc) as e:
        call()
    msg = str(e.value)
    assert isinstance(e.value, (ValueError, FileNotFoundError)), type(e.value)
    assert "\n" not in msg, f"message is not one line: {msg!r}"
    assert len(msg) < 600, f"message is {len(msg)} characters long: {msg[:300]!r}..."
    missing = [w for w in words if w not in msg]
    assert not missing, f"message {msg!r} does not name {missing}"
    if len(built) > 3:
        built[3](e.value)


def test_the_api_table_is_large_enough():
    assert len(CASES) >= 30


# ----------------------------------------------------------------------------- the CLI table
#
# A case returns (argv, words stderr must contain). The command must exit 1 and print
# exactly one line, "lora-course <cmd>: error: ...".

CLI_CASES = {}


def cli_case(fn):
    CLI_CASES[fn.__name__] = fn
    return fn


@cli_case
def cli_yaml_unknown_key(env):
    y = env.file("run.yaml", "iters: 5\nlearnin_rate: 1e-4\n")
    return ["train", "-c", y, "--train"], [f"{y}, line 2", "'learnin_rate'", "'learning_rate'"]


@cli_case
def cli_yaml_wrong_type(env):
    y = env.file("run.yaml", "iters: 5\nrank: eight\n")
    return ["train", "-c", y, "--train"], [f"{y}, line 2", "'rank'", "integer"]


@cli_case
def cli_yaml_nested_unknown_key(env):
    y = env.file("run.yaml", "lora_parameters:\n  rank: 4\n  rnak: 8\n")
    return ["train", "-c", y, "--train"], [f"{y}, line 3", "'rnak'"]


@cli_case
def cli_yaml_syntax_error(env):
    y = env.file("run.yaml", "iters: 5\nkeys: [self_attn.q_proj\n")
    return ["train", "-c", y, "--train"], [str(y), "line", "not valid YAML"]


@cli_case
def cli_yaml_missing_file(env):
    y = env.tmp / "nope.yaml"
    return ["train", "-c", y, "--train"], [str(y), "no such config file"]


@cli_case
def cli_train_on_malformed_data(env):
    d = env.copy("data")
    (d / "valid.jsonl").write_text('{"text": "fine"}\n{"text": "broken\n')
    return [
        "train",
        "--model",
        env.good("ckpt"),
        "--train",
        "--data",
        d,
        "--iters",
        1,
        "--adapter-path",
        env.tmp / "a",
        "--no-progress",
    ], [f"{d / 'valid.jsonl'}:2:", "malformed JSON"]


@cli_case
def cli_train_batch_larger_than_data(env):
    return [
        "train",
        "--model",
        env.good("ckpt"),
        "--train",
        "--data",
        env.good("data"),
        "--iters",
        1,
        "--batch-size",
        64,
        "--adapter-path",
        env.tmp / "a",
        "--no-progress",
    ], ["batch_size=64", "6 examples"]


@cli_case
def cli_train_too_many_layers(env):
    return [
        "train",
        "--model",
        env.good("ckpt"),
        "--train",
        "--data",
        env.good("data"),
        "--iters",
        1,
        "--lora-layers",
        9,
        "--adapter-path",
        env.tmp / "a",
        "--no-progress",
    ], ["num_layers=9", "2 layers"]


@cli_case
def cli_test_without_adapters(env):
    return [
        "train",
        "--model",
        env.good("ckpt"),
        "--test",
        "--data",
        env.good("data"),
        "--adapter-path",
        env.tmp / "none",
    ], [str(env.tmp / "none"), "adapter_config.json"]


@cli_case
def cli_convert_truncated_checkpoint(env):
    c = env.copy("ckpt")
    blob = (c / "model.safetensors").read_bytes()
    (c / "model.safetensors").write_bytes(blob[:100])
    return ["convert", "--hf-path", c, "--mlx-path", env.tmp / "out"], [str(c / "model.safetensors")]


@cli_case
def cli_convert_bad_group_size(env):
    return [
        "convert",
        "--hf-path",
        env.good("ckpt"),
        "--mlx-path",
        env.tmp / "out",
        "-q",
        "--q-group-size",
        48,
    ], ["group_size=48"]


@cli_case
def cli_fuse_adapter_config_missing(env):
    a = env.copy("adapters")
    (a / "adapter_config.json").unlink()
    return ["fuse", "--model", env.good("ckpt"), "--adapter-path", a, "--save-path", env.tmp / "f"], [
        str(a),
        "adapter_config.json",
    ]


@cli_case
def cli_fuse_adapter_rank_mismatch(env):
    a = env.copy("adapters")
    edit_tensors(
        a / "adapters.safetensors",
        lambda t: t.update({k: mx.zeros((v.shape[0], 8)) for k, v in t.items() if k.endswith("lora_a")}),
    )
    return ["fuse", "--model", env.good("ckpt"), "--adapter-path", a, "--save-path", env.tmp / "f"], [
        str(a / "adapters.safetensors"),
        "rank mismatch",
        ".lora_a'",
    ]


@cli_case
def cli_generate_bad_tokenizer(env):
    c = env.copy("ckpt")
    (c / "tokenizer.model").write_bytes(b"not sentencepiece")
    return ["generate", "--model", c, "-p", "hi", "-n", 2], [str(c / "tokenizer.model")]


@cli_case
def cli_generate_missing_model(env):
    return ["generate", "--model", env.tmp / "nowhere", "-p", "hi"], [str(env.tmp / "nowhere")]


@cli_case
def cli_dataset_unknown_package(env):
    return ["dataset", "--packages", "no_such_package_xyz", "--out", env.tmp / "d"], ["'no_such_package_xyz'"]


FIRST_CLI_CASES = list(CLI_CASES)


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_cli_error_is_one_line_on_stderr(name, assets, tmp_path, capsys):
    argv, words = CLI_CASES[name](Env(assets, tmp_path))
    argv = [str(a) for a in argv]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 1, (code, err)
    assert err.startswith(f"lora-course {argv[0]}: error: ") and err.endswith("\n"), err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    missing = [w for w in words if w not in err]
    assert not missing, f"stderr {err!r} does not name {missing}"


def test_the_cli_table_is_large_enough():
    assert len(CLI_CASES) >= 12


@pytest.mark.parametrize("name", ["cli_yaml_unknown_key", "cli_train_on_malformed_data"])
def test_cli_in_a_real_process_exits_non_zero_without_traceback(name, assets, tmp_path):
    argv, words = CLI_CASES[name](Env(assets, tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "lora_course", *map(str, argv)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert re.match(rf"lora-course {argv[0]}: error: ", lines[0]) and all(w in lines[0] for w in words)


# ----------------------------------------------------------------------------- ids past the vocabulary
#
# MLX gathers embedding rows without a bounds check, so a token id >= vocab_size reads
# past the table (garbage, or a segmentation fault). Checkpoints refuse a tokenizer
# larger than the model (case checkpoint_tokenizer_of_another_model), and train() /
# evaluate() refuse such ids (case train_on_data_of_another_tokenizer). Run in a
# subprocess: without the check this can crash the interpreter.

OUT_OF_VOCAB = """
import sys, tempfile
import lora_course
import mlx.core as mx
from lora_course import Model, ModelArgs, TrainingArgs, apply_lora, evaluate, train

mx.random.seed(0)
model = apply_lora(Model(ModelArgs(dim=32, n_layers=2, hidden_dim=64, n_heads=4, n_kv_heads=2,
                                   vocab_size=64)), num_layers=1, rank=2)
data = [([1, 2, 3, 4], None), ([1, 5000, 3, 4], None), ([5, 6, 7], None), ([8, 9], None)]
for name, call in [("train", lambda: train(model, data, args=TrainingArgs(iters=1, batch_size=2,
                                           adapter_path=tempfile.mkdtemp()), progress=False, verbose=False)),
                   ("evaluate", lambda: evaluate(model, data, batch_size=2))]:
    try:
        call()
    except ValueError as e:
        print(name, "refused:", e)
    else:
        sys.exit(f"{name} accepted token id 5000 with vocab_size 64")
"""


def test_token_ids_past_the_vocabulary_are_refused(tmp_path):
    script = tmp_path / "oov.py"
    script.write_text(OUT_OF_VOCAB)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-500:]}"
    lines = result.stdout.splitlines()
    assert [ln.split()[0] for ln in lines] == ["train", "evaluate"]
    assert all("5000" in ln and "vocab_size" in ln and "sample 1" in ln for ln in lines), lines


# ============================================================================= second pass
#
# The classes of the "Hardening, second pass" attack, each a table of cases under the
# same contract as above: our error type, one line, naming the file and key (or the flag
# or argument). Each class names its guard in docs/reliability.md.


def expect_one_line(call, exc, words):
    with pytest.raises(exc) as e:
        call()
    msg = str(e.value)
    assert isinstance(e.value, (ValueError, FileNotFoundError)), type(e.value)
    assert "\n" not in msg and len(msg) < 600, msg[:300]
    missing = [w for w in words if w not in msg]
    assert not missing, f"message {msg!r} does not name {missing}"
    return e.value


# -- config.json: type, range, consistency and memory before anything is built

DEEP = "[" * 100_000 + "]" * 100_000

CONFIG_CASES = {
    "layers_10e8": ({"num_hidden_layers": 100_000_000}, ["num_hidden_layers", "1024"]),
    "hidden_huge": ({"hidden_size": 10**6}, ["hidden_size", "65536"]),
    "vocab_huge": ({"vocab_size": 10**9}, ["vocab_size"]),
    "heads_huge": ({"num_attention_heads": 4096}, ["num_attention_heads"]),
    "ffn_string": ({"intermediate_size": "128"}, ["intermediate_size"]),
    "ffn_huge": ({"intermediate_size": 10**7}, ["intermediate_size"]),
    "kv_heads_not_dividing": ({"num_key_value_heads": 3}, ["n_kv_heads=3"]),
    "head_dim_odd": ({"head_dim": 3}, ["head_dim"]),
    "positions_huge": ({"max_position_embeddings": 10**12}, ["max_position_embeddings"]),
    "eps_string": ({"rms_norm_eps": "1e-5"}, ["rms_norm_eps"]),
    "eps_nan": ({"rms_norm_eps": float("nan")}, ["rms_norm_eps"]),
    "theta_inf": ({"rope_theta": float("inf")}, ["rope_theta"]),
    "theta_negative": ({"rope_theta": -1.0}, ["rope_theta"]),
    "tie_string": ({"tie_word_embeddings": "yes"}, ["tie_word_embeddings"]),
    "model_type_number": ({"model_type": 5}, ["model_type"]),
    "rope_scaling_list": ({"rope_scaling": [1, 2]}, ["rope_scaling"]),
    # an older file: rope_scaling alone (when rope_parameters is there too, it wins)
    "rope_factor_null": (
        {"rope_scaling": {"type": "linear", "factor": None}, "rope_parameters": None},
        ["rope_scaling", "factor"],
    ),
    "rope_parameters_factor_null": (
        {"rope_parameters": {"rope_type": "linear", "factor": None, "rope_theta": 1e4}},
        ["rope_scaling", "factor"],
    ),
    "more_than_memory": (
        {
            "hidden_size": 65536,
            "num_hidden_layers": 1024,
            "intermediate_size": 262144,
            "num_attention_heads": 512,
        },
        ["GiB", "memory"],
    ),
}


@pytest.mark.parametrize("name", list(CONFIG_CASES))
def test_config_json_value_is_checked_before_building(name, assets, tmp_path):
    changes, words = CONFIG_CASES[name]
    c = Env(assets, tmp_path).copy("ckpt")
    config = json.loads((c / "config.json").read_text())
    config.update(changes)
    (c / "config.json").write_text(json.dumps(config))
    expect_one_line(lambda: load(c), CheckpointError, [str(c / "config.json"), *words])


QUANT_CASES = {
    "group_size_0": ({"group_size": 0}, ["group_size=0"]),
    "group_size_string": ({"group_size": "64"}, ["group_size='64'"]),
    "group_size_48": ({"group_size": 48}, ["group_size=48"]),
    "bits_7": ({"bits": 7}, ["bits=7"]),
    "bits_0": ({"bits": 0}, ["bits=0"]),
    "bits_null": ({"bits": None}, ["bits=None"]),
    "mode_unknown": ({"mode": "int3"}, ["'int3'"]),
}


@pytest.mark.parametrize("name", list(QUANT_CASES))
def test_quantization_entry_is_checked_before_mlx(name, assets, tmp_path):
    changes, words = QUANT_CASES[name]
    c = Env(assets, tmp_path).copy("qckpt")
    config = json.loads((c / "config.json").read_text())
    config["quantization"].update(changes)
    (c / "config.json").write_text(json.dumps(config))
    expect_one_line(lambda: load(c), CheckpointError, [str(c / "config.json"), "'quantization'", *words])


def make_fifo(path):
    os.mkfifo(path)


def make_dev_zero(path):
    os.symlink("/dev/zero", path)


def make_dir(path):
    path.mkdir()


def make_deep(path):
    path.write_text(DEEP)


NOT_A_FILE = {
    "fifo": (make_fifo, "FIFO"),
    "dev_zero": (make_dev_zero, "character device"),
    "dir": (make_dir, "directory"),
}


@pytest.mark.parametrize("kind", list(NOT_A_FILE))
@pytest.mark.parametrize("target", ["config.json", "model.safetensors", "tokenizer.model"])
def test_checkpoint_files_must_be_regular(kind, target, assets, tmp_path):
    c = Env(assets, tmp_path).copy("ckpt")
    (c / target).unlink()
    make, word = NOT_A_FILE[kind]
    make(c / target)
    expect_one_line(lambda: load(c), (CheckpointError, TokenizerError), [str(c), target])


@case
def checkpoint_config_nested_100000_deep(env):
    c = env.copy("ckpt")
    (c / "config.json").write_text(DEEP)
    return (lambda: load(c)), CheckpointError, [str(c / "config.json"), "nested too deeply"]


@case
def checkpoint_safetensors_header_points_past_the_end(env):
    c = env.copy("ckpt")
    p = c / "model.safetensors"
    blob = p.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 10**9
    raw = json.dumps(header).encode()
    p.write_bytes(len(raw).to_bytes(8, "little") + raw + blob[8 + n :])
    return (lambda: load(c)), CheckpointError, [str(p), f"'{name}'", "data_offsets"]


@case
def checkpoint_safetensors_header_length_huge(env):
    c = env.copy("ckpt")
    p = c / "model.safetensors"
    p.write_bytes((2**62).to_bytes(8, "little") + b"{}")
    return (lambda: load(c)), CheckpointError, [str(p), "header length"]


@case
def checkpoint_safetensors_unknown_dtype(env):
    c = env.copy("ckpt")
    p = c / "model.safetensors"
    raw = json.dumps({"x": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}).encode()
    p.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0")
    return (lambda: load(c)), CheckpointError, [str(p), "'x'", "'Q4'"]


@case
def meta_pth_holds_fp8_tensor(env):
    torch = pytest.importorskip("torch")
    c = env.tmp / "meta"
    c.mkdir()
    (c / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": VOCAB}))
    shutil.copy(env.good("ckpt") / "tokenizer.model", c)
    torch.save(
        {"tok_embeddings.weight": torch.zeros(VOCAB, 64).to(torch.float8_e4m3fn)}, c / "consolidated.00.pth"
    )
    return (
        (lambda: load(c)),
        CheckpointError,
        [str(c / "consolidated.00.pth"), "'tok_embeddings.weight'", "float8"],
    )


@case
def model_args_zero_heads(env):
    return (lambda: ModelArgs(dim=64, n_heads=0)), ValueError, ["n_heads", "num_attention_heads"]


@case
def model_args_string_width(env):
    return (lambda: ModelArgs(dim="64")), ValueError, ["dim", "hidden_size", "integer"]


# -- generation: every setting and every prompt id checked before the first token

GEN_CASES = {
    "temp_nan": (dict(temp=float("nan")), ["temp", "nan"]),
    "temp_inf": (dict(temp=float("inf")), ["temp"]),
    "temp_negative": (dict(temp=-1.0), ["temp"]),
    "temp_string": (dict(temp="0.7"), ["temp"]),
    "top_p_zero": (dict(temp=1.0, top_p=0.0), ["top_p"]),
    "top_p_1_5": (dict(temp=1.0, top_p=1.5), ["top_p", "1.5"]),
    "top_p_nan": (dict(top_p=float("nan")), ["top_p"]),
    "top_k_negative": (dict(top_k=-5), ["top_k", "-5"]),
    "top_k_float": (dict(top_k=2.5), ["top_k"]),
    "max_tokens_zero": (dict(max_tokens=0), ["max_tokens"]),
    "max_tokens_none": (dict(max_tokens=None), ["max_tokens"]),
    "seed_negative": (dict(seed=-1), ["seed"]),
    "seed_huge": (dict(seed=2**70), ["seed"]),
    "prompt_id_past_vocab": (dict(prompt=[1, 5, 10**8]), ["100000000", "vocabulary", str(VOCAB)]),
    "prompt_id_negative": (dict(prompt=[-1, 5]), ["-1", "vocabulary"]),
    "prompt_empty": (dict(prompt=[]), ["empty"]),
    "prompt_strings": (dict(prompt=["a", "b"]), ["integer token ids"]),
    "prompt_float_ids": (dict(prompt=[1.5]), ["integer token ids"]),
}


@pytest.mark.parametrize("name", list(GEN_CASES))
def test_generation_arguments_are_checked(name):
    from lora_course.model.generate import generate_tokens

    kw, words = GEN_CASES[name]
    kw = {"prompt": [1, 2, 3], **kw}
    model = tiny_model()
    expect_one_line(lambda: generate_tokens(model, **kw), ValueError, ["generate:", *words])


@case
def generate_with_a_tokenizer_larger_than_the_model(env):
    from lora_course.model.generate import generate

    model = tiny_model(dim=32, vocab=64)
    return (lambda: generate(model, env.tok, "the model")), ValueError, ["400 tokens", "vocab_size is 64"]


# -- adapters: finite float tensors, sane numbers, one save per pair


def broken_adapter(env, fn=None, **config_changes):
    a = env.copy("adapters")
    if fn is not None:
        tensors, meta = mx.load(str(a / "adapters.safetensors"), return_metadata=True)
        fn(tensors)
        mx.save_safetensors(str(a / "adapters.safetensors"), tensors, metadata=meta)
    if config_changes:
        cfg = json.loads((a / "adapter_config.json").read_text())
        for k, v in config_changes.items():
            (cfg["lora_parameters"] if k in ("rank", "scale", "alpha", "dropout", "keys") else cfg)[k] = v
        (a / "adapter_config.json").write_text(json.dumps(cfg))
    return a


FIRST_B = "model.layers.0.mlp.down_proj.lora_b"


def poison(value):
    return lambda t: t.update({FIRST_B: mx.full(t[FIRST_B].shape, value)})


ADAPTER_CASES = {
    "nan_weights": (dict(fn=poison(float("nan"))), ["adapters.safetensors", FIRST_B, "NaN"]),
    "inf_weights": (dict(fn=poison(float("inf"))), ["adapters.safetensors", FIRST_B, "NaN or inf"]),
    "int_weights": (
        dict(fn=lambda t: t.update({FIRST_B: t[FIRST_B].astype(mx.int32)})),
        ["adapters.safetensors", FIRST_B, "int32"],
    ),
    "rank_string": (dict(rank="4"), ["adapter_config.json", "'rank'"]),
    "rank_10e8": (dict(rank=100_000_000), ["adapter_config.json", "rank"]),
    "scale_null_no_alpha": (dict(scale=None, alpha=None), ["adapter_config.json", "'scale'"]),
    "scale_string": (dict(scale="2.0"), ["adapter_config.json", "'scale'"]),
    "alpha_inf": (dict(alpha=float("inf")), ["adapter_config.json", "'alpha'"]),
    "dropout_1_5": (dict(dropout=1.5), ["adapter_config.json", "dropout"]),
    "num_layers_string": (dict(num_layers="2"), ["adapter_config.json", "'num_layers'"]),
    "keys_not_a_list": (dict(keys="self_attn.q_proj"), ["adapter_config.json", "'keys'"]),
    "mixed_save": (
        dict(fn=lambda t: t.update({FIRST_B: t[FIRST_B] + 1})),  # weights re-saved by another save...
        ["adapters.safetensors", "another save", "adapter_config.json"],
    ),
}


@pytest.mark.parametrize("name", list(ADAPTER_CASES))
def test_adapter_is_refused_naming_the_tensor_or_key(name, assets, tmp_path):
    kw, words = ADAPTER_CASES[name]
    env = Env(assets, tmp_path)
    a = broken_adapter(env, **kw)
    if name == "mixed_save":  # ... whose id differs from the config's
        tensors, meta = mx.load(str(a / "adapters.safetensors"), return_metadata=True)
        mx.save_safetensors(
            str(a / "adapters.safetensors"), tensors, metadata={"lora_course_save_id": "0" * 16}
        )
    expect_one_line(lambda: load_adapters(fresh_model(), a), AdapterError, [str(a), *words])


@pytest.mark.parametrize("kind", list(NOT_A_FILE) + ["deep"])
@pytest.mark.parametrize("target", ["adapter_config.json", "adapters.safetensors"])
def test_adapter_files_must_be_regular_and_shallow(kind, target, assets, tmp_path):
    a = Env(assets, tmp_path).copy("adapters")
    (a / target).unlink()
    make_deep(a / target) if kind == "deep" else NOT_A_FILE[kind][0](a / target)
    expect_one_line(lambda: load_adapters(fresh_model(), a), AdapterError, [str(a / target)])


@case
def apply_lora_rank_10e8(env):
    return (
        (lambda: apply_lora(tiny_model(), num_layers=1, rank=100_000_000)),
        ValueError,
        ["rank", "100000000"],
    )


@case
def apply_lora_rank_bool(env):
    return (lambda: apply_lora(tiny_model(), num_layers=1, rank=True)), ValueError, ["rank", "bool"]


@case
def apply_lora_alpha_nan(env):
    return (lambda: apply_lora(tiny_model(), num_layers=1, alpha=float("nan"))), ValueError, ["alpha", "nan"]


@case
def quantize_model_group_size_zero(env):
    return (lambda: quantize_model(tiny_model(), group_size=0)), QuantizationError, ["group_size=0"]


# -- datasets: regular files inside the folder, text that is text, bounded templates


@case
def jsonl_lone_surrogate(env):
    p = env.file("s.jsonl", '{"text": "ok"}\n{"text": "bad \\ud800 here"}\n')
    return data(env, p), DatasetError, [f"{p}:2:", "'text'", "surrogate"]


@case
def jsonl_chat_content_lone_surrogate(env):
    p = env.file("s.jsonl", '{"messages": [{"role": "user", "content": "\\udfff"}]}\n')
    return data(env, p), DatasetError, [f"{p}:1:", "'content'", "surrogate"]


@case
def jsonl_nested_100000_deep(env):
    p = env.file("deep.jsonl", '{"text": "a"}\n' + DEEP + "\n")
    return data(env, p), DatasetError, [f"{p}:2:", "nested too deeply"]


@case
def data_train_jsonl_is_a_directory(env):
    d = env.copy("data")
    (d / "train.jsonl").unlink()
    (d / "train.jsonl").mkdir()
    return data(env, d), DatasetError, [str(d / "train.jsonl"), "directory"]


@case
def data_valid_jsonl_is_dev_zero(env):
    d = env.copy("data")
    (d / "valid.jsonl").unlink()
    make_dev_zero(d / "valid.jsonl")
    return data(env, d), DatasetError, [str(d / "valid.jsonl"), "character device"]


@case
def data_test_jsonl_is_a_fifo(env):
    d = env.copy("data")
    (d / "test.jsonl").unlink()
    make_fifo(d / "test.jsonl")
    return data(env, d), DatasetError, [str(d / "test.jsonl"), "FIFO"]


@case
def data_train_jsonl_links_out_of_the_folder(env):
    d = env.copy("data")
    secret = env.file("secret.jsonl", '{"text": "the password is 1234"}\n')
    (d / "train.jsonl").unlink()
    (d / "train.jsonl").symlink_to(secret)
    return data(env, d), DatasetError, [str(d / "train.jsonl"), "symlink", "outside"]


@case
def single_data_file_is_dev_zero(env):
    p = env.tmp / "zero.jsonl"
    make_dev_zero(p)
    return data(env, p), DatasetError, [str(p), "character device"]


def chat_data(env, template):
    tok = Tokenizer(env.good("tok.model"), chat_template=template)
    p = write_jsonl(env.tmp / "chat.jsonl", [{"messages": [{"role": "user", "content": "x" * 20}]}])
    return (lambda: load_dataset(p, tok)), p


@case
def chat_template_nested_loops_time_out(env):
    loops = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    call, p = chat_data(env, loops)
    return call, DatasetError, [f"{p}:1:", "chat template", "longer than"]


@case
def chat_template_output_bomb(env):
    bomb = "{% for i in range(100000) %}{{ messages[0].content * 1000 }}{% endfor %}"
    call, p = chat_data(env, bomb)
    return call, DatasetError, [f"{p}:1:", "chat template", "characters"]


@case
def chat_template_string_repeat_bomb(env):
    call, p = chat_data(env, "{{ 'x' * 10**10 }}")
    return call, DatasetError, [f"{p}:1:", "chat template", "too many times"]


@case
def chat_template_type_error(env):
    call, p = chat_data(env, "{{ 1 + messages }}")
    return call, DatasetError, [f"{p}:1:", "chat template", "TypeError"]


# -- training: a run that cannot learn, and a resume that cannot be exact


@case
def train_on_zero_loss_tokens(env):
    ds = [([1, 2, 3, 4, 5, 6, 7, 8], [0, 0, 0, 0, 0, 0, 1, 1])] * 4  # completions after the cut
    args = small_args(env.tmp / "a", max_seq_length=4)
    return (
        (lambda: train(small_lora(), ds, args=args, progress=False, verbose=False)),
        ValueError,
        [
            "no token",
            "max_seq_length=4",
        ],
    )


def broken_state(env, fn_arrays=None, fn_meta=None):
    from lora_course.training.resume import STATE_FILE

    run = env.copy("run")
    arrays, metadata = mx.load(str(run / STATE_FILE), return_metadata=True)
    key = next(iter(metadata))
    meta = json.loads(metadata[key])
    if fn_arrays:
        fn_arrays(arrays)
    if fn_meta:
        fn_meta(meta)
    mx.save_safetensors(str(run / STATE_FILE), arrays, metadata={key: json.dumps(meta)})
    resume = lambda: train(
        small_lora(), SMALL_DATA, args=small_args(run, iters=3), resume=True, progress=False, verbose=False
    )  # noqa: E731
    return resume, run / STATE_FILE


def drop_first(prefix, suffix=""):
    def fn(arrays):
        arrays.pop(next(k for k in sorted(arrays) if k.startswith(prefix) and k.endswith(suffix)))

    return fn


STATE_CASES = {
    "without_step": (dict(fn_meta=lambda m: m.pop("step")), ["'step'", "missing"]),
    "step_string": (dict(fn_meta=lambda m: m.update(step="2")), ["'step'"]),
    "step_negative": (dict(fn_meta=lambda m: m.update(step=-1)), ["'step'"]),
    "without_micro_batches": (dict(fn_meta=lambda m: m.pop("micro_batches")), ["'micro_batches'"]),
    "without_args": (dict(fn_meta=lambda m: m.pop("args")), ["'args'"]),
    "best_loss_string": (dict(fn_meta=lambda m: m.update(best_val_loss="low")), ["'best_val_loss'"]),
    "missing_moment": (dict(fn_arrays=drop_first("optimizer.", ".v")), ["optimizer state lacks", ".v'"]),
    "missing_step_counter": (dict(fn_arrays=lambda a: a.pop("optimizer.step")), ["lacks 'step'"]),
    "nan_param": (
        dict(
            fn_arrays=lambda a: a.update(
                {k: v * float("nan") for k, v in a.items() if k.startswith("params.")}
            )
        ),
        ["params.", "NaN"],
    ),
    "nan_moment": (
        dict(fn_arrays=lambda a: a.update({k: v * float("nan") for k, v in a.items() if k.endswith(".m")})),
        ["optimizer.", "NaN"],
    ),
    "int_param": (
        dict(
            fn_arrays=lambda a: a.update(
                {k: v.astype(mx.int32) for k, v in a.items() if k.startswith("params.")}
            )
        ),
        ["params.", "int32"],
    ),
    "no_params": (
        dict(fn_arrays=lambda a: [a.pop(k) for k in list(a) if k.startswith("params.")]),
        ["no parameters"],
    ),
}


@pytest.mark.parametrize("name", list(STATE_CASES))
def test_resume_state_must_be_complete_and_finite(name, assets, tmp_path):
    kw, words = STATE_CASES[name]
    resume, state = broken_state(Env(assets, tmp_path), **kw)
    expect_one_line(resume, ValueError, [str(state.parent), *words])


TRAINING_ARG_CASES = {
    "seed_negative": (dict(seed=-1), ["seed=-1"]),
    "seed_string": (dict(seed="1"), ["seed='1'"]),
    "batch_string": (dict(batch_size="4"), ["batch_size='4'"]),
    "lr_nan": (dict(learning_rate=float("nan")), ["learning_rate=nan"]),
    "lr_none": (dict(learning_rate=None), ["learning_rate=None"]),
    "max_seq_huge": (dict(max_seq_length=10**9), ["max_seq_length=1000000000"]),
    "grad_clip_inf": (dict(grad_clip=float("inf")), ["grad_clip=inf"]),
    "compile_string": (dict(compile="no"), ["compile='no'"]),
}


@pytest.mark.parametrize("name", list(TRAINING_ARG_CASES))
def test_training_args_types_and_bounds(name):
    kw, words = TRAINING_ARG_CASES[name]
    expect_one_line(lambda: TrainingArgs(**kw), ValueError, words)


# -- the command line: YAML, flags and the generate settings

CLI2 = {
    "yaml_alias_bomb": (
        "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
        + "".join(f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
        + "keys: [*i, *i, *i, *i, *i, *i, *i, *i, *i, *i]\n",
        ["expands to more than"],
    ),
    "yaml_recursive_alias": ("keys: &k [*k]\n", ["refers to itself"]),
    "yaml_deep": ("keys: " + "[" * 50_000 + "]" * 50_000 + "\n", ["nested too deeply"]),
    "yaml_scale_null": ("lora_parameters:\n  rank: 4\n  scale: null\n", ["'scale'", "line 3"]),
    "yaml_scale_string_rank": ("lora_parameters:\n  rank: four\n  scale: 2.0\n", ["'scale'", "'rank'"]),
    "yaml_lr_nan": ("learning_rate: .nan\n", ["'learning_rate'", "finite number"]),
    "yaml_rank_huge": ("rank: 100000000\n", ["rank=100000000"]),
    "yaml_seed_negative": ("seed: -1\n", ["seed=-1"]),
    "yaml_max_seq_huge": ("max_seq_length: 1000000000000\n", ["max_seq_length"]),
    "yaml_bits_7": ("quantize: true\nq_bits: 7\n", ["bits=7"]),
}


@pytest.mark.parametrize("name", list(CLI2))
def test_yaml_config_bombs_and_bad_values(name, assets, tmp_path, capsys):
    text, words = CLI2[name]
    y = Env(assets, tmp_path).file("run.yaml", text)
    code = main(["train", "-c", str(y), "--train", "--adapter-path", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    missing = [w for w in [str(y), *words] if w not in err]
    assert not missing, f"{err!r} does not name {missing}"


@pytest.mark.parametrize("kind", list(NOT_A_FILE))
def test_yaml_config_must_be_a_regular_file(kind, tmp_path, capsys):
    y = tmp_path / "run.yaml"
    NOT_A_FILE[kind][0](y)
    assert main(["train", "-c", str(y), "--train"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(y) in err and NOT_A_FILE[kind][1] in err, err


FLAG_CASES = {
    "train_rank": (["train", "--train", "--rank", "100000000"], ["rank=100000000"]),
    "train_rank_zero": (["train", "--train", "--rank", "0"], ["rank=0"]),
    "train_seed": (["train", "--train", "--seed", "-1"], ["seed=-1"]),
    "train_max_seq": (["train", "--train", "--max-seq-length", "10000000000"], ["max_seq_length"]),
    "train_lr_nan": (["train", "--train", "--learning-rate", "nan"], ["learning_rate"]),
    "train_dropout": (["train", "--train", "--dropout", "1.5"], ["dropout"]),
    "train_group_size": (["train", "--train", "--quantize", "--q-group-size", "0"], ["group_size=0"]),
    "generate_temp_nan": (["generate", "--temp", "nan"], ["--temp", "nan"]),
    "generate_temp_negative": (["generate", "--temp", "-1"], ["--temp"]),
    "generate_top_k": (["generate", "--top-k", "-5"], ["--top-k", "-5"]),
    "generate_top_p": (["generate", "--temp", "1", "--top-p", "1.5"], ["--top-p", "1.5"]),
    "generate_num_tokens": (["generate", "-n", "0"], ["--num-tokens"]),
    "generate_seed": (["generate", "--seed", "-1"], ["--seed"]),
}


@pytest.mark.parametrize("name", list(FLAG_CASES))
def test_bad_flag_is_one_line(name, capsys):
    argv, words = FLAG_CASES[name]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"lora-course {argv[0]}: error: ") and err.count("\n") == 1, err
    assert all(w in err for w in words), err


@cli_case
def cli_generate_with_nan_adapter(env):
    a = broken_adapter(env, fn=poison(float("nan")))
    return ["generate", "--model", env.good("ckpt"), "--adapter-path", a, "-n", 2], [FIRST_B, "NaN"]


@cli_case
def cli_train_data_dir_as_train_jsonl(env):
    d = env.copy("data")
    (d / "train.jsonl").unlink()
    (d / "train.jsonl").mkdir()
    return ["train", "--model", env.good("ckpt"), "--train", "--data", d, "--adapter-path", env.tmp / "a"], [
        str(d / "train.jsonl"),
        "directory",
    ]


# -- no native crash: each of these killed the process with a signal before


def q_checkpoint(env, **quant):
    c = env.copy("qckpt")
    edit_json(
        c / "config.json",
        quantization={**json.loads((c / "config.json").read_text())["quantization"], **quant},
    )
    return c


CRASHERS = {
    "group_size_0": lambda env: ["generate", "--model", q_checkpoint(env, group_size=0), "-n", "2"],
    "bits_7": lambda env: ["generate", "--model", q_checkpoint(env, bits=7), "-n", "2"],
    "layers_10e8": lambda env: ["generate", "--model", _edited(env, num_hidden_layers=10**8), "-n", "2"],
    "train_rank_10e8": lambda env: [
        "train",
        "--model",
        env.good("ckpt"),
        "--train",
        "--data",
        env.good("data"),
        "--rank",
        "100000000",
        "--iters",
        "1",
        "--adapter-path",
        env.tmp / "a",
    ],  # fmt: skip
    "prompt_id_past_vocab": None,  # the API: generate_tokens(model, [1, 5, 10**8])
}


def _edited(env, **changes):
    c = env.copy("ckpt")
    edit_json(c / "config.json", **changes)
    return c


PAST_VOCAB = """
import sys
import lora_course
from lora_course import load
from lora_course.model.generate import generate_tokens
model, _ = load(sys.argv[1])
try:
    print(list(generate_tokens(model, [1, 5, 10**8], 2)))
except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
"""


@pytest.mark.parametrize("name", list(CRASHERS))
def test_no_native_crash_only_a_clean_error(name, assets, tmp_path):
    env = Env(assets, tmp_path)
    if CRASHERS[name] is None:
        cmd = [sys.executable, "-c", PAST_VOCAB, str(env.good("ckpt"))]
    else:
        cmd = [sys.executable, "-m", "lora_course", *map(str, CRASHERS[name](env))]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, (
        f"exit {result.returncode} (negative: killed by a signal): {result.stderr[-400:]}"
    )
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in result.stderr, result.stderr[-400:]


@pytest.mark.parametrize("name", [n for n in CASES if n not in FIRST_API_CASES])
def test_second_pass_api_case(name, assets, tmp_path):
    test_bad_input_is_one_clear_line(name, assets, tmp_path)


@pytest.mark.parametrize("name", [n for n in CLI_CASES if n not in FIRST_CLI_CASES])
def test_second_pass_cli_case(name, assets, tmp_path, capsys):
    test_cli_error_is_one_line_on_stderr(name, assets, tmp_path, capsys)


def test_the_second_pass_tables_are_large_enough():
    total = (
        len(CASES) + len(CLI_CASES) + len(CONFIG_CASES) + len(QUANT_CASES) + 3 * len(NOT_A_FILE)
        + len(GEN_CASES) + len(ADAPTER_CASES) + 2 * (len(NOT_A_FILE) + 1) + len(STATE_CASES)
        + len(TRAINING_ARG_CASES) + len(CLI2) + len(NOT_A_FILE) + len(FLAG_CASES) + len(CRASHERS)
    )  # fmt: skip
    assert total > 120, total
