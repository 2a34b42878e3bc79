"""Generated inputs at every loader: the documented error or a correct result, nothing else.

The dataset loaders, tree utilities and quantizer have their own property tests
(tests/data/test_datasets.py: 1,100 cases, tests/test_tree.py: 1,300, tests/quant/test_quantize.py: 1,200
in the "ci" profile). Here hypothesis fuzzes the three JSON/YAML configs users hand us,
where a KeyError or TypeError from deep inside would be the failure: ``config.json``
(checkpoint.read_config), ``adapter_config.json`` (load_adapters) and the training
options (``TrainingArgs.from_dict``, what a YAML file becomes); then whole YAML files
(``lora-course train -c``), jsonl records and safetensors headers. 1,000 cases each; the
only outcomes allowed are a load or our own error type with a one-line message.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import lora_course  # noqa: F401  (BLAS before mlx)
from lora_course import (
    AdapterError,
    CheckpointError,
    Model,
    ModelArgs,
    TrainingArgs,
    apply_lora,
    save_adapters,
)
from lora_course.adapters.files import load_adapters
from lora_course.checkpoint.config import read_config
from lora_course.config import ConfigError
from lora_course.tree import tree_flatten

import mlx.core as mx
from hypothesis import given, settings
from hypothesis import strategies as st

TMP = Path(tempfile.mkdtemp(prefix="lora_course_props_"))

# Values a hand-edited or foreign config might hold for any key.
junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 16),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.lists(st.integers(0, 4), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def one_line_naming(err: Exception, name: str) -> None:
    msg = str(err)
    assert "\n" not in msg and name in msg, msg


# ----------------------------------------------------------------------------- config.json

GOOD_HF = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}


@st.composite
def hf_configs(draw):
    config = dict(GOOD_HF)
    for key in draw(
        st.lists(
            st.sampled_from(
                sorted(GOOD_HF) + ["head_dim", "rope_scaling", "rope_parameters", "max_position_embeddings"]
            ),
            max_size=3,
            unique=True,
        )
    ):
        action = draw(st.sampled_from(["drop", "junk", "near"]))
        if action == "drop":
            config.pop(key, None)
        elif action == "near":  # plausible values, some of them wrong
            config[key] = draw(
                st.sampled_from(
                    [
                        "llama",
                        "mistral",
                        "gpt2",
                        None,
                        1,
                        3,
                        8,
                        1e-6,
                        True,
                        {"type": "linear", "factor": 2.0},
                        {"type": "linear"},
                        {"rope_type": "yarn", "factor": 4.0},
                        {"rope_theta": 5e5},
                    ]
                )
            )
        else:
            config[key] = draw(junk)
    return config


@settings(max_examples=1000, deadline=None, derandomize=True)  # the same 1,000 cases every run
@given(hf_configs())
def test_config_json_gives_model_args_or_a_checkpoint_error(config):
    folder = Path(tempfile.mkdtemp(dir=TMP))
    (folder / "config.json").write_text(json.dumps(config))
    try:
        args = read_config(folder)
    except CheckpointError as e:
        one_line_naming(e, "config.json")
        return
    assert isinstance(args, ModelArgs)
    assert args.dim == config["hidden_size"] and args.n_layers == config["num_hidden_layers"]
    assert args.vocab_size == config["vocab_size"] and args.n_heads == config["num_attention_heads"]
    # A config that loads also builds and runs (two blocks suffice: every block is alike).
    ids = mx.array([[1, 2, 3]]) % args.vocab_size  # ids past the vocabulary would read out of bounds
    logits = Model(dataclasses.replace(args, n_layers=min(args.n_layers, 2)))(ids)
    assert logits.shape == (1, 3, args.vocab_size)
    mx.eval(logits)


# ----------------------------------------------------------------------------- adapter_config.json

ARGS = ModelArgs(dim=32, n_layers=2, hidden_dim=64, n_heads=4, n_kv_heads=2, vocab_size=64)
mx.random.seed(0)
_TRAINED = apply_lora(Model(ARGS), num_layers=2, rank=4, alpha=8.0)
_GOOD = save_adapters(_TRAINED, TMP / "good_adapter")
GOOD_ADAPTER = json.loads((_GOOD / "adapter_config.json").read_text())
PARAM_KEYS = ["rank", "scale", "alpha", "dropout", "keys", "use_rslora"]


@st.composite
def adapter_configs(draw):
    config = json.loads(json.dumps(GOOD_ADAPTER))
    params = config["lora_parameters"]
    for key in draw(
        st.lists(
            st.sampled_from(PARAM_KEYS + ["num_layers", "fine_tune_type", "lora_parameters"]),
            max_size=3,
            unique=True,
        )
    ):
        where = params if key in PARAM_KEYS and isinstance(params, dict) else config
        action = draw(st.sampled_from(["drop", "junk", "near"]))
        if action == "drop":
            where.pop(key, None)
        elif action == "near":  # plausible but maybe wrong for this model
            where[key] = draw(
                {
                    "rank": st.sampled_from([1, 2, 4, 8]),
                    "scale": st.sampled_from([2.0, 1.0, 0.5]),
                    "alpha": st.sampled_from([8.0, 4.0, 16.0]),
                    "dropout": st.sampled_from([0.0, 0.5, 1.0]),
                    "keys": st.lists(
                        st.sampled_from(["self_attn.q_proj", "mlp.up_proj", "self_attn.wq", "q_proj"]),
                        min_size=1,
                        max_size=2,
                        unique=True,
                    ),
                    "use_rslora": st.booleans(),
                    "num_layers": st.sampled_from([-1, 0, 1, 2, 3]),
                    "fine_tune_type": st.sampled_from(["lora", "dora", "full", "ia3"]),
                    "lora_parameters": st.just(None),
                }[key]
            )
        else:
            where[key] = draw(junk)
    return config


@settings(max_examples=1000, deadline=None, derandomize=True)  # the same 1,000 cases every run
@given(adapter_configs())
def test_adapter_config_loads_or_gives_an_adapter_error(config):
    folder = Path(tempfile.mkdtemp(dir=TMP))
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapters.safetensors").symlink_to(_GOOD / "adapters.safetensors")
    model = Model(ARGS)
    try:
        load_adapters(model, folder)
    except AdapterError as e:
        one_line_naming(e, str(folder))
        return
    # Loaded: then the file's tensors fit this layout exactly and are in the model.
    expected = mx.load(str(_GOOD / "adapters.safetensors"))
    got = dict(tree_flatten(model.trainable_parameters()))
    assert got.keys() == expected.keys()
    assert all(mx.array_equal(got[k], expected[k]).item() for k in expected)


# ----------------------------------------------------------------------------- training options

OPTIONS = [
    "iters",
    "batch_size",
    "learning_rate",
    "lr_schedule",
    "warmup",
    "optimizer",
    "grad_clip",
    "steps_per_eval",
    "val_batches",
    "epochs",
    "early_stopping_patience",
    "seed",
    "compile",
]


@settings(max_examples=1000, deadline=None, derandomize=True)  # the same 1,000 cases every run
@given(
    st.dictionaries(
        st.sampled_from(OPTIONS + ["learnig_rate", "lora_layers", "batch-size"]),
        st.one_of(junk, st.sampled_from(["cosine", "adamw", "1e-4", "lion"])),
        max_size=4,
    )
)
def test_training_options_build_or_name_the_bad_key(options):
    try:
        args = TrainingArgs.from_dict(options, source="run.yaml")
    except ConfigError as e:
        one_line_naming(e, "run.yaml")
        assert repr(e.key) in str(e) or str(e.key) in str(e)
        return
    except ValueError as e:  # a value of the right type that cannot work names its key
        assert "\n" not in str(e) and any(f"{k.replace('-', '_')}=" in str(e) for k in options), str(e)
        return
    for key, value in options.items():
        got = getattr(args, key.replace("-", "_"))
        assert got == value or (isinstance(value, str) and got == float(value)), (key, value, got)


# ----------------------------------------------------------------------------- YAML files

from lora_course.checkpoint.files import mx_load  # noqa: E402
from lora_course.data.datasets import load_dataset  # noqa: E402
from lora_course.data.records import DatasetError  # noqa: E402
from lora_course.recipes.train_cli import read_yaml_config  # noqa: E402
from lora_course.tokenizer.train import train_tokenizer  # noqa: E402

YAML_KEYS = ["iters", "rank", "learning_rate", "keys", "lora_parameters", "scale", "seed", "lerning_rate"]
yaml_scalars = st.sampled_from(
    ["1", "-1", "0", "1e-4", ".nan", ".inf", "null", "true", "x", "'8'", "[]", "{}", "100000000000000000000"]
)


@st.composite
def yaml_texts(draw):
    lines = []
    for key in draw(st.lists(st.sampled_from(YAML_KEYS), max_size=4, unique=True)):
        form = draw(st.sampled_from(["scalar", "list", "nested", "anchor", "junk"]))
        if form == "scalar":
            lines.append(f"{key}: {draw(yaml_scalars)}")
        elif form == "list":
            lines.append(f"{key}: [{', '.join(draw(st.lists(yaml_scalars, max_size=3)))}]")
        elif form == "nested":
            lines.append(f"{key}:\n  rank: {draw(yaml_scalars)}\n  scale: {draw(yaml_scalars)}")
        elif form == "anchor":
            lines.append(f"{key}: &{key} [{draw(yaml_scalars)}]\nz{key}: [*{key}, *{key}]")
        else:
            lines.append(draw(st.text(st.sampled_from(":-[]{}&*!|>'\"# \nab1"), max_size=20)))
    return "\n".join(lines) + "\n"


@settings(max_examples=1000, deadline=None, derandomize=True)  # the same 1,000 cases every run
@given(yaml_texts())
def test_yaml_config_reads_or_gives_a_config_error(text):
    path = Path(tempfile.mkdtemp(dir=TMP)) / "run.yaml"
    path.write_text(text)
    try:
        flat = read_yaml_config(path)
    except ConfigError as e:
        one_line_naming(e, str(path))
        return
    assert isinstance(flat, dict)


# ----------------------------------------------------------------------------- jsonl records

TOK = train_tokenizer(["the model layer token weight rank " * 3, "def return import self"] * 50, 300, None)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def records(draw):
    shape = draw(st.sampled_from(["text", "completion", "chat", "junk"]))
    if shape == "junk":
        return draw(json_values)
    if shape == "text":
        return {"text": draw(st.one_of(st.text(max_size=10), json_values))}
    if shape == "completion":
        return {k: draw(st.one_of(st.text(max_size=6), json_values)) for k in ("prompt", "completion")}
    role = st.one_of(st.sampled_from(["user", "assistant", "system", "tool"]), json_values)
    message = st.fixed_dictionaries({"role": role, "content": st.one_of(st.text(max_size=6), json_values)})
    return {"messages": draw(st.one_of(st.lists(message, max_size=3), json_values))}


@settings(max_examples=1000, deadline=None, derandomize=True)  # the same 1,000 cases every run
@given(st.lists(records(), min_size=1, max_size=3), st.booleans(), st.booleans())
def test_jsonl_records_load_or_give_a_dataset_error(rows, mask_prompt, raw_break):
    path = Path(tempfile.mkdtemp(dir=TMP)) / "d.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in rows)
    text = text[:-3] if raw_break else text  # the cut may drop a whole short last line
    path.write_text(text)
    try:
        splits = load_dataset(path, TOK, mask_prompt=mask_prompt)
    except DatasetError as e:
        one_line_naming(e, str(path))
        return
    assert len(splits.train) == len([line for line in text.splitlines() if line.strip()])


# ----------------------------------------------------------------------------- safetensors headers

entries = st.fixed_dictionaries(
    {
        "dtype": st.one_of(st.sampled_from(["F32", "F16", "BF16", "I32", "U8", "F8_E4M3", "Q4"]), junk),
        "shape": st.one_of(st.lists(st.integers(0, 4), max_size=3), junk),
        "data_offsets": st.one_of(st.lists(st.integers(-2, 80), min_size=2, max_size=2), junk),
    }
)


@settings(max_examples=1000, deadline=None, derandomize=True)  # the same 1,000 cases every run
@given(
    st.dictionaries(st.sampled_from(["a", "b", "__metadata__"]), st.one_of(entries, junk), max_size=3),
    st.integers(0, 80),
    st.sampled_from(["exact", "long", "short", "garbage"]),
)
def test_safetensors_header_loads_or_gives_a_checkpoint_error(header, data_bytes, length):
    raw = json.dumps(header).encode() if length != "garbage" else b"\xff{not json"
    n = {"exact": len(raw), "long": len(raw) + 10**6, "short": max(len(raw) - 3, 0), "garbage": len(raw)}[
        length
    ]
    path = Path(tempfile.mkdtemp(dir=TMP)) / "model.safetensors"
    path.write_bytes(n.to_bytes(8, "little") + raw + bytes(data_bytes))
    try:
        tensors = mx_load(path)
    except CheckpointError as e:
        one_line_naming(e, str(path))
        return
    for value in tensors.values():
        mx.eval(value)
