"""Checkpoints shaped like today's real ones, against transformers: Llama 3.1-style (llama3
RoPE scaling, tied embeddings, byte-level BPE, chat template), Mistral with a sliding window,
Qwen2, and a Llama with a SentencePiece tokenizer.json. Built offline by tiny_checkpoints.py.

For each: logits within 1e-4 of transformers (fp32), 20 greedy ids equal (40 for Mistral,
five times its window), equal tokenization and chat strings, and lc.save(format="hf") that
transformers loads back. Then the CLI end to end, GGUF out and in, and one-line errors for
what we cannot read.
"""

import json

import pytest

torch = pytest.importorskip("torch", reason="reference tests need the 'reference' extra (torch)")
transformers = pytest.importorskip("transformers", reason="reference tests need the 'reference' extra")

import lora_course as lc  # noqa: E402
from lora_course import CheckpointError  # noqa: E402
from lora_course.model.generate import generate_tokens  # noqa: E402
from lora_course.model.rope import RoPE, llama3_inv_freq, rope_reference  # noqa: E402
from lora_course.recipes.cli import main  # noqa: E402

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from tiny_checkpoints import KINDS, LLAMA3_ROPE, build  # noqa: E402
from tiny_tokenizers import TEXTS  # noqa: E402

pytestmark = pytest.mark.reference

TEXT_SET = TEXTS + ["tab\tthen  two spaces   three", "x = {'a': [1, 2]}\n\n\nend", "naïve café 🦙🦙 ∑ λ→"]
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi 😀 what is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "and  in\ncode?"},
]
SEQ = 32
NEW = {"mistral": 40}  # generated tokens; 20 unless named


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    return {kind: (root / kind, build(kind, root / kind)) for kind in KINDS}


@pytest.fixture(scope="module", params=list(KINDS))
def case(request, folders):
    folder, hf = folders[request.param]
    model, tok = lc.load(folder)
    return request.param, folder, hf, model, tok


def random_ids(vocab: int, length: int = SEQ, seed: int = 0) -> list[list[int]]:
    return np.random.default_rng(seed).integers(0, vocab, (1, length)).tolist()


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor(ids)).logits.float().numpy()


def our_logits(model, ids, reference=False):
    return np.array(model(mx.array(ids), reference=reference).astype(mx.float32))


def test_logits_match_transformers(case):
    kind, _, hf, model, _ = case
    ids = random_ids(model.args.vocab_size)
    ref = hf_logits(hf, ids)
    assert np.abs(our_logits(model, ids) - ref).max() <= 1e-4
    assert np.abs(our_logits(model, ids, reference=True) - ref).max() <= 1e-4  # the readable path too


# The architecture switch of each kind; turned off, the logits must change.
SWITCHES = {
    "llama3": {"rope_scaling": None},
    "mistral": {"sliding_window": None},
    "qwen2": {"qkv_bias": False},
}


@pytest.mark.parametrize("kind", sorted(SWITCHES))
def test_the_switches_matter(kind, folders):
    """Each architecture switch changes the logits, so the test above would catch it missing."""
    folder, hf = folders[kind]
    model, _ = lc.load(folder)
    plain = lc.Model(lc.ModelArgs(**{**vars(model.args), **SWITCHES[kind]}))
    weights = lc.tree_flatten(model.parameters())
    plain.load_weights([(k, v) for k, v in weights if kind != "qwen2" or not k.endswith("_proj.bias")])
    ids = random_ids(model.args.vocab_size)
    assert np.abs(our_logits(plain, ids) - hf_logits(hf, ids)).max() > 1e-3


def test_greedy_ids_match_transformers(case):
    kind, _, hf, model, tok = case
    prompt = tok.encode("def f(x):\n    return")
    n = NEW.get(kind, 20)
    ours = list(generate_tokens(model, prompt, n))
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
        )
    assert ours == ref[0, len(prompt) :].tolist()


