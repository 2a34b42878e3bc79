"""GGUF in and out (gguf_read.py, gguf_write.py): round trips, our q8_0 writer, bad files,
and independent programs on the other side (transformers' GGUF loader, mlx-lm's writer,
llama.cpp's gguf-py) in the tests marked ``reference``.

The tokenizer's own GGUF form is tested in test_hf_tokenizer.py; here the fused file
must carry it too (the fuse test), and weights-only files load with a warning.
"""

import dataclasses
import warnings

import lora_course as lc
from lora_course import CheckpointError
from lora_course.checkpoint.gguf_header import read_header
from lora_course.checkpoint.gguf_read import gguf_to_hf_name
from lora_course.checkpoint.gguf_write import gguf_metadata, gguf_tensors, halves_to_interleaved, write_gguf
from lora_course.checkpoint.meta import interleaved_to_halves
from lora_course.tree import tree_flatten

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

IDS = mx.array([[1, 17, 42, 99, 7, 250, 3, 64, 128, 5]])
pytestmark = pytest.mark.filterwarnings("ignore:.*no tokenizer.ggml:UserWarning")  # weights-only files


def logits(model, ids=IDS):
    return np.array(model(ids).astype(mx.float32))


def err(a, b):
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


@pytest.fixture
def tied_model(tiny_args):
    mx.random.seed(1)
    model = lc.Model(dataclasses.replace(tiny_args, tie_word_embeddings=True))
    mx.eval(model.parameters())
    return model


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("gguf_type,tol", [("f32", 1e-6), ("f16", 5e-3), ("q8_0", 6e-2)])
@pytest.mark.parametrize("tied", [False, True])
def test_save_then_load_gives_the_same_logits(tiny_model, tied_model, tmp_path, gguf_type, tol, tied):
    model = tied_model if tied else tiny_model
    path = lc.save(model, None, tmp_path / "m.gguf", format="gguf", gguf_type=gguf_type)
    back, _ = lc.load(path)
    assert back.args.tie_word_embeddings == tied and back.args.n_kv_heads == 2
    assert back.args.rope_theta == 500.0 and back.args.vocab_size == 256
    assert err(logits(back), logits(model)) <= tol * np.abs(logits(model)).max()
    quantized = isinstance(back.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert quantized == (gguf_type == "q8_0")
    if gguf_type == "q8_0":
        assert back.args.quantization == {"group_size": 32, "bits": 8}


def test_header_follows_llama_cpp_conventions(tiny_model, tmp_path):
    path = lc.save(tiny_model, None, tmp_path / "m.gguf", format="gguf")
    meta, tensors = read_header(path)
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 2
    assert meta["llama.attention.head_count_kv"] == 2 and meta["general.file_type"] == 1
    assert tensors["blk.0.attn_q.weight"] == ((64, 64), "F16")
    assert tensors["blk.1.attn_norm.weight"] == ((64,), "F32")  # norms stay float32
    assert tensors["output.weight"] == ((256, 64), "F16")
    # q/k rows are in llama.cpp's interleaved order, v is untouched
    w = tiny_model.model.layers[0].self_attn.k_proj.weight
    saved = mx.load(str(path))
    assert mx.allclose(saved["blk.0.attn_k.weight"], halves_to_interleaved(w, 2).astype(mx.float16))
    assert mx.array_equal(
        saved["blk.0.attn_v.weight"], tiny_model.model.layers[0].self_attn.v_proj.weight.astype(mx.float16)
    )


def test_rope_row_orders_are_inverse():
    w = mx.arange(8 * 16 * 3).reshape(8 * 16, 3)
    assert mx.array_equal(interleaved_to_halves(halves_to_interleaved(w, 8), 8), w)
    assert gguf_to_hf_name("blk.3.ffn_down.weight") == "model.layers.3.mlp.down_proj.weight"
    assert gguf_to_hf_name("output_norm.weight") == "model.norm.weight"
    assert gguf_to_hf_name("blk.3.ffn_gate_exps.weight") is None


def test_our_writer_matches_mx_save_gguf(tiny_model, tmp_path):
    """write_gguf (used for q8_0) against MLX's writer, on float tensors."""
    tensors = {
        k: v.astype(mx.float32 if v.ndim == 1 else mx.float16) for k, v in gguf_tensors(tiny_model).items()
    }
    meta = {
        **gguf_metadata(tiny_model.args, "f16"),
        "tokenizer.ggml.tokens": ["a", "b", "c"],
        "tokenizer.ggml.scores": mx.array([0.0, -1.0, -2.0]),
    }
    mx.save_gguf(str(tmp_path / "mlx.gguf"), tensors, meta)
    with open(tmp_path / "ours.gguf", "wb") as f:
        write_gguf(f, {k: ("F32" if v.ndim == 1 else "F16", v) for k, v in tensors.items()}, meta)
    (a, ma), (b, mb) = (mx.load(str(tmp_path / n), return_metadata=True) for n in ("mlx.gguf", "ours.gguf"))
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and mx.array_equal(a[k], b[k]) for k in a)
    assert ma.keys() == mb.keys()
    for k in ma:
        same = ma[k] == mb[k] if isinstance(ma[k], (str, list)) else mx.array_equal(ma[k], mb[k])
        assert same and getattr(ma[k], "dtype", None) == getattr(mb[k], "dtype", None), k
    assert read_header(tmp_path / "ours.gguf") == read_header(tmp_path / "mlx.gguf")


