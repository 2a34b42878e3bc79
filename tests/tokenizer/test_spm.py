"""Tokenizer: exact round trips, special ids, offsets, chat templates, errors, saving."""

import json
import random

from lora_course import Tokenizer, train_tokenizer
from lora_course.tokenizer.base import TokenizerError

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

WORDS = (
    "the a of model layer token weight rank alpha train loss data batch "
    "def return import self x y for in range if else print"
).split()


def corpus(n=300, seed=0):
    """A few KB of prose-like and code-like lines with indentation and digits."""
    rng = random.Random(seed)
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        yield words.capitalize() + rng.choice([".", "!", "?", ","])
        yield "    " * rng.randint(0, 3) + f"x_{i} = f({rng.randint(0, 999)}) + [1, 2]  # {words}"


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    return train_tokenizer(corpus(), 400, tmp_path_factory.mktemp("tok") / "tiny")


TRICKY = [
    "",
    " ",
    "hello world",
    "  two leading spaces",
    "trailing spaces   ",
    "a  b   c    d",
    "\n",
    "\n\nblank lines\n\n\n",
    "\ttab\tseparated\t",
    "def f(x):\n    if x:\n        return x ** 2\n    return 0\n",
    "windows\r\nline\r\nends",
    "unicode: café naïve Ελληνικά 日本語 🙂🚀",
    "digits 1234567890 and 3.14159",
    '{"json": [1, 2, {"k": null}]}',
]


@pytest.mark.parametrize("s", TRICKY)
def test_round_trip_tricky_strings(tok, s):
    ids = tok.encode(s, bos=False)
    assert tok.decode(ids) == s
    assert tok.decode(tok.encode(s, bos=True, eos=True)) == s  # specials decode to nothing


def test_ids_in_range_and_specials(tok):
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (400, 1, 2)
    assert tok.pad_id == tok.eos_id  # no pad piece: falls back to eos (documented)
    for s in TRICKY:
        ids = tok.encode(s, bos=True, eos=True)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.bos_id not in ids[1:-1] and tok.eos_id not in ids[1:-1]
    assert tok.encode("hi", bos=False, eos=False) == tok.encode("hi")[1:]
    assert tok.encode_batch(TRICKY, eos=True) == [tok.encode(s, eos=True) for s in TRICKY]


def test_encode_is_deterministic_and_compresses(tok):
    text = "the model layer weight rank"
    assert tok.encode(text) == tok.encode(text)
    assert len(tok.encode(text, bos=False)) < len(text)  # BPE merged something


def test_not_sentencepiece_is_a_clear_error(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_text('{"model": {"type": "BPE"}}')
    with pytest.raises(TokenizerError, match=r"tokenizer\.model: not a SentencePiece model"):
        Tokenizer(bad)
    assert issubclass(TokenizerError, ValueError)
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    with pytest.raises(TokenizerError, match="empty.model"):
        Tokenizer(empty)


def test_missing_and_hf_only_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerError, match="tokenizer.json but no tokenizer.model"):
        Tokenizer(tmp_path)


def test_save_and_reload(tok, tmp_path):
    path = tok.save(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tokenizer.model"]
    again = Tokenizer(tmp_path / "out")  # a folder works as well as the file
    assert again.path == path and again.chat_template is None
    for s in TRICKY:
        assert again.encode(s) == tok.encode(s)


def test_offsets_cover_the_text_exactly(tok):
    for s in TRICKY + ["<s>user: hi</s>"]:
        raw = s.encode()
        ids, starts, ends = tok.encode_with_offsets(s, bos=True, eos=True)
        assert ids == tok.encode(s, bos=True, eos=True)
        assert (starts[0], ends[0], starts[-1], ends[-1]) == (0, 0, len(raw), len(raw))
        assert b"".join(raw[a:b] for a, b in zip(starts, ends)) == raw
        assert all(ends[:-1] <= starts[1:])  # in order, no overlap


def test_offsets_parse_special_pieces(tok):
    ids, starts, ends = tok.encode_with_offsets("<s>hi</s>", bos=True, special=True)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1  # bos not doubled
    assert ids[-1] == tok.eos_id and (starts[-1], ends[-1]) == (5, 9)
    plain, _, _ = tok.encode_with_offsets("<s>hi</s>", bos=False)
    assert tok.eos_id not in plain  # without special=True it is literal text


def test_default_chat_format(tok):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ]
    assert tok.apply_chat_template(msgs) == "system: Be brief.\nuser: Hi\nassistant: Hello.\n"
    assert tok.apply_chat_template(msgs[:2], add_generation_prompt=True).endswith("user: Hi\nassistant: ")


def test_jinja_chat_template_saved_and_read(tok, tmp_path):
    template = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    t = Tokenizer(tok.path, chat_template=template)
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    assert t.apply_chat_template(msgs) == "<s>[user] Hi[assistant] Yo</s>"
    assert t.apply_chat_template(msgs[:1], True) == "<s>[user] Hi[assistant] "
    t.save(tmp_path / "a")
    assert Tokenizer(tmp_path / "a").chat_template == template
    # Hugging Face keeps it in tokenizer_config.json
    (tmp_path / "b").mkdir()
    tok.save(tmp_path / "b")
    (tmp_path / "b" / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    assert Tokenizer(tmp_path / "b").chat_template == template


def test_chat_template_cannot_reach_python(tok):
    t = Tokenizer(tok.path, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(Exception, match="unsafe|access"):
        t.apply_chat_template([{"role": "user", "content": "x"}])


def test_streaming_detokenizer_matches_decode(tok):
    for s in TRICKY:
        ids = tok.encode(s, bos=True, eos=True)
        d = tok.detokenizer()
        pieces = [d.add(i) for i in ids]
        assert "".join(pieces) + d.finalize() == tok.decode(ids)
    # a 4-byte emoji made of byte-fallback pieces appears only when complete
    ids = tok.encode("🚀", bos=False)
    d = tok.detokenizer()
    assert [d.add(i) for i in ids][-1].endswith("🚀")


def test_train_from_files_and_prefix(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("\n".join(corpus(100)), encoding="utf-8")
    t1 = train_tokenizer(f, 380, tmp_path / "m1")
    t2 = train_tokenizer([str(f)], 380, tmp_path / "m2")
    assert (tmp_path / "m1.model").is_file() and t1.path == tmp_path / "m1.model"
    assert t1.encode("the model") == t2.encode("the model")
    assert not list(tmp_path.glob(".*"))  # atomic writes leave no temporary behind
    t3 = train_tokenizer(corpus(100), 380, None)  # in memory only
    assert t3.path is None and t3.encode("x = 1") == t1.encode("x = 1")


def test_train_errors_are_readable():
    with pytest.raises(ValueError, match="Vocabulary size is smaller than required_chars"):
        train_tokenizer(corpus(20), 50, None)


# Printable text: letters, digits, punctuation, symbols, spaces, tabs, newlines.
# "▁" (U+2581) is excluded: SentencePiece uses it to mean a space.
printable = st.text(
    st.one_of(
        st.sampled_from(" \t\n  "),
        st.characters(whitelist_categories=("L", "N", "P", "S", "Zs"), blacklist_characters="\u2581"),
    ),
    max_size=60,
)


@settings(max_examples=400, deadline=None)
@given(printable)
def test_round_trip_property(tok, s):
    ids = tok.encode(s, bos=True, eos=True)
    assert tok.decode(ids) == s
    assert all(0 <= i < tok.vocab_size for i in ids)
    d = tok.detokenizer()
    assert "".join(d.add(i) for i in ids) + d.finalize() == s
