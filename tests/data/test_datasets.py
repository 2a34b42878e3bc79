"""Datasets: every format, prompt masking token by token, chunking, dedup, truncation,
and every kind of bad data (exception type, file and line in the message)."""

import csv
import json
import random
import tempfile
import warnings
from pathlib import Path

from lora_course import DatasetError, TokenizedDataset, load_dataset, train_tokenizer
from lora_course.data.records import DatasetWarning

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

WORDS = (
    "the a of model layer token weight rank alpha train loss data batch user "
    "assistant system what is hello yes no def return x y"
).split()


def corpus(n=300, seed=0):
    rng = random.Random(seed)
    for i in range(n):
        yield " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice(".?!:")
        yield "    " * rng.randint(0, 2) + f"x_{i} = [{rng.randint(0, 99)}, 2]  # ok"


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    return train_tokenizer(corpus(), 400, tmp_path_factory.mktemp("tok") / "tiny")


def jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def load(path, tok, **kw):
    return load_dataset(path, tok, **kw).train


def text_of(tok, ids):
    """The exact text of some tokens from the middle of a sample (decode would drop a
    leading space, taking it for SentencePiece's dummy prefix)."""
    table = tok._piece_bytes()
    return b"".join(table[t] for t in ids).decode("utf-8")


def targets(tok, tokens, mask):
    """The text of the tokens that carry loss."""
    return text_of(tok, [t for t, m in zip(tokens, mask) if m])


# -- formats ----------------------------------------------------------------------------------


def test_text_jsonl(tok, tmp_path):
    texts = ["hello model", "  indented\n\tcode", "unicode café 🙂"]
    ds = load(jsonl(tmp_path / "d.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts)]), tok)
    assert isinstance(ds, TokenizedDataset) and len(ds) == 3 and ds.path == tmp_path / "d.jsonl"
    for i, t in enumerate(texts):
        tokens, mask = ds[i]
        assert tokens == tok.encode(t, bos=True, eos=True) and mask is None
        assert tok.decode(tokens) == t
    assert ds[-1] == ds[2] and list(ds)[0] == ds[0]
    assert ds.lengths.tolist() == [len(ds[i][0]) for i in range(3)]
    with pytest.raises(IndexError):
        ds[3]


def test_completion_jsonl_unmasked_is_plain_concatenation(tok, tmp_path):
    ds = load(
        jsonl(tmp_path / "c.jsonl", [{"prompt": "Q: what is rank?\nA:", "completion": " the rank"}]), tok
    )
    assert ds[0] == (tok.encode("Q: what is rank?\nA: the rank", eos=True), None)


def test_completion_mask_token_by_token(tok, tmp_path):
    prompt, completion = "Q: what is alpha?\nA:", " alpha is the weight"
    ds = load(
        jsonl(tmp_path / "c.jsonl", [{"prompt": prompt, "completion": completion}]), tok, mask_prompt=True
    )
    tokens, mask = ds[0]
    assert tokens == tok.encode(prompt + completion, eos=True) and len(mask) == len(tokens)
    # token j carries loss exactly when the text decoded up to j reaches past the prompt
    for j in range(1, len(tokens) - 1):
        reaches = len(tok.decode(tokens[1 : j + 1])) > len(prompt)
        assert mask[j] == int(reaches), (j, tok.id_to_piece(tokens[j]))
    assert mask[0] == 0 and mask[-1] == 1  # BOS never, EOS yes: the model learns to stop
    assert targets(tok, tokens, mask) == completion
    k = mask.index(1)
    assert mask == [0] * k + [1] * (len(mask) - k)  # the completion is one block at the end


def test_chat_default_format_and_mask(tok, tmp_path):
    msgs = [
        {"role": "system", "content": "be short"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "what is x?"},
        {"role": "assistant", "content": "x is data"},
    ]
    path = jsonl(tmp_path / "chat.jsonl", [{"messages": msgs}])
    plain = load(path, tok)
    text = "system: be short\nuser: hello\nassistant: yes\nuser: what is x?\nassistant: x is data\n"
    assert plain[0] == (tok.encode(text, eos=True), None)
    tokens, mask = load(path, tok, mask_prompt=True)[0]
    assert tokens == plain[0][0]
    # the loss-carrying tokens spell both assistant turns (with their newlines) and EOS
    pieces, run = [], []
    for t, m in zip(tokens, mask):
        if m:
            run.append(t)
        elif run:
            pieces.append(text_of(tok, run))
            run = []
    pieces.append(text_of(tok, run))
    assert pieces == [" yes\n", " x is data\n"]  # the space after "assistant:" rides along
    assert mask[-1] == 1 and mask[-2] == 1  # "\n" ending the turn, then EOS


def test_chat_ending_with_user_has_unmasked_eos(tok, tmp_path):
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "bye"},
    ]
    tokens, mask = load(jsonl(tmp_path / "c.jsonl", [{"messages": msgs}]), tok, mask_prompt=True)[0]
    assert tokens[-1] == tok.eos_id and mask[-1] == 0
    assert targets(tok, tokens, mask).strip() == "yes"