def test_cached_decoding_past_the_window_matches_a_full_pass(case):
    """Decoding one token at a time with the KV cache sees what a full forward pass sees."""
    kind, _, _, model, _ = case
    ids = random_ids(model.args.vocab_size, 24, seed=1)[0]
    full = our_logits(model, [ids])[0]
    cache = lc.make_cache(model)
    model(mx.array([ids[:5]]), cache=cache)
    steps = [np.array(model(mx.array([[t]]), cache=cache))[0, -1] for t in ids[5:]]
    assert np.abs(np.stack(steps) - full[5:]).max() <= 1e-4


def test_tokenization_matches_transformers(case):
    _, folder, _, _, tok = case
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    for text in TEXT_SET:
        ids = theirs(text).input_ids
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == theirs.decode(ids), text
    assert set(tok.eos_ids) >= {theirs.eos_token_id}


@pytest.mark.parametrize("generation_prompt", [False, True])
def test_chat_string_matches_transformers(case, generation_prompt):
    _, folder, _, _, tok = case
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    for messages in (MESSAGES, MESSAGES[1:2]):
        want = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        assert tok.apply_chat_template(messages, add_generation_prompt=generation_prompt) == want


def test_hf_save_loads_in_transformers(case, tmp_path):
    kind, _, hf, model, tok = case
    lc.save(model, tok, tmp_path / "out", format="hf")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == hf.config.model_type
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = random_ids(model.args.vocab_size)
    assert np.abs(hf_logits(back, ids) - hf_logits(hf, ids)).max() <= 1e-5
    again, _ = lc.load(tmp_path / "out")
    assert again.args == model.args


@pytest.mark.parametrize("gguf_type", ["f32", "q8_0"])
def test_gguf_round_trip(case, tmp_path, gguf_type):
    kind, _, _, model, tok = case
    path = lc.save(model, tok, tmp_path / "tiny.gguf", format="gguf", gguf_type=gguf_type)
    back, tok2 = lc.load(path)
    assert back.args.rope_scaling == model.args.rope_scaling
    assert back.args.sliding_window == model.args.sliding_window and back.args.qkv_bias == model.args.qkv_bias
    ids = random_ids(model.args.vocab_size)
    diff = np.abs(our_logits(back, ids) - our_logits(model, ids)).max()
    assert diff == 0.0 if gguf_type == "f32" else diff < 0.05
    assert [tok2.encode(t) for t in TEXT_SET] == [tok.encode(t) for t in TEXT_SET]


@pytest.mark.parametrize("kind", ["qwen2", "llama_spm"])
def test_transformers_reads_our_gguf(folders, kind, tmp_path):
    pytest.importorskip("gguf")
    folder, hf = folders[kind]
    model, tok = lc.load(folder)
    lc.save(model, tok, tmp_path / "tiny.gguf", format="gguf", gguf_type="f32")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf").eval()
    ids = random_ids(model.args.vocab_size)
    assert np.abs(hf_logits(theirs, ids) - hf_logits(hf, ids)).max() <= 1e-4


# ----------------------------------------------------------------------------- RoPE frequencies


def test_llama3_frequencies_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        max_position_embeddings=512,
        rope_parameters={"rope_theta": 10000.0, **LLAMA3_ROPE},
    )
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    ours = llama3_inv_freq(16, 10000.0, LLAMA3_ROPE)
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6)


def test_llama3_rope_fast_path_matches_reference():
    x = mx.random.normal((1, 2, 40, 16), key=mx.random.key(0))
    inv = llama3_inv_freq(16, 10000.0, LLAMA3_ROPE)
    for traditional in (False, True):
        rope = RoPE(16, traditional, 10000.0, inv_freq=inv)
        for offset in (0, 37):
            fast = rope(x, offset)
            slow = rope_reference(x, offset, 10000.0, traditional, inv_freq=inv)
            assert mx.abs(fast - slow).max().item() < 1e-5


# ----------------------------------------------------------------------------- the CLI


def test_cli_generate_from_folder_and_gguf(folders, tmp_path, capsys):
    folder, _ = folders["llama3"]
    model, tok = lc.load(folder)
    want = lc.generate(model, tok, "the quick", max_tokens=8)
    assert main(["generate", "--model", str(folder), "-p", "the quick", "-n", "8"]) == 0
    assert capsys.readouterr().out == "the quick" + want + "\n"
    gguf = lc.save(model, tok, tmp_path / "tiny-llama3.gguf", format="gguf", gguf_type="f32")
    assert main(["generate", "--model", str(gguf), "-p", "the quick", "-n", "8"]) == 0
    assert capsys.readouterr().out == "the quick" + want + "\n"