def test_save_gguf_refuses_bad_requests(tiny_model, tmp_path):
    with pytest.raises(CheckpointError, match="gguf_type must be one of"):
        lc.save(tiny_model, None, tmp_path / "m.gguf", format="gguf", gguf_type="q4_k")
    with pytest.raises(CheckpointError, match="must end in .gguf"):
        lc.save(tiny_model, None, tmp_path / "m.bin", format="gguf")
    lc.apply_lora(tiny_model, 1, ["self_attn.q_proj"])
    with pytest.raises(CheckpointError, match="adapter parameters"):
        lc.save(tiny_model, None, tmp_path / "m.gguf", format="gguf")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- bad files


@pytest.fixture
def good(tiny_model):
    """(tensors, metadata) of a valid file, to spoil one thing at a time."""
    tensors = {k: v.astype(mx.float32) for k, v in gguf_tensors(tiny_model).items()}
    return tensors, gguf_metadata(tiny_model.args, "f32")


@pytest.mark.parametrize(
    "spoil,message",
    [
        (
            lambda t, m: m.update({"general.architecture": "gemma2"}),
            "architecture 'gemma2' .key 'general.architecture'. is not supported",
        ),
        (lambda t, m: m.pop("general.architecture"), "missing metadata key 'general.architecture'"),
        (lambda t, m: m.pop("llama.block_count"), "missing metadata key 'llama.block_count'"),
        (
            lambda t, m: m.update({"llama.embedding_length": mx.array(-3, dtype=mx.int32)}),
            "'llama.embedding_length' must be a positive integer, got -3",
        ),
        (lambda t, m: m.update({"llama.rope.scaling.type": "yarn"}), "'llama.rope.scaling.type' is 'yarn'"),
        (
            lambda t, m: t.update({"blk.1.attn_v.weight": mx.zeros((16, 64))}),
            r"tensor 'blk.1.attn_v.weight' has shape \(16, 64\), but the metadata implies \(32, 64\)",
        ),
        (
            lambda t, m: t.update({"blk.7.attn_q.weight": mx.zeros((64, 64))}),
            "unexpected tensor 'blk.7.attn_q.weight'",
        ),
        (
            lambda t, m: t.pop("blk.0.ffn_up.weight"),
            "tensor for 'model.layers.0.mlp.up_proj.weight' is missing",
        ),
    ],
)
def test_bad_gguf_is_named_in_one_line(good, tmp_path, spoil, message):
    tensors, meta = good
    spoil(tensors, meta)
    mx.save_gguf(str(tmp_path / "bad.gguf"), tensors, meta)
    with pytest.raises(CheckpointError, match=message) as e:
        lc.load(tmp_path / "bad.gguf")
    assert str(e.value).startswith(str(tmp_path / "bad.gguf")) and "\n" not in str(e.value)


