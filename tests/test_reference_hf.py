"""lora_course checkpoints against transformers: same logits, same greedy ids, clean round trips.

Random tiny Llama / Mistral models are built in-process with transformers and written
with ``save_pretrained``; nothing is downloaded. Also: Meta-format ``.pth`` checkpoints,
and a malicious ``.pth`` that must be refused without running its code.
"""

import json
import random

import pytest

torch = pytest.importorskip("torch", reason="reference tests need the 'reference' extra (torch)")
transformers = pytest.importorskip("transformers", reason="reference tests need the 'reference' extra")

import lora_course  # noqa: E402,F401  (BLAS before mlx)
from lora_course import CheckpointError, load, save  # noqa: E402
from lora_course.checkpoint import meta as meta_format  # noqa: E402
from lora_course.model.generate import generate_tokens  # noqa: E402
from lora_course.recipes import convert as conversion
from lora_course.recipes.cli import main  # noqa: E402
from lora_course.tokenizer.train import train_tokenizer  # noqa: E402
from lora_course.tree import tree_flatten  # noqa: E402

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

pytestmark = pytest.mark.reference

VOCAB = 400
WORDS = "the model layer token weight rank def return import self for in if else".split()
SMALL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=128,
    num_attention_heads=4,
    vocab_size=VOCAB,
    max_position_embeddings=256,
)
CASES = {
    # name: (config class, config kwargs, save_pretrained kwargs)
    "llama_gqa_untied_theta": (
        "LlamaConfig",
        dict(num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=False),
        {},
    ),
    "mistral": ("MistralConfig", dict(num_key_value_heads=1, tie_word_embeddings=False), {}),
    "llama_tied": ("LlamaConfig", dict(num_key_value_heads=4, tie_word_embeddings=True), {}),
    "llama_sharded": (
        "LlamaConfig",
        dict(num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=False),
        dict(max_shard_size="60KB"),
    ),
}
IDS = [[1, 17, 42, 99, 5, 300, 7, 250, 3, 64, 399, 12]]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    rng = random.Random(0)
    lines = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))) + f" x_{i} = {i * 7}"
        for i in range(300)
    ]
    return train_tokenizer(lines, VOCAB, tmp_path_factory.mktemp("tok") / "tiny")


def build_hf(name, folder, tok, seed=0):
    cls_name, kwargs, save_kwargs = CASES[name]
    torch.manual_seed(seed)
    config = getattr(transformers, cls_name)(**SMALL, **kwargs)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms start at 1.0: make them matter
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder, **save_kwargs)
    tok.save(folder)
    return model


@pytest.fixture(scope="module", params=list(CASES))
def hf_case(request, tok, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, folder, build_hf(request.param, folder, tok)


def hf_logits(model, ids=IDS):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def our_logits(model, ids=IDS):
    return np.array(model(mx.array(ids)).astype(mx.float32))


def test_logits_match_transformers(hf_case):
    name, folder, hf = hf_case
    if name == "llama_sharded":
        assert len(list(folder.glob("model-*.safetensors"))) > 1
    model, _ = load(folder)
    assert model.args.tie_word_embeddings == hf.config.tie_word_embeddings
    np.testing.assert_allclose(our_logits(model), hf_logits(hf), atol=1e-4, rtol=0)


def test_greedy_ids_match_transformers(hf_case):
    _, folder, hf = hf_case
    model, _ = load(folder)
    prompt = IDS[0][:5]
    ours = list(generate_tokens(model, prompt, 20))
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0
        )
    assert ours == ref[0, len(prompt) :].tolist()


def test_hf_round_trip_through_transformers(hf_case, tmp_path):
    _, folder, hf = hf_case
    model, tok2 = load(folder)
    save(model, tok2, tmp_path / "out", format="hf", shard_size_mb=0.05)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_allclose(hf_logits(back), hf_logits(hf), atol=1e-5, rtol=0)


def test_mlx_round_trips(hf_case, tmp_path):
    _, folder, _ = hf_case
    model, tok2 = load(folder)
    save(model, tok2, tmp_path / "mlx")
    again, _ = load(tmp_path / "mlx")
    assert np.array_equal(our_logits(model), our_logits(again))
    conversion._quantize(model, group_size=32, bits=4)
    save(model, tok2, tmp_path / "q")
    q, _ = load(tmp_path / "q")
    assert np.array_equal(our_logits(model), our_logits(q))


# ----------------------------------------------------------------------------- Meta format


