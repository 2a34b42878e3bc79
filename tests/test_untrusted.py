"""Untrusted files: loading never runs code from a file, and config paths stay inside.

1. A scan of the package source (tokens and syntax tree, comments and strings
   excluded): no pickle, no eval/exec, no unsafe YAML or Jinja, ``torch.load`` only with
   ``weights_only=True``, ``np.load`` only with ``allow_pickle=False``.
2. Pickles planted where lora_course reads files (a checkpoint, adapters, a training
   state, a tokenizer) are refused, and their payload never runs. The Meta ``.pth`` case
   (a real ``torch.save`` pickle in ``consolidated.00.pth``) needs torch and lives in
   ``tests/test_reference_hf.py::test_malicious_pth_is_refused_without_running_code``.
3. Paths named inside config files cannot leave the directory the config describes.
"""

from __future__ import annotations

import ast
import builtins
import io
import json
import pickle  # only to WRITE the malicious files below; the package never imports it
import random
import re
import tokenize
from pathlib import Path

import lora_course  # noqa: F401  (BLAS before mlx)
from lora_course import (
    AdapterError,
    CheckpointError,
    DatasetError,
    Model,
    ModelArgs,
    TrainingArgs,
    apply_lora,
    load,
    load_adapters,
    load_dataset,
    save,
    save_adapters,
    train,
    train_tokenizer,
)
from lora_course.tokenizer.base import TokenizerError
from lora_course.tokenizer.spm import Tokenizer
from lora_course.training import resume as ckpt

import mlx.core as mx
import pytest

PACKAGE = Path(lora_course.__file__).parent

# ----------------------------------------------------------------------------- 1. source scan

# Code-only regexes (comments and strings are removed before matching).
FORBIDDEN_TEXT = {
    r"\b(c?pickle|dill|cloudpickle|joblib|marshal|shelve)\b": "a pickle-like module",
    r"(?<![\w.])(eval|exec|compile|__import__)\s*\(": "builtin eval/exec/compile/__import__",
    r"\byaml\.(load|load_all|unsafe_load|unsafe_load_all|full_load|full_load_all)\s*\(": "unsafe YAML loading",
    r"\byaml\.(Unsafe|Full)?Loader\b": "a non-safe YAML Loader",
    r"\ballow_pickle\s*=\s*True\b": "allow_pickle=True",
    r"\bshell\s*=\s*True\b": "a shell command",
    r"(?<![\w.])(jinja2\.)?Environment\s*\(": "an unsandboxed Jinja environment",
}


def code_only(source: str) -> str:
    """The source with comments and string literals (docstrings too) blanked to spaces."""
    lines = [list(line) for line in source.splitlines(keepends=True)]
    blank = {tokenize.COMMENT, tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", -1)}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in blank:
            continue
        (r0, c0), (r1, c1) = tok.start, tok.end
        for r in range(r0, r1 + 1):
            row = lines[r - 1]
            for c in range(c0 if r == r0 else 0, c1 if r == r1 else len(row)):
                if row[c] != "\n":
                    row[c] = " "
    return "".join("".join(row) for row in lines)


def call_name(node: ast.Call) -> str:
    parts, f = [], node.func
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    if isinstance(f, ast.Name):
        parts.append(f.id)
    return ".".join(reversed(parts))


def kwarg_is(node: ast.Call, name: str, value) -> bool:
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in node.keywords
    )


def problems(source: str, where: str) -> list[str]:
    """Everything in ``source`` that could run code hidden in a file."""
    found = []
    code = code_only(source)
    for pattern, what in FORBIDDEN_TEXT.items():
        for m in re.finditer(pattern, code):
            found.append(f"{where}: {what} ({m.group(0)!r})")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            name = call_name(node)
            if name.endswith("torch.load") and not kwarg_is(node, "weights_only", True):
                found.append(f"{where}:{node.lineno}: torch.load without weights_only=True")
            if name in ("np.load", "numpy.load") and not kwarg_is(node, "allow_pickle", False):
                found.append(f"{where}:{node.lineno}: np.load without allow_pickle=False")
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            if any(
                str(m).split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve")
                for m in mods
            ):
                found.append(f"{where}:{node.lineno}: imports a pickle-like module")
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_the_scan_sees_the_whole_package():
    names = {p.name for p in SOURCES}
    assert {"load.py", "files.py", "datasets.py", "spm.py", "trainer.py"} <= names
    assert len(SOURCES) >= 20


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_package_source_never_unpickles_or_evals(path):
    assert problems(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE))) == []


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle\nx = pickle.loads(b)",
        "from pickle import loads",
        "y = eval(text)",
        "exec(code)",
        "cfg = yaml.load(text, Loader=yaml.Loader)",
        "cfg = yaml.full_load(text)",
        "state = torch.load(path)",
        "state = torch.load(path, weights_only=False)",
        "arr = np.load(path, allow_pickle=True)",
        "arr = np.load(path)",
        "env = jinja2.Environment()",
        "subprocess.run(cmd, shell=True)",
    ],
)
def test_the_scan_catches_each_forbidden_pattern(snippet):
    assert problems(snippet, "planted.py"), snippet