def test_chat_with_jinja_template(tok, tmp_path):
    from lora_course import Tokenizer

    template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
        "{{ m['content'] }} [/INST]{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}"
        "{% endfor %}"
    )
    t = Tokenizer(tok.path, chat_template=template)
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "yes"}]
    path = jsonl(tmp_path / "c.jsonl", [{"messages": msgs}])
    tokens, mask = load(path, t, mask_prompt=True)[0]
    assert tokens.count(t.bos_id) == 1 and tokens[0] == t.bos_id  # <s> in the text is BOS
    assert tokens.count(t.eos_id) == 1 and tokens[-1] == t.eos_id  # </s> is EOS, not doubled
    assert targets(t, tokens, mask).strip() == "yes" and mask[-1] == 1
    assert load(path, t)[0][0] == tokens  # same tokens without masking


def test_csv_column(tok, tmp_path):
    path = tmp_path / "d.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerows([["id", "body"], [1, "with, comma"], [], [2, "two\nlines"], [3, "  x  "]])
    ds = load(path, tok, text_column="body")
    assert [tok.decode(ds[i][0]) for i in range(len(ds))] == ["with, comma", "two\nlines", "  x  "]


def test_txt_file_lines_and_paragraphs(tok, tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first line\n  second\n\n\nthird\nfourth\n", encoding="utf-8")
    assert [tok.decode(t) for t, _ in load(path, tok)] == ["first line", "  second", "third", "fourth"]
    paras = load(path, tok, txt_mode="paragraph")
    assert [tok.decode(t) for t, _ in paras] == ["first line\n  second", "third\nfourth"]


def test_txt_folder_sorted_and_recursive(tok, tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee\n")
    (tmp_path / "a.txt").write_text("ay\n\nay two\n")
    (tmp_path / "sub" / "c.txt").write_text("sea")
    (tmp_path / "notes.md").write_text("ignored")
    splits = load_dataset(tmp_path, tok)
    assert [tok.decode(t) for t, _ in splits.train] == ["ay", "ay two", "bee", "sea"]
    assert splits.valid is None and splits.test is None and splits.train.path == tmp_path


def test_split_folder(tok, tmp_path):
    jsonl(tmp_path / "train.jsonl", [{"text": "a"}, {"text": "b"}])
    jsonl(tmp_path / "test.jsonl", [{"text": "c"}])
    train, valid, test = load_dataset(tmp_path, tok)
    assert (len(train), valid, len(test)) == (2, None, 1)
    assert test.path == tmp_path / "test.jsonl"


def test_no_eos(tok, tmp_path):
    ds = load(jsonl(tmp_path / "d.jsonl", [{"text": "hello"}]), tok, add_eos=False)
    assert ds[0][0] == tok.encode("hello", eos=False)


# -- chunking, dedup, truncation ----------------------------------------------------------------


def test_chunking(tok, tmp_path):
    text = " ".join(WORDS * 4)
    full = tok.encode(text, eos=True)
    ds = load(jsonl(tmp_path / "d.jsonl", [{"text": text}]), tok, chunk_tokens=16)
    chunks = [t for t, _ in ds]
    assert len(chunks) > 3 and all(len(c) <= 16 and c[0] == tok.bos_id for c in chunks)
    assert [c[-1] == tok.eos_id for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[0] + [t for c in chunks[1:] for t in c[1:]] == full  # nothing lost or added


def test_chunking_with_mask_drops_chunks_without_targets(tok, tmp_path):
    prompt, completion = " ".join(WORDS) + "\n", "yes"
    ds = load(
        jsonl(tmp_path / "d.jsonl", [{"prompt": prompt, "completion": completion}]),
        tok,
        mask_prompt=True,
        chunk_tokens=8,
    )
    assert len(ds) >= 1 and all(any(m[1:]) for _, m in ds)
    assert "yes" in "".join(targets(tok, t, m) for t, m in ds)


def test_dedup_keeps_first_occurrence_order(tok, tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"text": t} for t in ["b", "a", "b", "c", "a", "d"]])
    assert [tok.decode(t) for t, _ in load(path, tok, dedup=True)] == ["b", "a", "c", "d"]
    assert len(load(path, tok)) == 6


def test_truncation_warns_once_counting_cases(tok, tmp_path):
    long = " ".join(WORDS)
    jsonl(tmp_path / "train.jsonl", [{"text": long}, {"text": "ok"}, {"text": long}, {"text": long}])
    jsonl(tmp_path / "valid.jsonl", [{"text": long}])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train, valid, _ = load_dataset(tmp_path, tok, max_seq_length=12)
    caught = [w for w in caught if issubclass(w.category, DatasetWarning)]
    assert len(caught) == 1
    assert "truncated 4 samples" in str(caught[0].message)
    assert "train.jsonl: 3" in str(caught[0].message) and "valid.jsonl: 1" in str(caught[0].message)
    assert max(train.lengths) == 12 and train[0][0] == tok.encode(long)[:12]


def test_ten_megabyte_line_is_handled(tok, tmp_path):
    path = jsonl(tmp_path / "big.jsonl", [{"text": "hello world " * 870_000}])  # ~10 MB
    with pytest.warns(DatasetWarning, match="truncated 1 samples"):
        ds = load(path, tok, max_seq_length=64)
    assert ds.lengths.tolist() == [64]
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "' + "x" * 10_000_000 + "\n")
    with pytest.raises(DatasetError, match=r"broken\.jsonl:1: malformed JSON"):
        load(broken, tok)


# -- bad data ---------------------------------------------------------------------------------

BAD_JSONL = [
    # (file content, line, words the message must contain)
    ('{"text": "a"}\n{"text": "b"\n', 2, "malformed JSON"),
    ('{"text": "a"}\n\n{"text": "b"}\n', 2, "blank line"),
    ('{"text": "a"}\n   \n', 2, "blank line"),
    ('{"text": 5}\n', 1, "'text' must be a string, got int"),
    ('{"text": ""}\n', 1, "'text' is empty"),
    ('{"text": null}\n', 1, "got NoneType"),
    ('{"prompt": "a"}\n', 1, "missing field 'completion'"),
    ('{"completion": "a"}\n', 1, "missing field 'prompt'"),
    ('{"prompt": 1, "completion": "a"}\n', 1, "'prompt' must be a string"),
    ('{"prompt": "a", "completion": ""}\n', 1, "'completion' is empty"),
    ('{"text": "a"}\n{"prompt": "a", "completion": "b"}\n', 2, "mixed formats"),
    ('{"messages": [{"role": "user", "content": "a"}]}\n{"text": "a"}\n', 2, "mixed formats"),
    ('{"text": "a", "messages": []}\n', 1, "ambiguous"),
    ('{"body": "a"}\n', 1, "no 'text'"),
    ('["text", "a"]\n', 1, "expected a JSON object, got list"),
    ('{"messages": "hi"}\n', 1, "non-empty list"),
    ('{"messages": []}\n', 1, "non-empty list"),
    ('{"messages": [{"role": "user"}]}\n', 1, "messages[0] must be an object with 'role' and 'content'"),
    (
        '{"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]}\n',
        1,
        "messages[1] has unknown role 'tool'",
    ),
    ('{"messages": [{"role": "user", "content": ["a"]}]}\n', 1, "'content' must be a string"),
]


@pytest.mark.parametrize("content,line,words", BAD_JSONL)
def test_bad_jsonl(tok, tmp_path, content, line, words):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DatasetError) as e:
        load(path, tok)
    assert str(e.value).startswith(f"{path}:{line}: ") and words in str(e.value)
    assert (e.value.path, e.value.line) == (str(path), line)