def test_truncated_and_foreign_files(good, tmp_path):
    mx.save_gguf(str(tmp_path / "ok.gguf"), *good)
    data = (tmp_path / "ok.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:200])
    with pytest.raises(CheckpointError, match="header is truncated"):
        lc.load(tmp_path / "cut.gguf")
    (tmp_path / "x.gguf").write_bytes(b"GGML" + data[4:])
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        lc.load(tmp_path / "x.gguf")
    (tmp_path / "huge.gguf").write_bytes(data[:8] + (2**60).to_bytes(8, "little") + data[16:])
    with pytest.raises(CheckpointError, match="claims 1152921504606846976 tensors"):
        lc.load(tmp_path / "huge.gguf")


# ----------------------------------------------------------------------------- fuse --export-gguf


def test_fuse_command_exports_gguf(tiny_model, tmp_path):
    from lora_course.recipes.cli import main

    text = [f"the quick brown fox jumps over the lazy dog {i} times" for i in range(100)]
    tok = lc.train_tokenizer(text, 100, tmp_path / "tok" / "tokenizer", byte_fallback=False)
    lc.save(tiny_model, tok, tmp_path / "base")
    lc.apply_lora(tiny_model, 1, ["self_attn.q_proj", "mlp.down_proj"], rank=4)
    params = tree_flatten(tiny_model.trainable_parameters())
    tiny_model.load_weights([(k, v + 0.05) for k, v in params], strict=False)
    lc.save_adapters(tiny_model, tmp_path / "ad")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fused file carries its tokenizer: no warning
        rc = main(
            [
                "fuse",
                "--model",
                str(tmp_path / "base"),
                "--adapter-path",
                str(tmp_path / "ad"),
                "--save-path",
                str(tmp_path / "out"),
                "--export-gguf",
                "--gguf-type",
                "f32",
            ]
        )
    assert rc == 0
    fused, fused_tok = lc.load(tmp_path / "out" / "ggml-model-f32.gguf")
    assert err(logits(fused), logits(tiny_model)) <= 1e-4
    # the tokenizer travels in the file's metadata: the same ids for the training text
    for line in text[:5]:
        assert fused_tok.encode(line) == tok.encode(line)
    assert (fused_tok.bos_id, fused_tok.eos_id) == (tok.bos_id, tok.eos_id)


# ----------------------------------------------------------------------------- independent programs


def _gguf_py_file(path, tensors, meta, qtype):
    """Write a GGUF with llama.cpp's own gguf-py, 2-D tensors quantized to ``qtype``."""
    gguf = pytest.importorskip("gguf", reason="needs the 'reference' extra (gguf)")
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in meta.items():
        if key == "general.architecture":
            continue
        if isinstance(value, str):
            writer.add_string(key, value)
        elif value.dtype == mx.uint32:
            writer.add_uint32(key, value.item())
        else:
            writer.add_float32(key, value.item())
    kind = getattr(gguf.GGMLQuantizationType, qtype)
    for name, value in tensors.items():
        data = np.asarray(value.astype(mx.float32))
        if data.ndim == 2:
            writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf


@pytest.mark.reference
@pytest.mark.parametrize("qtype,bits", [("Q4_0", 4), ("Q4_1", 4), ("Q8_0", 8)])
def test_quantized_gguf_from_llama_cpp_loads_packed(tiny_model, tmp_path, qtype, bits):
    tensors, meta = gguf_tensors(tiny_model), gguf_metadata(tiny_model.args, "f32")
    gguf = _gguf_py_file(tmp_path / "q.gguf", tensors, meta, qtype)
    model, _ = lc.load(tmp_path / "q.gguf")
    layer = model.model.layers[1].mlp.down_proj
    assert isinstance(layer, nn.QuantizedLinear) and (layer.bits, layer.group_size) == (bits, 32)
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    # reference: llama.cpp's own de-quantization, written as float32 and loaded
    reader = gguf.GGUFReader(str(tmp_path / "q.gguf"))
    plain = {t.name: mx.array(gguf.quants.dequantize(t.data, t.tensor_type)) for t in reader.tensors}
    mx.save_gguf(str(tmp_path / "f.gguf"), plain, meta)
    reference, _ = lc.load(tmp_path / "f.gguf")
    # MLX keeps scales and biases in float16: a little rounding on top of llama.cpp's math
    assert err(logits(model), logits(reference)) <= 2e-2 * np.abs(logits(reference)).max()


@pytest.mark.reference
def test_types_mlx_converts_warn_and_types_it_cannot_read_fail(tiny_model, tmp_path):
    tensors, meta = gguf_tensors(tiny_model), gguf_metadata(tiny_model.args, "f32")
    _gguf_py_file(tmp_path / "bf.gguf", tensors, meta, "BF16")
    with pytest.warns(
        UserWarning, match="stored as BF16 .e.g. 'model.embed_tokens.weight'. were de-quantized"
    ):
        model, _ = lc.load(tmp_path / "bf.gguf")
    assert err(logits(model), logits(tiny_model)) <= 2e-2 * np.abs(logits(tiny_model)).max()
    _gguf_py_file(tmp_path / "q5.gguf", tensors, meta, "Q5_0")
    with pytest.raises(
        CheckpointError, match="tensor 'token_embd.weight' is stored as Q5_0, which MLX cannot read"
    ):
        lc.load(tmp_path / "q5.gguf")


@pytest.mark.reference
@pytest.mark.parametrize("gguf_type,tol", [("f32", 1e-4), ("f16", 5e-3), ("q8_0", 6e-2)])
def test_transformers_reads_our_gguf(tiny_model, tmp_path, gguf_type, tol):
    torch = pytest.importorskip("torch", reason="needs the 'reference' extra (torch)")
    transformers = pytest.importorskip("transformers", reason="needs the 'reference' extra")
    pytest.importorskip("gguf", reason="transformers reads GGUF through gguf-py")
    lc.save(tiny_model, None, tmp_path / "m.gguf", format="gguf", gguf_type=gguf_type)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="m.gguf", dtype=torch.float32
    ).eval()
    rope = getattr(theirs.config, "rope_parameters", None) or {"rope_theta": theirs.config.rope_theta}
    assert theirs.config.num_key_value_heads == 2 and rope["rope_theta"] == 500.0
    with torch.no_grad():
        got = theirs(torch.tensor(np.array(IDS))).logits.numpy()
    ours, _ = lc.load(tmp_path / "m.gguf")  # the same rounding, read back by us
    # q8_0 stays packed in MLX, whose float16 scales and biases round a little more
    assert err(got, logits(ours)) <= (2e-3 if gguf_type == "q8_0" else 1e-4) * max(1.0, np.abs(got).max())
    assert err(got, logits(tiny_model)) <= tol * np.abs(got).max()