@pytest.mark.parametrize(
    "snippet",
    [
        "mx.eval(model.parameters())",
        "model.eval()",
        "f = mx.compile(step)",
        "cfg = yaml.safe_load(text)",
        "torch.load(path, map_location='cpu', weights_only=True, mmap=True)",
        "np.load(path, allow_pickle=False)",
        "env = ImmutableSandboxedEnvironment(trim_blocks=True)",
        "msg = 'do not use eval( or pickle here'  # nor in comments: eval(x)",
    ],
)
def test_the_scan_allows_the_safe_spellings(snippet):
    assert problems(snippet, "fine.py") == []


# ----------------------------------------------------------------------------- 2. planted pickles

WORDS = "the model layer token weight rank def return import self for in if else".split()


class Payload:
    """Unpickling this creates the file ``marker``: proof that code from a file ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def evil_bytes(marker: Path) -> bytes:
    return pickle.dumps({"model.norm.weight": Payload(marker)}, protocol=2)


def test_the_payload_really_runs_when_unpickled(tmp_path):
    """The control: plain pickle.loads DOES run it, so a missing marker below means 'refused'."""
    marker = tmp_path / "ran"
    pickle.loads(evil_bytes(marker))
    assert marker.exists()


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(8)) + f" x_{i} = {i}" for i in range(300)]
    tok = train_tokenizer(lines, 400, root / "tok")
    mx.random.seed(0)
    model = Model(ModelArgs(dim=64, n_layers=2, hidden_dim=128, n_heads=4, n_kv_heads=2, vocab_size=400))
    save(model, tok, root / "ckpt")
    save_adapters(apply_lora(model, num_layers=2, rank=4), root / "adapters")
    return {"root": root, "tok": tok}


def fresh():
    mx.random.seed(1)
    return Model(ModelArgs(dim=64, n_layers=2, hidden_dim=128, n_heads=4, n_kv_heads=2, vocab_size=400))


def copy(good, name, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(good["root"] / name, tmp_path / name))


def plant_hf_pickle(good, tmp_path, marker):
    """An HF-layout directory whose only weights are a pickled pytorch_model.bin."""
    c = copy(good, "ckpt", tmp_path)
    (c / "model.safetensors").unlink()
    (c / "pytorch_model.bin").write_bytes(evil_bytes(marker))
    return lambda: load(c), CheckpointError


def plant_safetensors_pickle(good, tmp_path, marker):
    """A pickle wearing the name model.safetensors."""
    c = copy(good, "ckpt", tmp_path)
    (c / "model.safetensors").write_bytes(evil_bytes(marker))
    return lambda: load(c), CheckpointError


def plant_adapter_pickle(good, tmp_path, marker):
    a = copy(good, "adapters", tmp_path)
    (a / "adapters.safetensors").write_bytes(evil_bytes(marker))
    return lambda: load_adapters(fresh(), a), AdapterError


def plant_peft_bin(good, tmp_path, marker):
    """A PEFT directory with only the pickled adapter_model.bin."""
    a = tmp_path / "peft"
    a.mkdir()
    (a / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (a / "adapter_model.bin").write_bytes(evil_bytes(marker))
    return lambda: load_adapters(fresh(), a), AdapterError


def plant_adapter_config_pickle(good, tmp_path, marker):
    a = copy(good, "adapters", tmp_path)
    (a / "adapter_config.json").write_bytes(evil_bytes(marker))
    return lambda: load_adapters(fresh(), a), AdapterError


def plant_training_state_pickle(good, tmp_path, marker):
    out = tmp_path / "run"
    out.mkdir()
    (out / ckpt.STATE_FILE).write_bytes(evil_bytes(marker))
    model = apply_lora(fresh(), num_layers=1, rank=2)
    args = TrainingArgs(iters=2, batch_size=1, adapter_path=str(out))
    return lambda: train(
        model, [([1, 2, 3], None)] * 2, args=args, resume=True, progress=False, verbose=False
    ), ValueError


def plant_tokenizer_pickle(good, tmp_path, marker):
    c = copy(good, "ckpt", tmp_path)
    (c / "tokenizer.model").write_bytes(evil_bytes(marker))
    return lambda: load(c), TokenizerError


def plant_npz_pickle(good, tmp_path, marker):
    """An object array in an .npz (np.save pickles those) given to the loader as weights."""
    import numpy as np

    c = copy(good, "ckpt", tmp_path)
    arr = np.empty(1, dtype=object)
    arr[0] = Payload(marker)
    with open(c / "model.safetensors", "wb") as f:
        np.savez(f, weights=arr)  # a zip of pickles, named like safetensors
    return lambda: load(c), CheckpointError


PLANTS = [
    plant_hf_pickle,
    plant_safetensors_pickle,
    plant_adapter_pickle,
    plant_peft_bin,
    plant_adapter_config_pickle,
    plant_training_state_pickle,
    plant_tokenizer_pickle,
    plant_npz_pickle,
]


@pytest.mark.parametrize("plant", PLANTS, ids=lambda f: f.__name__[len("plant_") :])
def test_planted_pickle_is_refused_without_running(plant, good, tmp_path):
    marker = tmp_path / "PWNED"
    call, exc = plant(good, tmp_path, marker)
    with pytest.raises(exc) as e:
        call()
    assert "\n" not in str(e.value)
    assert not marker.exists(), "code from a file was executed"


def test_malicious_chat_template_cannot_reach_python(good, tmp_path):
    """A tokenizer_config.json chat template is rendered in Jinja's sandbox: reaching for
    Python internals fails as a data error naming the file and line, nothing runs."""
    marker = tmp_path / "PWNED"
    c = copy(good, "ckpt", tmp_path)
    template = (
        "{{ ''.__class__.__mro__[1].__subclasses__()[0].__init__.__globals__"
        f"['__builtins__']['open']('{marker}', 'w') }}"
    )
    (c / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    _, tok = load(c)
    assert tok.chat_template == template
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DatasetError, match=rf"{re.escape(str(data))}:1: chat template failed") as e:
        load_dataset(data, tok)
    assert "\n" not in str(e.value) and not marker.exists()


# ----------------------------------------------------------------------------- 3. paths in configs


@pytest.mark.parametrize(
    "bad",
    [
        "../outside.safetensors",
        "/etc/passwd",
        "sub/../../x.safetensors",
        "./../x.safetensors",
        "..",
        ".",
        "",
        7,
        None,
    ],
)
def test_index_weight_map_cannot_leave_the_checkpoint(good, tmp_path, bad):
    c = copy(good, "ckpt", tmp_path)
    (tmp_path / "outside.safetensors").write_bytes((c / "model.safetensors").read_bytes())
    tensors = list(mx.load(str(c / "model.safetensors")))
    index = {"metadata": {}, "weight_map": {k: "model.safetensors" for k in tensors}}
    index["weight_map"]["model.norm.weight"] = bad
    (c / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as e:
        load(c)
    msg = str(e.value)
    assert "model.safetensors.index.json" in msg and "'model.norm.weight'" in msg and "\n" not in msg


def test_index_may_name_a_shard_in_a_subfolder(good, tmp_path):
    """Inside is fine: the rule is 'stay in the directory', not 'no slashes'."""
    c = copy(good, "ckpt", tmp_path)
    (c / "shards").mkdir()
    (c / "model.safetensors").rename(c / "shards" / "all.safetensors")
    tensors = list(mx.load(str(c / "shards" / "all.safetensors")))
    (c / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: "shards/all.safetensors" for k in tensors}})
    )
    model, _ = load(c)
    assert model.args.n_layers == 2


@pytest.mark.parametrize(
    "key",
    ["../../lm_head", "/abs.q_proj", "self_attn/../../x", "model.embed_tokens", "layers.0.self_attn.q_proj"],
)
def test_adapter_keys_cannot_leave_the_block(good, tmp_path, key):
    a = copy(good, "adapters", tmp_path)
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["lora_parameters"]["keys"] = [key]
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError) as e:
        load_adapters(fresh(), a)
    assert str(a / "adapter_config.json") in str(e.value) and repr(key) in str(e.value)


def test_paths_stored_in_adapter_config_are_never_followed(good, tmp_path):
    """adapter_config.json also stores the run's settings (model, data, adapter_path ...).
    Loading reads the two files of its own directory and nothing those fields name."""
    a = copy(good, "adapters", tmp_path)
    decoy = tmp_path / "decoy"
    other = apply_lora(fresh(), num_layers=2, rank=4)
    other.update(lora_course.tree_map(lambda p: p + 1.0, other.trainable_parameters()))
    save_adapters(other, decoy)
    edit = json.loads((a / "adapter_config.json").read_text())
    edit.update(
        adapter_path=str(decoy),
        resume_adapter_file=str(decoy),
        model="../../../etc",
        data="/nonexistent/data",
        path=str(decoy),
        adapter_file=str(decoy / "adapters.safetensors"),
    )
    (a / "adapter_config.json").write_text(json.dumps(edit))
    model = load_adapters(fresh(), a)
    own = mx.load(str(a / "adapters.safetensors"))
    got = dict(lora_course.tree_flatten(model.trainable_parameters()))
    assert got.keys() == own.keys()
    assert all(mx.array_equal(got[k], own[k]).item() for k in own)


def test_tokenizer_beside_a_checkpoint_is_the_one_in_it(good, tmp_path):
    """A tokenizer_config.json cannot redirect the tokenizer file (HF's tokenizer_file /
    vocab_file keys are ignored): the model reads <checkpoint>/tokenizer.model only."""
    c = copy(good, "ckpt", tmp_path)
    (tmp_path / "elsewhere.model").write_bytes(b"not a tokenizer")
    (c / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_file": str(tmp_path / "elsewhere.model"), "vocab_file": "../elsewhere.model"})
    )
    _, tok = load(c)
    assert Path(tok.path) == c / "tokenizer.model"
    assert tok.encode("the model") == Tokenizer(good["root"] / "ckpt" / "tokenizer.model").encode("the model")
