"""Adapters on disk: round trips, mlx-lm's layout, PEFT import, and errors that name the problem."""

import errno
import json
import os

import lora_course as lc
from lora_course.adapters.apply import apply_lora
from lora_course.adapters.files import convert_peft_adapter, load_adapters, save_adapters
from lora_course.adapters.format import AdapterError
from lora_course.adapters.lora import LoRALinear
from lora_course.tree import tree_flatten

import mlx.core as mx
import pytest

TOKENS = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])


@pytest.fixture
def fresh(tiny_args):
    """A factory for identical tiny models (same seed, same weights)."""

    def make():
        mx.random.seed(0)
        model = lc.Model(tiny_args)
        mx.eval(model.parameters())
        return model

    return make


def trained(model, kind="lora", seed=1, **kw):
    """Apply adapters and give every trainable tensor random values, as training would."""
    apply_lora(model, kind=kind, **{"num_layers": 2, "rank": 4, **kw})
    params = tree_flatten(model.trainable_parameters())
    keys = mx.random.split(mx.random.key(seed), len(params))
    model.load_weights(
        [(k, v + 0.1 * mx.random.normal(v.shape, key=key)) for (k, v), key in zip(params, keys)], strict=False
    )
    return model


@pytest.mark.parametrize("kind", ["lora", "dora", "full"])
def test_save_load_round_trip_gives_identical_logits(fresh, tmp_path, kind):
    model = trained(fresh(), kind, keys=None if kind == "full" else ["self_attn.q_proj", "mlp.up_proj"])
    expected = model(TOKENS)
    save_adapters(model, tmp_path / "ad", config={"learning_rate": 1e-4, "iters": 3})
    assert sorted(os.listdir(tmp_path / "ad")) == ["adapter_config.json", "adapters.safetensors"]
    saved = mx.load(str(tmp_path / "ad" / "adapters.safetensors"))
    assert set(saved) == {k for k, _ in tree_flatten(model.trainable_parameters())}

    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == kind and cfg["num_layers"] == 2 and cfg["learning_rate"] == 1e-4
    if kind != "full":
        assert "model.layers.1.self_attn.q_proj.lora_a" in saved
        assert cfg["lora_parameters"] == {
            "rank": 4,
            "scale": 4.0,
            "alpha": 16.0,
            "dropout": 0.0,
            "keys": ["mlp.up_proj", "self_attn.q_proj"],
            "use_rslora": False,
        }
    other = load_adapters(fresh(), tmp_path / "ad")
    assert mx.array_equal(other(TOKENS), expected).item()
    assert other.lora_config.fine_tune_type == kind


def test_resave_replaces_atomically_and_resume_into_same_layout(fresh, tmp_path):
    model = trained(fresh())
    save_adapters(model, tmp_path)
    model.layers[1].self_attn.q_proj.lora_b = mx.ones_like(model.layers[1].self_attn.q_proj.lora_b)
    save_adapters(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapters.safetensors"]
    again = trained(fresh(), seed=7)  # same layout, other values: loading overwrites them
    load_adapters(again, tmp_path)
    assert mx.array_equal(again(TOKENS), model(TOKENS)).item()


def test_failed_write_leaves_previous_adapters_intact(fresh, tmp_path, monkeypatch):
    model = trained(fresh())
    save_adapters(model, tmp_path)
    before = {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path)}

    def full_disk(path, arrays, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mx, "save_safetensors", full_disk)
    with pytest.raises(AdapterError, match="No space left on device.*unchanged"):
        save_adapters(trained(fresh(), seed=3), tmp_path)
    assert {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path)} == before


def test_save_without_adapters_is_an_error(fresh, tmp_path):
    with pytest.raises(AdapterError, match="no adapters"):
        save_adapters(fresh(), tmp_path)