@pytest.mark.reference
def test_gguf_written_by_mlx_lm_loads_with_the_same_logits(tmp_path):
    torch = pytest.importorskip("torch", reason="needs the 'reference' extra (torch)")
    transformers = pytest.importorskip("transformers", reason="needs the 'reference' extra")
    pytest.importorskip("mlx_lm", reason="needs the 'reference' extra (mlx-lm)")
    tokenizers = pytest.importorskip("tokenizers")
    from mlx_lm.gguf import convert_to_gguf

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
    transformers.LlamaForCausalLM(config).to(torch.float32).save_pretrained(tmp_path)
    vocab = {f"w{i}": i for i in range(256)}  # mlx-lm reads the vocabulary from tokenizer.json
    wordlevel = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=wordlevel, unk_token="w0", bos_token="w1", eos_token="w2"
    ).save_pretrained(tmp_path)
    text = [f"the quick brown fox jumps over the lazy dog {i} times" for i in range(100)]
    lc.train_tokenizer(text, 100, tmp_path / "tokenizer", byte_fallback=False)
    original, _ = lc.load(tmp_path)
    weights = dict(tree_flatten(original.parameters()))
    hf_config = {**original.args.to_hf_dict(), "rope_theta": 10000.0}
    convert_to_gguf(tmp_path, weights, hf_config, str(tmp_path / "mlx_lm.gguf"))
    model, _ = lc.load(tmp_path / "mlx_lm.gguf")
    assert err(logits(model), logits(original)) <= 1e-4
