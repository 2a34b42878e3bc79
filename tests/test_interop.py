"""Adapters cross over: mlx-lm <-> lora_course, PEFT -> lora_course, fused HF export -> transformers.

Every test builds a tiny Hugging Face Llama on disk (transformers ``save_pretrained``)
with two tokenizers beside it: a ``tokenizer.json`` fast tokenizer for mlx-lm and
transformers, and a SentencePiece ``tokenizer.model`` for ``lora_course.load``.
"""

import json

import lora_course as lc
from lora_course.tree import tree_flatten

import mlx.core as mx
import numpy as np
import pytest

pytestmark = pytest.mark.reference

torch = pytest.importorskip("torch", reason="interop tests need the 'reference' extra (torch)")
transformers = pytest.importorskip("transformers", reason="needs the 'reference' extra (transformers)")
mlx_lm = pytest.importorskip("mlx_lm", reason="needs the 'reference' extra (mlx-lm)")
peft = pytest.importorskip("peft", reason="needs the 'reference' extra (peft)")
tokenizers = pytest.importorskip("tokenizers", reason="comes with transformers")

TOKENS = [[1, 17, 42, 99, 7, 250, 3, 64, 128, 5]]
KEYS = ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]


def max_err(a, b):
    return float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).max())


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny float32 HF Llama (dim 64, 2 layers, GQA, vocab 256) with both tokenizers."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    # rope_theta stays at its default (10000): transformers 5 writes it under
    # "rope_parameters", which mlx-lm 0.32 does not read, so any other value would make
    # mlx-lm's base model differ from transformers' and ours before any adapter is applied.
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(folder, safe_serialization=True)

    vocab = {f"w{i}": i for i in range(256)}
    wordlevel = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    wordlevel.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=wordlevel, unk_token="w0", bos_token="w1", eos_token="w2"
    )
    fast.save_pretrained(folder)

    text = [f"the quick brown fox jumps over the lazy dog {i} times" for i in range(100)]
    lc.train_tokenizer(text, 100, folder / "tokenizer", byte_fallback=False)
    return folder


def hf_logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def randomize_trainable(model, seed=0, std=0.05):
    """Stand-in for training: move every trainable tensor away from its initial value."""
    params = tree_flatten(model.trainable_parameters())
    keys = mx.random.split(mx.random.key(seed), len(params))
    model.load_weights(
        [(k, v + std * mx.random.normal(v.shape, key=key)) for (k, v), key in zip(params, keys)], strict=False
    )
    mx.eval(model.parameters())


# ----------------------------------------------------------------------------- (a) mlx-lm -> us


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_adapters_trained_by_mlx_lm_load_in_lora_course(hf_dir, tmp_path, kind):
    import mlx.optimizers as optim
    from mlx_lm.lora import CONFIG_DEFAULTS
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import save_config

    mx.random.seed(0)
    theirs, _ = mlx_lm.load(str(hf_dir))
    theirs.freeze()
    lora_parameters = {"rank": 4, "dropout": 0.0, "scale": 10.0, "keys": KEYS}
    linear_to_lora_layers(theirs, 1, lora_parameters, use_dora=kind == "dora")
    # mlx-lm's own training loop, a few steps, writing its own adapters file
    rng = np.random.default_rng(0)
    data = [(rng.integers(3, 256, size=12).tolist(), 0) for _ in range(8)]
    args = TrainingArgs(
        batch_size=4,
        iters=3,
        steps_per_report=100,
        steps_per_eval=100,
        steps_per_save=100,
        adapter_file=str(tmp_path / "adapters.safetensors"),
    )
    train(theirs, optim.Adam(learning_rate=1e-2), data, None, args=args)
    config = {
        **CONFIG_DEFAULTS,
        "model": str(hf_dir),
        "train": True,
        "fine_tune_type": kind,
        "num_layers": 1,
        "adapter_path": str(tmp_path),
        "lora_parameters": lora_parameters,
    }
    save_config(config, tmp_path / "adapter_config.json")

    theirs.eval()
    expected = theirs(mx.array(TOKENS))
    assert max_err(theirs.layers[1].self_attn.q_proj.lora_b, 0) > 0  # it did train

    ours, _ = lc.load(hf_dir)
    lc.load_adapters(ours, tmp_path)
    assert ours.lora_config.fine_tune_type == kind and ours.lora_config.scale == 10.0
    assert max_err(ours(mx.array(TOKENS)), expected) <= 1e-4


