"""HFTokenizer (tokenizer.json) against transformers, load_tokenizer, and GGUF tokenizer metadata."""

import json
import shutil
import time

import lora_course as lc  # noqa: F401  (BLAS before mlx)
from lora_course.tokenizer.base import TokenizerError
from lora_course.tokenizer.gguf import tokenizer_from_gguf, tokenizer_to_gguf
from lora_course.tokenizer.hf import HFTokenizer
from lora_course.tokenizer.load import load_tokenizer
from lora_course.tokenizer.spm import Tokenizer
from lora_course.tokenizer.train import train_tokenizer

import mlx.core as mx
import numpy as np
import pytest
from tiny_tokenizers import TEXTS, llama3_folder, qwen2_folder, sentencepiece_folder

BUILDERS = {"llama3": llama3_folder, "qwen2": qwen2_folder, "sentencepiece": sentencepiece_folder}
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi 😀 日本"},
    {"role": "assistant", "content": "  hello\n\tthere"},
    {"role": "user", "content": "more"},
]
MORE = TEXTS + ["<|eot_id|> x <|im_end|>", "<s>hi</s>", "a\r\nb \u00a0c"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    pytest.importorskip("transformers", reason="the SentencePiece builder converts with transformers")
    root = tmp_path_factory.mktemp("toks")
    return {name: build(root / name) for name, build in BUILDERS.items()}


@pytest.fixture(scope="module", params=list(BUILDERS))
def pair(request, folders):
    """(HFTokenizer, transformers.AutoTokenizer) for one tiny checkpoint folder."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    folder = folders[request.param]
    return HFTokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)


@pytest.mark.reference
def test_encode_decode_match_transformers(pair):
    ours, theirs = pair
    for text in MORE:
        ids = theirs(text).input_ids
        assert ours.encode(text) == ids, text
        assert ours.encode_batch([text, text]) == [ids, ids]
        assert ours.decode(ids) == theirs.decode(ids), text


@pytest.mark.reference
@pytest.mark.parametrize("prompt", [False, True])
def test_chat_template_matches_transformers(pair, prompt):
    ours, theirs = pair
    for messages in (MESSAGES, MESSAGES[1:2]):
        expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        assert ours.apply_chat_template(messages, add_generation_prompt=prompt) == expected


def test_special_tokens_and_policy(folders):
    llama, qwen, sp = (HFTokenizer(folders[k]) for k in BUILDERS)
    bos, end, eot = (
        llama.backend.token_to_id(t) for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")
    )
    assert (llama.bos_id, llama.eos_id, llama.eos_ids, llama.pad_id) == (bos, eot, (eot, end), eot)
    assert llama.encode("hi")[0] == bos and llama.encode("hi", bos=False)[0] != bos
    assert llama.encode("hi", eos=True)[-1] == eot
    assert qwen.bos_id is None and qwen.encode("hi", bos=True) == qwen.encode("hi")  # no BOS to add
    assert qwen.pad_id == qwen.backend.token_to_id("<|endoftext|>") and qwen.eos_ids == (qwen.eos_id,)
    assert sp.encode("hi")[0] == sp.bos_id == 1 and sp.eos_ids == (2,)
    assert sp.vocab_size == 400 and sp.id_to_piece(1) == "<s>"


def test_sentencepiece_tokenizer_has_eos_ids():
    tok = train_tokenizer(["hello world"] * 50, 280, None)
    assert tok.eos_ids == (tok.eos_id,) == (2,)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_streaming_never_splits_a_character(folders, name):
    tok = HFTokenizer(folders[name])
    for text in ["emoji 😀🎉👩\u200d👩\u200d👧 ✨", "日本語のテキスト、中文文本。", "mixed ñ 😀 end\n"]:
        ids = tok.encode(text)
        for at_start in (True, False):
            detok = tok.detokenizer(at_start=at_start)
            pieces = [detok.add(i) for i in ids]
            assert all("\ufffd" not in p for p in pieces)
            if at_start:
                assert "".join(pieces) + detok.finalize() == tok.decode(ids)
    detok = tok.detokenizer()
    half = tok.encode("😀", bos=False)[:1]  # a lone first byte piece (when the emoji is split)
    if len(tok.encode("😀", bos=False)) > 1:
        assert detok.add(half[0]) == "" and detok.finalize() == tok.decode(half)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_offsets_are_byte_spans(folders, name):
    tok = HFTokenizer(folders[name])
    for text in TEXTS:
        ids, starts, ends = tok.encode_with_offsets(text)
        raw = text.encode("utf-8")
        assert len(ids) == len(starts) == len(ends) and ids[len(tok.added_around[0]) :] == tok.encode(
            text, bos=False, eos=False
        )
        assert np.all(starts <= ends) and np.all(ends <= len(raw)) and np.all(np.diff(starts) >= 0)
        covered = np.zeros(len(raw), bool)  # every byte belongs to some token; pieces of one
        for s, e in zip(starts, ends):  # character (or a prepended "▁") share its span
            covered[s:e] = True
        assert covered.all()


def test_offsets_parse_special_tokens_only_when_asked(folders):
    tok = HFTokenizer(folders["llama3"])
    text = "<|begin_of_text|>hi<|eot_id|>"
    ids, starts, ends = tok.encode_with_offsets(text, special=True)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1 and ids[-1] == tok.eos_id
    assert (starts[-1], ends[-1]) == (len(text) - len("<|eot_id|>"), len(text))
    literal, _, _ = tok.encode_with_offsets(text)
    assert tok.eos_id not in literal and literal.count(tok.bos_id) == 1
    batch = tok.encode_batch_with_offsets([text, "x"], eos=True, special=True)
    assert batch[0][0][-1] == tok.eos_id and batch[1][0][-1] == tok.eos_id and batch[1][2][-1] == 1


@pytest.mark.parametrize("name", list(BUILDERS))
def test_save_round_trips(folders, name, tmp_path):
    tok = HFTokenizer(folders[name])
    tok.save(tmp_path)
    back = load_tokenizer(tmp_path)
    assert isinstance(back, HFTokenizer)
    assert [back.encode(t) for t in MORE] == [tok.encode(t) for t in MORE]
    assert (back.bos_id, back.eos_id, back.eos_ids, back.pad_id) == (
        tok.bos_id,
        tok.eos_id,
        tok.eos_ids,
        tok.pad_id,
    )
    assert back.apply_chat_template(MESSAGES, True) == tok.apply_chat_template(MESSAGES, True)


def test_load_tokenizer_dispatch(folders, tmp_path):
    assert isinstance(load_tokenizer(folders["qwen2"]), HFTokenizer)
    train_tokenizer(["hello world"] * 50, 280, tmp_path / "sp" / "tokenizer")
    assert isinstance(load_tokenizer(tmp_path / "sp"), Tokenizer)
    shutil.copy(folders["qwen2"] / "tokenizer.json", tmp_path / "sp")  # both: tokenizer.json wins
    assert isinstance(load_tokenizer(tmp_path / "sp"), HFTokenizer)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="empty: no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path / "empty")


def test_checkpoint_load_reads_tokenizer_json(folders, tmp_path):
    args = lc.ModelArgs(dim=32, n_layers=1, hidden_dim=64, n_heads=2, n_kv_heads=1, vocab_size=512)
    lc.save(lc.Model(args), HFTokenizer(folders["llama3"]), tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "tokenizer.model").exists()
    model, tok = lc.load(tmp_path / "ckpt")
    assert isinstance(tok, HFTokenizer) and tok.eos_ids == HFTokenizer(folders["llama3"]).eos_ids
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["eos_token_id"] == list(tok.eos_ids)


def test_generation_stops_at_every_eos_id(folders, tiny_model):
    from lora_course.model.generate import stop_ids, until_eos

    tok = HFTokenizer(folders["llama3"])
    stop = stop_ids(tok)
    assert stop == set(tok.eos_ids) and len(stop) == 2
    for eos in tok.eos_ids:
        assert list(until_eos([5, 6, eos, 7], stop)) == [5, 6]


def _folder_with(src, tmp_path, name, text):
    dst = tmp_path / "bad"
    shutil.copytree(src, dst)
    (dst / name).write_text(text, encoding="utf-8")
    return dst


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("tokenizer.json", "{not json", r"bad/tokenizer.json: not a Hugging Face tokenizer.json"),
        (
            "tokenizer.json",
            '{"model": {"type": "BPE", "vocab": 3}}',
            r"bad/tokenizer.json: not a Hugging Face",
        ),
        ("tokenizer_config.json", '{"bos_token": 7}', r"bad/tokenizer_config.json: key 'bos_token' must be"),
        (
            "tokenizer_config.json",
            '{"eos_token": "<nope>"}',
            r"tokenizer_config.json: eos_token '<nope>' is not",
        ),
        ("tokenizer_config.json", '{"chat_template": 3}', r"tokenizer_config.json: key 'chat_template' must"),
        ("tokenizer_config.json", "[1]", r"tokenizer_config.json: expected a JSON object"),
        (
            "generation_config.json",
            '{"eos_token_id": "x"}',
            r"generation_config.json: key 'eos_token_id' must",
        ),
    ],
)
def test_bad_files_name_the_file_and_key(folders, tmp_path, name, text, match):
    with pytest.raises(TokenizerError, match=match) as e:
        HFTokenizer(_folder_with(folders["llama3"], tmp_path, name, text))
    assert "\n" not in str(e.value)


def test_named_templates_and_jinja_file(folders, tmp_path):
    config = json.loads((folders["llama3"] / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    folder = _folder_with(folders["llama3"], tmp_path, "tokenizer_config.json", json.dumps(config))
    assert HFTokenizer(folder).apply_chat_template(MESSAGES) == "D"
    (folder / "chat_template.jinja").write_text("J{{ eos_token }}")
    assert HFTokenizer(folder).apply_chat_template(MESSAGES) == "J<|eot_id|>"


@pytest.mark.parametrize(
    "template, match",
    [
        ("{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}", "ran longer than"),
        (
            "{% for a in range(99999) %}{% for b in range(99999) %}xxxxxxxxxxxx{% endfor %}{% endfor %}",
            "ran longer|more than",
        ),
        ("{{ 'x' * 10**9 }}", "too many|too large"),
        ("{{ raise_exception('no system role') }}", "no system role"),
        ("{{ ''.__class__ }}{{ ''.__class__.__mro__[1].__subclasses__() }}", "chat template"),
        ("{% for %}", r"chat template \(line 1\)"),
    ],
)
def test_hostile_templates_fail_fast_naming_the_file(folders, tmp_path, template, match):
    folder = _folder_with(folders["qwen2"], tmp_path, "chat_template.jinja", template)
    start = time.monotonic()
    with pytest.raises(TokenizerError, match=match) as e:
        HFTokenizer(folder).apply_chat_template(MESSAGES)
    assert time.monotonic() - start < 5
    assert "bad/chat_template.jinja" in str(e.value) and "\n" not in str(e.value)


# -- GGUF ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUILDERS))
def test_gguf_round_trip_through_a_file(folders, name, tmp_path):
    tok = HFTokenizer(folders[name])
    meta = tokenizer_to_gguf(tok)
    assert meta["tokenizer.ggml.model"] == ("llama" if name == "sentencepiece" else "gpt2")
    mx.save_gguf(str(tmp_path / "t.gguf"), {"x": mx.zeros(1)}, meta)
    _, read = mx.load(str(tmp_path / "t.gguf"), return_metadata=True)
    back = tokenizer_from_gguf(read)
    assert [back.encode(t) for t in MORE] == [tok.encode(t) for t in MORE]
    assert [back.decode(tok.encode(t)) for t in MORE] == [tok.decode(tok.encode(t)) for t in MORE]
    assert (back.bos_id, back.eos_id) == (tok.bos_id, tok.eos_id)
    assert back.apply_chat_template(MESSAGES, True) == tok.apply_chat_template(MESSAGES, True)


def test_gguf_metadata_follows_llama_cpp_conventions(folders, tmp_path):
    gguf = pytest.importorskip("gguf")
    tok = HFTokenizer(folders["llama3"])
    mx.save_gguf(str(tmp_path / "t.gguf"), {"x": mx.zeros(1)}, tokenizer_to_gguf(tok))
    fields = gguf.GGUFReader(tmp_path / "t.gguf").fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert tokens[tok.eos_id] == "<|eot_id|>" and len(tokens) == tok.vocab_size
    types = fields["tokenizer.ggml.token_type"]
    assert types.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
    assert (
        types.contents()[tok.bos_id] == gguf.TokenType.CONTROL
        and types.contents()[300] == gguf.TokenType.NORMAL
    )
    assert fields["tokenizer.ggml.bos_token_id"].types == [gguf.GGUFValueType.UINT32]
    assert fields["tokenizer.ggml.pre"].contents() == "llama-bpe"
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert " " in fields["tokenizer.ggml.merges"].contents()[0]


@pytest.mark.parametrize(
    "change, match",
    [
        ({"tokenizer.ggml.model": "rwkv"}, "tokenizer.ggml.model 'rwkv' is not supported"),
        ({"tokenizer.ggml.pre": "deepseek-llm"}, "tokenizer.ggml.pre 'deepseek-llm' is not supported"),
        ({"tokenizer.ggml.tokens": "abc"}, "key 'tokenizer.ggml.tokens' must be strs"),
        ({"tokenizer.ggml.bos_token_id": mx.array(10**6)}, "bos_token_id 1000000 is outside"),
    ],
)
def test_gguf_bad_metadata_is_one_line(folders, change, match):
    meta = {**tokenizer_to_gguf(HFTokenizer(folders["llama3"])), **change}
    with pytest.raises(TokenizerError, match=match):
        tokenizer_from_gguf(meta)
