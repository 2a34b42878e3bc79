"""PEFT out (peft_export.py): our adapters applied by peft.PeftModel give our logits.

A tiny float32 transformers Llama is saved with ``save_pretrained`` and loaded by both
libraries; nothing is downloaded.
"""

import json

import lora_course as lc
from lora_course import AdapterError
from lora_course.adapters.files import export_peft
from lora_course.tree import tree_flatten

import mlx.core as mx
import numpy as np
import pytest

IDS = [[1, 17, 42, 99, 7, 250, 3, 64, 128, 5]]
KEYS = ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]


def trained(model, kind, rslora=False, seed=0):
    lc.apply_lora(model, 1, KEYS, rank=4, alpha=8.0, kind=kind, use_rslora=rslora)
    params = tree_flatten(model.trainable_parameters())
    keys = mx.random.split(mx.random.key(seed), len(params))
    model.load_weights(
        [(k, v + 0.05 * mx.random.normal(v.shape, key=key)) for (k, v), key in zip(params, keys)],
        strict=False,
    )
    mx.eval(model.parameters())
    return model


def test_peft_directory_layout_and_round_trip(tiny_model, tmp_path):
    base = list(tree_flatten(tiny_model.parameters()))
    model = trained(tiny_model, "dora")
    lc.save_adapters(model, tmp_path / "peft", format="peft", config={"base_model_name_or_path": "org/tiny"})
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    assert cfg["use_dora"] and cfg["layers_to_transform"] == [1] and cfg["target_modules"] == sorted(KEYS)
    assert cfg["base_model_name_or_path"] == "org/tiny"
    w = mx.load(str(tmp_path / "peft" / "adapter_model.safetensors"))
    a = w["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    assert a.shape == (4, 64) and mx.array_equal(a, model.model.layers[1].self_attn.q_proj.lora_a.T)
    assert w["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (64, 4)
    assert w["base_model.model.model.layers.1.self_attn.v_proj.lora_magnitude_vector"].shape == (32,)
    # read back by our own PEFT importer: same outputs
    fresh = lc.Model(tiny_model.args)
    fresh.load_weights(base)
    lc.load_adapters(fresh, tmp_path / "peft")
    ids = mx.array(IDS)
    assert mx.allclose(fresh(ids), model(ids), atol=1e-5)


def test_export_command_and_errors(tiny_model, tmp_path):
    from lora_course.recipes.cli import main

    lc.save_adapters(trained(tiny_model, "lora"), tmp_path / "ours")
    assert (
        main(
            [
                "export-adapter",
                "--adapter-path",
                str(tmp_path / "ours"),
                "--save-path",
                str(tmp_path / "peft"),
            ]
        )
        == 0
    )
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    with pytest.raises(AdapterError, match="format must be 'mlx' or 'peft'"):
        lc.save_adapters(tiny_model, tmp_path / "x", format="torch")


def test_full_fine_tuning_has_no_peft_form(tiny_model, tmp_path):
    lc.apply_lora(tiny_model, 1, kind="full")
    with pytest.raises(AdapterError, match="full fine-tuning has no PEFT adapter form"):
        lc.save_adapters(tiny_model, tmp_path / "p", format="peft")
    lc.save_adapters(tiny_model, tmp_path / "ours")
    with pytest.raises(AdapterError, match="full fine-tuning"):
        export_peft(tmp_path / "ours", tmp_path / "p")


# ----------------------------------------------------------------------------- against PEFT


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch = pytest.importorskip("torch", reason="needs the 'reference' extra (torch)")
    transformers = pytest.importorskip("transformers", reason="needs the 'reference' extra")
    folder = tmp_path_factory.mktemp("tiny_llama")
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).to(torch.float32).save_pretrained(folder)
    text = [f"the quick brown fox jumps over the lazy dog {i} times" for i in range(100)]
    lc.train_tokenizer(text, 100, folder / "tokenizer", byte_fallback=False)
    return folder


@pytest.mark.reference
@pytest.mark.parametrize("kind,rslora", [("lora", False), ("lora", True), ("dora", False)])
def test_peft_applies_our_adapter_with_our_logits(hf_dir, tmp_path, kind, rslora):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft", reason="needs the 'reference' extra (peft)")
    model, _ = lc.load(hf_dir)
    ours = np.array(trained(model, kind, rslora)(mx.array(IDS)))
    lc.save_adapters(model, tmp_path / "peft", format="peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    wrapped = [n for n, _ in theirs.named_modules() if n.endswith("lora_A")]
    assert len(wrapped) == len(KEYS)  # only the last block's three modules
    with torch.no_grad():
        got = theirs(torch.tensor(IDS)).logits.numpy()
    assert np.abs(got - ours).max() <= 1e-4