# ----------------------------------------------------------------------------- (b) us -> mlx-lm


@pytest.mark.parametrize("kind,rslora", [("lora", False), ("lora", True), ("dora", False), ("full", False)])
def test_our_adapters_load_in_mlx_lm(hf_dir, tmp_path, kind, rslora):
    ours, _ = lc.load(hf_dir)
    keys = None if kind == "full" else KEYS
    lc.apply_lora(
        ours,
        num_layers=1 if kind == "full" else 2,
        keys=keys,
        rank=4,
        alpha=8.0,
        kind=kind,
        use_rslora=rslora,
    )
    randomize_trainable(ours)
    lc.save_adapters(ours, tmp_path / "ad")
    expected = ours(mx.array(TOKENS))

    theirs, _ = mlx_lm.load(str(hf_dir), adapter_path=str(tmp_path / "ad"))
    assert max_err(theirs(mx.array(TOKENS)), expected) <= 1e-4
    assert max_err(expected, lc.load(hf_dir)[0](mx.array(TOKENS))) > 1e-3  # the adapter matters


# ----------------------------------------------------------------------------- (c) PEFT -> us


@pytest.mark.parametrize("kind,rslora", [("lora", False), ("lora", True), ("dora", False)])
def test_peft_adapter_imports_with_equal_logits(hf_dir, tmp_path, kind, rslora):
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=12,
        target_modules=["q_proj", "v_proj", "down_proj"],
        lora_dropout=0.0,
        use_dora=kind == "dora",
        use_rslora=rslora,
    )
    model = peft.get_peft_model(base, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)  # PEFT starts B at zero too; pretend it trained
            elif "lora_magnitude_vector" in name:
                p.mul_(torch.empty_like(p).uniform_(0.8, 1.2))
    model.eval()
    expected = hf_logits(model)
    with model.disable_adapter():
        assert max_err(hf_logits(model), expected) > 1e-3  # the adapter matters
    model.save_pretrained(tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"] == 4

    ours, _ = lc.load(hf_dir)
    lc.load_adapters(ours, tmp_path / "peft")
    assert ours.lora_config.scale == pytest.approx(12 / 2 if rslora else 12 / 4)
    assert max_err(ours(mx.array(TOKENS)), expected) <= 1e-4

    # the converted directory is plain mlx-lm format: mlx-lm agrees too
    lc.convert_peft_adapter(tmp_path / "peft", tmp_path / "converted")
    theirs, _ = mlx_lm.load(str(hf_dir), adapter_path=str(tmp_path / "converted"))
    assert max_err(theirs(mx.array(TOKENS)), expected) <= 1e-4


# ----------------------------------------------------------------------------- fused HF export


@pytest.mark.parametrize("kind,quantized", [("lora", False), ("dora", False), ("lora", True)])
def test_fused_hf_export_loads_in_transformers(hf_dir, tmp_path, kind, quantized):
    from lora_course.recipes.cli import main

    model_dir = hf_dir
    if quantized:
        model_dir = lc.convert(
            hf_path=hf_dir, mlx_path=tmp_path / "q4", quantize=True, q_group_size=32, q_bits=4
        )
    ours, _ = lc.load(model_dir)
    lc.apply_lora(ours, num_layers=2, keys=KEYS, rank=4, kind=kind)
    randomize_trainable(ours)
    lc.save_adapters(ours, tmp_path / "ad")
    expected = ours(mx.array(TOKENS))

    rc = main(
        [
            "fuse",
            "--model",
            str(model_dir),
            "--adapter-path",
            str(tmp_path / "ad"),
            "--save-path",
            str(tmp_path / "fused"),
            "--export-hf",
        ]
    )
    assert rc == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fused", dtype=torch.float32)
    assert max_err(hf_logits(hf.eval()), expected) <= 1e-4