def test_non_utf8_bytes(tok, tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DatasetError, match=r"latin1\.jsonl:2: not UTF-8 \(byte b'\\xe9' at column 14\)"):
        load(path, tok)
    txt = tmp_path / "x.txt"
    txt.write_bytes(b"fine\n\xff\xfe\n")
    with pytest.raises(DatasetError, match=r"x\.txt:2: not UTF-8"):
        load(txt, tok)


def test_utf8_bom_is_accepted(tok, tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "hi"}\n')
    assert load(path, tok)[0][0] == tok.encode("hi", eos=True)


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.csv", "empty.txt"])
def test_empty_files(tok, tmp_path, name):
    path = tmp_path / name
    path.write_text("")
    with pytest.raises(DatasetError, match=rf"{name}: empty file"):
        load(path, tok)


def test_txt_with_only_blank_lines_is_empty(tok, tmp_path):
    path = tmp_path / "blank.txt"
    path.write_text("\n  \n\n")
    with pytest.raises(DatasetError, match="blank.txt: empty file"):
        load(path, tok)


def test_mask_prompt_chat_without_assistant(tok, tmp_path):
    path = jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 2)
    assert len(load(path, tok)) == 2  # fine without masking
    with pytest.raises(DatasetError, match=r"c\.jsonl:1: no assistant message"):
        load(path, tok, mask_prompt=True)