def test_loads_mlx_lm_style_config_with_scale_only(fresh, tmp_path):
    model = trained(fresh(), alpha=20.0 * 4)  # scale 20, mlx-lm's default
    save_adapters(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    del cfg["lora_parameters"]["alpha"], cfg["lora_parameters"]["use_rslora"]
    cfg["lora_parameters"].pop("keys")  # mlx-lm: no keys means every linear
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    other = load_adapters(fresh(), tmp_path)
    assert other.lora_config.scale == 20.0
    assert mx.array_equal(other(TOKENS), model(TOKENS)).item()


# ----------------------------------------------------------------------------- errors


def write_adapter(tmp_path, model, edit_config=None, edit_weights=None):
    save_adapters(model, tmp_path)
    if edit_config:
        cfg = json.loads((tmp_path / "adapter_config.json").read_text())
        edit_config(cfg)
        (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    if edit_weights:
        w = dict(mx.load(str(tmp_path / "adapters.safetensors")))
        edit_weights(w)
        mx.save_safetensors(str(tmp_path / "adapters.safetensors"), w)
    return tmp_path


def test_missing_directory_and_config_name_the_directory(fresh, tmp_path):
    with pytest.raises(AdapterError, match="nowhere: no such adapter directory"):
        load_adapters(fresh(), tmp_path / "nowhere")
    with pytest.raises(AdapterError, match=f"{tmp_path}: no adapter_config.json"):
        load_adapters(fresh(), tmp_path)


def test_bad_json_names_file_and_line(fresh, tmp_path):
    (tmp_path / "adapter_config.json").write_text('{\n "num_layers": 2,\n oops\n}')
    with pytest.raises(AdapterError, match=r"adapter_config.json: line 3: not valid JSON"):
        load_adapters(fresh(), tmp_path)


def test_missing_and_truncated_weights_file(fresh, tmp_path):
    write_adapter(tmp_path, trained(fresh()))
    data = (tmp_path / "adapters.safetensors").read_bytes()
    (tmp_path / "adapters.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="adapters.safetensors: cannot read safetensors"):
        load_adapters(fresh(), tmp_path)
    os.remove(tmp_path / "adapters.safetensors")
    with pytest.raises(AdapterError, match="no adapters.safetensors"):
        load_adapters(fresh(), tmp_path)


def test_rank_mismatch_names_tensor_and_ranks(fresh, tmp_path):
    write_adapter(
        tmp_path, trained(fresh()), edit_config=lambda c: c["lora_parameters"].update(rank=8, alpha=32.0)
    )
    with pytest.raises(
        AdapterError,
        match=r"rank mismatch: tensor 'model\.layers\.\d\.[a-z_.]+\.lora_[ab]' "
        r"has rank 4 .* says rank 8",
    ):
        load_adapters(fresh(), tmp_path)


def test_shape_mismatch_names_tensor_and_both_shapes(fresh, tmp_path):
    name = "model.layers.1.self_attn.q_proj.lora_a"
    write_adapter(tmp_path, trained(fresh()), edit_weights=lambda w: w.update({name: mx.zeros((32, 4))}))
    with pytest.raises(
        AdapterError, match=rf"tensor '{name}' has shape \(32, 4\), but the model expects \(64, 4\)"
    ):
        load_adapters(fresh(), tmp_path)


def test_unknown_and_missing_tensors_are_named(fresh, tmp_path):
    extra = "model.layers.0.self_attn.q_proj.lora_c"
    write_adapter(tmp_path, trained(fresh()), edit_weights=lambda w: w.update({extra: mx.zeros((4,))}))
    with pytest.raises(AdapterError, match=rf"tensor '{extra}' is not an adapter parameter"):
        load_adapters(fresh(), tmp_path)
    gone = "model.layers.0.mlp.up_proj.lora_b"
    write_adapter(tmp_path, trained(fresh()), edit_weights=lambda w: w.pop(gone))
    with pytest.raises(AdapterError, match=rf"tensor '{gone}' is missing"):
        load_adapters(fresh(), tmp_path)


@pytest.mark.parametrize(
    "key", ["../self_attn.q_proj", "model.embed_tokens", "/etc/passwd", "layers.0.self_attn.q_proj"]
)
def test_config_keys_cannot_escape_the_block(fresh, tmp_path, key):
    write_adapter(tmp_path, trained(fresh()), edit_config=lambda c: c["lora_parameters"].update(keys=[key]))
    with pytest.raises(AdapterError, match="cannot reach outside a block"):
        load_adapters(fresh(), tmp_path)


def test_unknown_key_and_too_many_layers(fresh, tmp_path):
    write_adapter(
        tmp_path,
        trained(fresh()),
        edit_config=lambda c: c["lora_parameters"].update(keys=["self_attn.qkv_proj"]),
    )
    with pytest.raises(AdapterError, match=r"key 'self_attn.qkv_proj' is not a linear layer.*valid keys"):
        load_adapters(fresh(), tmp_path)
    write_adapter(tmp_path, trained(fresh()), edit_config=lambda c: c.update(num_layers=12))
    with pytest.raises(AdapterError, match="num_layers=12 but the model has 2 layers"):
        load_adapters(fresh(), tmp_path)
    write_adapter(tmp_path, trained(fresh()), edit_config=lambda c: c.update(fine_tune_type="ia3"))
    with pytest.raises(AdapterError, match="fine_tune_type 'ia3'"):
        load_adapters(fresh(), tmp_path)


def test_loading_different_adapters_into_an_adapted_model(fresh, tmp_path):
    write_adapter(tmp_path, trained(fresh()))
    with pytest.raises(AdapterError, match="already has different adapters"):
        load_adapters(trained(fresh(), rank=2), tmp_path)


# ----------------------------------------------------------------------------- PEFT layout


def write_peft(folder, model, kind="lora", alpha=8, rslora=False, layers=None, extra_config=None):
    """A PEFT-style directory holding the adapters of ``model`` (already adapted by us)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear) and (layers is None or int(name.split(".")[2]) in layers):
            prefix = f"base_model.model.{name}"
            tensors[f"{prefix}.lora_A.weight"] = m.lora_a.T  # (r, in)
            tensors[f"{prefix}.lora_B.weight"] = m.lora_b.T  # (out, r)
            if kind == "dora":
                tensors[f"{prefix}.lora_magnitude_vector"] = m.m
    mx.save_safetensors(str(folder / "adapter_model.safetensors"), tensors)
    cfg = {
        "peft_type": "LORA",
        "r": model.lora_config.rank,
        "lora_alpha": alpha,
        "target_modules": ["q_proj", "v_proj"],
        "use_dora": kind == "dora",
        "use_rslora": rslora,
        "bias": "none",
        "lora_dropout": 0.0,
        "rank_pattern": {},
    }
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, **(extra_config or {})}))
    return folder


@pytest.mark.parametrize("kind,rslora", [("lora", False), ("lora", True), ("dora", False)])
def test_peft_directory_loads_and_converts(fresh, tmp_path, kind, rslora):
    # r=4, lora_alpha=8: scale 2 (or 8/sqrt(4) = 4 with rsLoRA)
    model = trained(
        fresh(), kind, keys=["self_attn.q_proj", "self_attn.v_proj"], alpha=8.0, use_rslora=rslora
    )
    expected = model(TOKENS)
    peft = write_peft(tmp_path / "peft", model, kind, alpha=8, rslora=rslora)
    direct = load_adapters(fresh(), peft)
    assert direct.lora_config.scale == (4.0 if rslora else 2.0)
    assert mx.allclose(direct(TOKENS), expected, atol=1e-5).item()

    ours = convert_peft_adapter(peft, tmp_path / "ours")
    cfg = json.loads((ours / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == kind and cfg["lora_parameters"]["keys"] == [
        "self_attn.q_proj",
        "self_attn.v_proj",
    ]
    w = mx.load(str(ours / "adapters.safetensors"))
    assert w["model.layers.0.self_attn.q_proj.lora_a"].shape == (64, 4)
    assert mx.allclose(load_adapters(fresh(), ours)(TOKENS), expected, atol=1e-5).item()


def test_peft_errors(fresh, tmp_path):
    model = trained(fresh(), keys=["self_attn.q_proj"])
    with pytest.raises(AdapterError, match=r"adapts layers \[0\]|last adapted layer is 0"):
        load_adapters(fresh(), write_peft(tmp_path / "a", model, layers={0}))
    with pytest.raises(AdapterError, match="'bias': 'all' is not supported"):
        load_adapters(fresh(), write_peft(tmp_path / "b", model, extra_config={"bias": "all"}))
    with pytest.raises(AdapterError, match="peft_type 'IA3'"):
        load_adapters(fresh(), write_peft(tmp_path / "c", model, extra_config={"peft_type": "IA3"}))
    folder = write_peft(tmp_path / "d", model)
    os.rename(folder / "adapter_model.safetensors", folder / "adapter_model.bin")
    with pytest.raises(AdapterError, match="does not unpickle"):
        load_adapters(fresh(), folder)
    folder = write_peft(tmp_path / "e", model)
    w = dict(mx.load(str(folder / "adapter_model.safetensors")))
    w["base_model.model.lm_head.lora_A.weight"] = mx.zeros((4, 64))
    mx.save_safetensors(str(folder / "adapter_model.safetensors"), w)
    with pytest.raises(
        AdapterError, match="tensor 'base_model.model.lm_head.lora_A.weight' is not a LoRA tensor"
    ):
        load_adapters(fresh(), folder)
    with pytest.raises(AdapterError, match="not a PEFT adapter directory"):
        convert_peft_adapter(tmp_path / "nothing", tmp_path / "out")


# ----------------------------------------------------------------------------- lora-course fuse


@pytest.fixture
def checkpoint(fresh, tmp_path):
    """A tiny model saved with a tiny SentencePiece tokenizer, as lora_course.load expects."""
    text = [f"the quick brown fox jumps over the lazy dog {i} times" for i in range(100)]
    tok = lc.train_tokenizer(text, 100, tmp_path / "tok" / "tokenizer", byte_fallback=False)
    return lc.save(fresh(), tok, tmp_path / "base")


@pytest.mark.parametrize("quantized,flags", [(False, []), (True, ["--de-quantize"]), (True, [])])
def test_fuse_command_writes_a_standalone_model(checkpoint, tmp_path, quantized, flags):
    from lora_course.recipes.cli import main

    if quantized:
        checkpoint = lc.convert(
            hf_path=checkpoint, mlx_path=tmp_path / "q4", quantize=True, q_group_size=32, q_bits=4
        )
    model, _ = lc.load(checkpoint)
    save_adapters(trained(model, "dora", keys=["self_attn.v_proj", "mlp.gate_proj"]), tmp_path / "ad")
    expected = model(TOKENS)
    rc = main(
        [
            "fuse",
            "--model",
            str(checkpoint),
            "--adapter-path",
            str(tmp_path / "ad"),
            "--save-path",
            str(tmp_path / "fused"),
            *flags,
        ]
    )
    assert rc == 0
    fused, tokenizer = lc.load(tmp_path / "fused")
    names = [k for k, _ in tree_flatten(fused.parameters())]
    assert not any(".lora_" in k or k.endswith(".m") for k in names)
    assert any(k.endswith(".scales") for k in names) == (quantized and not flags)
    err = mx.abs(fused(TOKENS) - expected).max().item()
    if quantized and not flags:  # re-quantizing the merged weights rounds them again
        assert 0 < err < 0.2 * mx.abs(expected).max().item()
    else:
        assert err <= 1e-4


def test_fuse_command_reports_a_bad_adapter_in_one_line(checkpoint, tmp_path, capsys):
    from lora_course.recipes.cli import main

    (tmp_path / "ad").mkdir()
    rc = main(
        [
            "fuse",
            "--model",
            str(checkpoint),
            "--adapter-path",
            str(tmp_path / "ad"),
            "--save-path",
            str(tmp_path / "fused"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1 and "no adapter_config.json" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "fused").exists()