def test_cli_train_with_a_tokenizer_json(folders, tmp_path, capsys):
    folder, _ = folders["llama3"]
    data = tmp_path / "data"
    data.mkdir()
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"add {i} and {i}"},
                {"role": "assistant", "content": str(2 * i)},
            ]
        }
        for i in range(12)
    ]
    for split in ("train", "valid"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["train", "--model", folder, "--train", "--data", data, "--iters", 3, "--batch-size", 2]
    argv += ["--num-layers", 2, "--steps-per-eval", 3, "--val-batches", 1, "--mask-prompt"]
    argv += ["--adapter-path", tmp_path / "ad", "--no-progress"]
    assert main(list(map(str, argv))) == 0, capsys.readouterr().err
    assert (tmp_path / "ad" / "adapters.safetensors").exists()


# ----------------------------------------------------------------------------- what we cannot read


@pytest.mark.parametrize(
    "change,message",
    [
        (
            {"model_type": "gemma2"},
            "model_type 'gemma2' is not supported (lora_course reads llama, mistral, qwen2)",
        ),
        ({"hidden_act": "gelu_pytorch_tanh"}, "hidden_act 'gelu_pytorch_tanh' is not supported"),
        (
            {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
            "rope_type 'yarn' is not supported",
        ),
        (
            {"rope_scaling": {"type": "dynamic", "factor": 2.0}, "rope_parameters": None},
            "rope_type 'dynamic' is not supported",
        ),
        ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "needs a positive 'low_freq_factor'"),
        (
            {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
            "partial_rotary_factor 0.5 is not supported",
        ),
        (
            {"layer_types": ["full_attention", "sliding_attention"]},
            "layer_types 'sliding_attention' is not supported",
        ),
    ],
)
def test_unreadable_config_is_one_line(folders, tmp_path, change, message):
    folder, _ = folders["llama_spm"]
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    config = json.loads((bad / "config.json").read_text())
    config.update(change)
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as e:
        lc.load(bad)
    text = str(e.value)
    assert "\n" not in text and text.startswith(str(bad / "config.json")) and message in text, text


def test_qwen2_sliding_window_is_refused_in_one_line(folders, tmp_path, capsys):
    folder, _ = folders["qwen2"]
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "use_sliding_window": True, "sliding_window": 8}))
    assert main(["generate", "--model", str(bad), "-p", "hi", "-n", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config.json: use_sliding_window: true" in err, err


@pytest.mark.parametrize("theta,context", [(5e5, 8192), (1e4, 64), (1e4, 4)])
def test_llama3_scaling_survives_gguf_whatever_the_blend(tmp_path, theta, context):
    """Zero, one or several blended frequencies: the divisors read back are the ones written."""
    from lora_course.model.rope import llama3_factors

    scaling = {**LLAMA3_ROPE, "original_max_position_embeddings": context}
    args = lc.ModelArgs(dim=64, n_layers=1, hidden_dim=64, n_heads=4, vocab_size=64, rope_theta=theta)
    args.rope_scaling = scaling
    model = lc.Model(args)
    back, _ = lc.load(lc.save(model, None, tmp_path / "m.gguf", format="gguf", gguf_type="f32"))
    np.testing.assert_allclose(
        llama3_factors(16, theta, back.args.rope_scaling), llama3_factors(16, theta, scaling), rtol=1e-6
    )
    ids = [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert np.abs(our_logits(back, ids) - our_logits(model, ids)).max() < 1e-5


def test_meta_params_use_scaled_rope():
    args = lc.ModelArgs.from_dict(
        {
            "dim": 64,
            "n_layers": 2,
            "n_heads": 4,
            "vocab_size": 100,
            "multiple_of": 32,
            "use_scaled_rope": True,
        }
    )
    assert args.rope_scaling == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