def test_csv_errors(tok, tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("id,body\n1,hello\n")
    with pytest.raises(DatasetError, match=r"d\.csv:1: no column 'text' \(columns: id, body\)"):
        load(path, tok)
    path.write_text("id,text\n1,hello\n2\n")
    with pytest.raises(DatasetError, match=r"d\.csv:3: row has 1 cells"):
        load(path, tok)
    path.write_text('id,text\n1,hello\n"2",""\n')
    with pytest.raises(DatasetError, match=r"d\.csv:3: empty cell in column 'text'"):
        load(path, tok)
    path.write_text('text\nok\n"a"b\n')
    with pytest.raises(DatasetError, match=r"d\.csv:3: bad CSV \(',' expected after '\"'\)"):
        load(path, tok)
    path.write_text('text\nok\n"never closed\n\n')
    with pytest.raises(DatasetError, match=r"d\.csv:\d: bad CSV \(unexpected end of data\)"):
        load(path, tok)


def test_folder_errors(tok, tmp_path):
    with pytest.raises(DatasetError, match="no train.jsonl and no text in any .txt file"):
        load_dataset(tmp_path, tok)  # an empty txt folder
    (tmp_path / "a.txt").write_text("\n\n")
    with pytest.raises(DatasetError, match=str(tmp_path)):
        load_dataset(tmp_path, tok)
    jsonl(tmp_path / "valid.jsonl", [{"text": "a"}])
    with pytest.raises(DatasetError, match="no train.jsonl"):
        load_dataset(tmp_path, tok)


def test_bad_paths_and_options(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_dataset(tmp_path / "nope.jsonl", tok)
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(DatasetError, match=r"d\.parquet: unknown file type '.parquet'"):
        load_dataset(tmp_path / "d.parquet", tok)
    jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    for kw in [dict(txt_mode="word"), dict(chunk_tokens=1), dict(max_seq_length=0)]:
        with pytest.raises(ValueError):
            load_dataset(tmp_path / "d.jsonl", tok, **kw)


# -- property tests -------------------------------------------------------------------------------

TMP = Path(tempfile.mkdtemp(prefix="lora_course_data_"))
# "▁" (U+2581) is SentencePiece's own space symbol, so it cannot round-trip; leave it out.
chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581")
text_st = st.text(chars, min_size=1, max_size=30)
role_st = st.sampled_from(["system", "user", "assistant"])
BROKEN = ["malformed", "blank", "type", "role", "array", "other"]


@st.composite
def record(draw, shape):
    """(JSON line, error words or None, shape the loader sees or None)."""
    good = {
        "text": lambda: {"text": draw(text_st)},
        "completion": lambda: {"prompt": draw(st.text(chars, max_size=20)), "completion": draw(text_st)},
        "chat": lambda: {
            "messages": [
                {"role": draw(role_st), "content": draw(st.text(chars, max_size=20))}
                for _ in range(draw(st.integers(1, 3)))
            ]
        },
    }
    kind = draw(st.sampled_from(["ok"] * 18 + BROKEN))
    if kind == "ok":
        return json.dumps(good[shape](), ensure_ascii=draw(st.booleans())), None, shape
    if kind == "other":  # a valid record of another shape
        other = draw(st.sampled_from(sorted(set(good) - {shape})))
        return json.dumps(good[other]()), None, other
    if kind == "malformed":
        return json.dumps(good[shape]())[:-1], "malformed JSON", None
    if kind == "blank":
        return draw(st.sampled_from(["", " ", "\t"])), "blank line", None
    if kind == "array":
        return json.dumps([1, 2]), "expected a JSON object", None
    if kind == "type":
        return (
            json.dumps({"text": draw(st.integers() | st.none() | st.lists(st.integers()))}),
            "must be a string",
            "text",
        )
    role = draw(st.sampled_from(["tool", "bot", "User"]))
    return json.dumps({"messages": [{"role": role, "content": "x"}]}), "unknown role", "chat"


@st.composite
def jsonl_file(draw):
    shape = draw(st.sampled_from(["text", "completion", "chat"]))
    return draw(st.lists(record(shape), min_size=1, max_size=6))


def expected_text(tok, obj):
    if "text" in obj:
        return obj["text"]
    if "prompt" in obj:
        return obj["prompt"] + obj["completion"]
    return tok.apply_chat_template(obj["messages"])


def first_error(lines, mask_prompt):
    """What the documented rules say: (line, words) of the first bad line, or None."""
    file_shape = None
    for n, (line, err, shape) in enumerate(lines, 1):
        if shape is not None:
            file_shape = file_shape or shape
            if shape != file_shape:
                return n, "mixed formats"  # checked before the fields are
        if err:
            return n, err
        obj = json.loads(line)
        if mask_prompt and shape == "chat" and all(m["role"] != "assistant" for m in obj["messages"]):
            return n, "no assistant message"
    return None


@settings(max_examples=700, deadline=None)
@given(jsonl_file(), st.booleans())
def test_jsonl_loader_property(tok, lines, mask_prompt):
    """Valid files load to exactly the expected tokens and masks; broken ones raise the
    documented DatasetError at the first bad line; nothing else ever happens."""
    path = TMP / "p.jsonl"
    path.write_text("".join(line + "\n" for line, _, _ in lines), encoding="utf-8")
    error = first_error(lines, mask_prompt)
    event(f"error: {error[1]}" if error else f"valid, mask_prompt={mask_prompt}")
    if error:
        with pytest.raises(DatasetError) as e:
            load(path, tok, mask_prompt=mask_prompt)
        assert str(e.value).startswith(f"{path}:{error[0]}: ") and error[1] in str(e.value)
        return
    ds = load(path, tok, mask_prompt=mask_prompt, max_seq_length=10_000)
    objs = [json.loads(line) for line, _, _ in lines]
    assert len(ds) == len(objs)
    table = tok._piece_bytes()
    for (tokens, mask), obj in zip(ds, objs):
        assert tokens == tok.encode(expected_text(tok, obj), bos=True, eos=True)
        if not mask_prompt or "text" in obj:
            assert mask is None
            continue
        assert len(mask) == len(tokens) and mask[0] == 0
        if "completion" in obj:
            k = mask.index(1)  # one block of targets at the end, covering the completion
            assert mask == [0] * k + [1] * (len(mask) - k)
            targets = b"".join(table[t] for t in tokens[k:])
            assert targets.endswith(obj["completion"].encode())
            assert len(targets) - len(obj["completion"].encode()) < max(1, len(table[tokens[k]]))
        else:
            has_assistant = any(m["role"] == "assistant" for m in obj["messages"])
            assert any(mask[:-1]) == has_assistant
            assert mask[-1] == int(obj["messages"][-1]["role"] == "assistant")


@settings(max_examples=250, deadline=None)
@given(st.lists(st.text(chars, max_size=25), min_size=1, max_size=8))
def test_csv_loader_property(tok, texts):
    path = TMP / "p.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["text", "n"]] + [[t, i] for i, t in enumerate(texts)])
    if "" in texts:
        with pytest.raises(DatasetError, match=r"p\.csv:\d+: empty cell in column 'text'"):
            load(path, tok)
        return
    ds = load(path, tok, max_seq_length=10_000)
    assert [tok.decode(t) for t, _ in ds] == texts


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.sampled_from(["a b", "model", "  x = 1", "rank alpha"] + WORDS), min_size=1, max_size=12),
    st.integers(2, 9),
    st.booleans(),
)
def test_chunk_dedup_property(tok, words, chunk, dedup):
    texts = [" ".join(words[i:]) for i in range(len(words))] + [" ".join(words)]
    path = TMP / "c.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    ds = load(path, tok, chunk_tokens=chunk, dedup=dedup)
    samples = [tuple(t) for t, _ in ds]
    assert all(len(s) <= chunk and s[0] == tok.bos_id for s in samples)
    if dedup:
        assert len(samples) == len(set(samples))
    else:  # every text ends in exactly one chunk with EOS, and no tokens are lost
        assert sum(s[-1] == tok.eos_id for s in samples) == len(texts)
        assert sum(len(s) for s in samples) - len(samples) == sum(
            len(tok.encode(t, eos=True)) - 1 for t in texts
        )