def to_meta(hf, n_shards=1):
    """The HF model's weights with Meta names, RoPE rows back in interleaved order."""
    c = hf.config
    names = {"model.embed_tokens": "tok_embeddings", "model.norm": "norm", "lm_head": "output"}
    layer = {
        "self_attn.q_proj": "attention.wq",
        "self_attn.k_proj": "attention.wk",
        "self_attn.v_proj": "attention.wv",
        "self_attn.o_proj": "attention.wo",
        "mlp.gate_proj": "feed_forward.w1",
        "mlp.down_proj": "feed_forward.w2",
        "mlp.up_proj": "feed_forward.w3",
        "input_layernorm": "attention_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    state = {}
    for name, w in hf.state_dict().items():
        stem = name.rsplit(".", 1)[0]
        if stem.startswith("model.layers."):
            i, rest = stem.split(".")[2], ".".join(stem.split(".")[3:])
            meta = f"layers.{i}.{layer[rest]}.weight"
        else:
            meta = f"{names[stem]}.weight"
        if ".attention.wq." in meta or ".attention.wk." in meta:  # HF halves -> Meta pairs
            heads = c.num_attention_heads if ".wq." in meta else c.num_key_value_heads
            rows, cols = w.shape
            w = w.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)
        state[meta] = w.clone()
    shards = [{} for _ in range(n_shards)]
    for name, w in state.items():
        axis = meta_format.meta_concat_axis(name)
        parts = [w] * n_shards if axis is None else torch.chunk(w, n_shards, dim=axis)
        for s, p in zip(shards, parts):
            s[name] = p.clone()
    return shards


@pytest.fixture(scope="module")
def meta_hf(tok, tmp_path_factory):
    """A Llama whose FFN width follows Meta's multiple_of recipe: int(2 * 4 * 64 / 3) -> 192."""
    torch.manual_seed(1)
    config = transformers.LlamaConfig(
        **{**SMALL, "intermediate_size": 192}, num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-6
    )
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_pth_matches_hf_layout(meta_hf, tok, tmp_path, n_shards):
    d = tmp_path / "meta"
    d.mkdir()
    for i, shard in enumerate(to_meta(meta_hf, n_shards)):
        torch.save(shard, d / f"consolidated.{i:02d}.pth")
    (d / "params.json").write_text(
        json.dumps(
            {
                "dim": 64,
                "n_layers": 2,
                "n_heads": 4,
                "n_kv_heads": 2,
                "multiple_of": 32,
                "norm_eps": 1e-6,
                "vocab_size": -1,
                "rope_theta": 500000.0,
            }
        )
    )
    tok.save(d)
    model, _ = load(d)
    assert model.args.rope_traditional and model.args.vocab_size == VOCAB
    np.testing.assert_allclose(our_logits(model), hf_logits(meta_hf), atol=1e-4, rtol=0)
    # converting to HF layout permutes the rows back: transformers agrees
    save(model, tok, tmp_path / "hf", format="hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    np.testing.assert_allclose(hf_logits(back), hf_logits(meta_hf), atol=1e-4, rtol=0)
    # and the CLI converts it too
    assert main(["convert", "--torch-path", str(d), "--mlx-path", str(tmp_path / "mlx")]) == 0
    np.testing.assert_allclose(our_logits(load(tmp_path / "mlx")[0]), our_logits(model), atol=0, rtol=0)


class _Evil:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_malicious_pth_is_refused_without_running_code(tmp_path, tok):
    marker = tmp_path / "PWNED"
    d = tmp_path / "evil"
    d.mkdir()
    torch.save(
        {"tok_embeddings.weight": torch.zeros(4, 4), "payload": _Evil(marker)}, d / "consolidated.00.pth"
    )
    (d / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4}))
    tok.save(d)
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth: refused to load") as e:
        load(d)
    assert "\n" not in str(e.value)
    assert not marker.exists()


def test_mlx_lm_quantized_checkpoint_loads(tok, tmp_path):
    """An mlx-community-style checkpoint: embeddings and head quantized too, written by mlx-lm."""
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils", reason="needs the 'reference' extra (mlx-lm)")
    build_hf("llama_tied", tmp_path / "hf", tok)  # rope_theta 10000: mlx-lm 0.32 ignores rope_parameters
    theirs, config = mlx_lm_utils.load_model(tmp_path / "hf")
    theirs, config = mlx_lm_utils.quantize_model(theirs, config, 32, 4)
    (tmp_path / "q").mkdir()
    mlx_lm_utils.save_model(tmp_path / "q", theirs)
    mlx_lm_utils.save_config(config, tmp_path / "q" / "config.json")
    tok.save(tmp_path / "q")
    ours, _ = load(tmp_path / "q")
    assert hasattr(ours.model.embed_tokens, "scales")  # a quantized embedding, used as the head
    a, b = dict(tree_flatten(ours.parameters())), dict(tree_flatten(theirs.parameters()))
    assert a.keys() == b.keys()
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)
    np.testing.assert_allclose(our_logits(ours), our_logits(theirs), atol=1e-5, rtol=0)
