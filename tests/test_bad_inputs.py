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
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

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
from lora_course.tokenizer.spm import Tokenizer, TokenizerError
from lora_course.training.evaluate import loss
from lora_course.training.run import TrainingDivergedError

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
    return {"root": root, "tok": tok}


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
