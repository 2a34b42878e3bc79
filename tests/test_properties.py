"""Generated configs at the boundaries: the documented error or a correct result, nothing else.

The dataset loaders, tree utilities and quantizer have their own property tests
(tests/test_data.py: 1,100 cases, tests/test_tree.py: 1,300, tests/test_quant.py: 1,200
in the "ci" profile). Here hypothesis fuzzes the three JSON/YAML configs users hand us,
where a KeyError or TypeError from deep inside would be the failure: ``config.json``
(checkpoint.read_config), ``adapter_config.json`` (load_adapters) and the training
options (``TrainingArgs.from_dict``, what a YAML file becomes).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import mlx.core as mx
from hypothesis import given, settings
from hypothesis import strategies as st

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


@settings(max_examples=300)
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


@settings(max_examples=300)
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


@settings(max_examples=300)
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
