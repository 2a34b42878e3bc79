"""A tokenizer in GGUF metadata (llama.cpp's file format), read and written as plain dicts.

A GGUF file carries its tokenizer as key/value metadata rather than a tokenizer.json:
``tokenizer.ggml.model`` names the algorithm, ``tokenizer.ggml.tokens`` lists every
piece by id, ``tokenizer.ggml.token_type`` marks each one (1 normal, 2 unknown,
3 control, 4 user-defined, 5 unused, 6 byte), ``tokenizer.ggml.merges`` holds byte-level
BPE merges ("gpt2") and ``tokenizer.ggml.scores`` SentencePiece scores ("llama"; a piece
with a higher score is merged first). ``tokenizer.ggml.pre`` names the pre-tokenizer
regex. ``tokenizer_from_gguf`` builds an ``HFTokenizer`` from what ``mx.load(path,
return_metadata=True)`` returns; ``tokenizer_to_gguf`` is its inverse, for ``mx.save_gguf``.
Taught in notebook 04 (checkpoints, tokenizers and sampling).
"""

from __future__ import annotations

import json

from lora_course.tokenizer.base import TokenizerError
from lora_course.tokenizer.hf import HFTokenizer
from lora_course.tokenizer.spm import Tokenizer

import mlx.core as mx
import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as RustTokenizer

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # SentencePiece's "▁"
# The pre-tokenizer regexes llama.cpp knows by name: (regex, ignore_merges, NFC first).
PRE = {
    "llama-bpe": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
        r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        True,
        False,
    ),
    "qwen2": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
        r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        False,
        True,
    ),
    "gpt2": (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+", False, False),
}
PRE["default"] = PRE["gpt2"]


def _get(meta: dict, key: str, kind: str, default=None):
    """``meta[key]`` as a Python value of ``kind`` (mx.load gives mx.array for numbers)."""
    if key not in meta:
        return default
    value = meta[key]
    if kind == "str":
        ok = isinstance(value, str)
    elif kind == "strs":
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        value = list(value) if ok else value
    else:
        try:
            arr = np.asarray(value)
        except (TypeError, ValueError):
            arr = np.asarray(object)
        ok = arr.dtype.kind in ("iub" if kind in ("int", "ints", "bool") else "iuf")
        ok = ok and arr.ndim == (0 if kind in ("int", "bool") else 1)
        value = arr.tolist() if ok else value
        value = bool(value) if ok and kind == "bool" else value
    if not ok:
        raise TokenizerError(f"GGUF metadata: key {key!r} must be {kind}, got {type(value).__name__}")
    return value


def tokenizer_from_gguf(meta: dict) -> HFTokenizer:
    """An ``HFTokenizer`` from GGUF metadata ("gpt2": byte-level BPE; "llama": SentencePiece)."""
    kind = _get(meta, "tokenizer.ggml.model", "str")
    if kind not in ("gpt2", "llama"):
        raise TokenizerError(
            f"GGUF metadata: tokenizer.ggml.model {kind!r} is not supported; "
            "lora_course reads 'gpt2' (byte-level BPE) and 'llama' (SentencePiece)"
        )
    tokens = _get(meta, "tokenizer.ggml.tokens", "strs")
    if not tokens:
        raise TokenizerError("GGUF metadata: key 'tokenizer.ggml.tokens' is missing or empty")
    types = _get(meta, "tokenizer.ggml.token_type", "ints", [NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise TokenizerError(
            f"GGUF metadata: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens"
        )
    vocab = {t: i for i, t in enumerate(tokens)}
    ids = {k: _get(meta, f"tokenizer.ggml.{k}_token_id", "int") for k in ("bos", "eos", "unknown", "padding")}
    for k, i in ids.items():
        if i is not None and not 0 <= i < len(tokens):
            raise TokenizerError(
                f"GGUF metadata: tokenizer.ggml.{k}_token_id {i} is outside the {len(tokens)} tokens"
            )
    if kind == "gpt2":
        tok = _byte_level(meta, vocab)
    else:
        tok = _sentencepiece(meta, tokens, types, vocab, ids["unknown"])
    # Control and user-defined pieces are matched whole in the text, before the model runs.
    tok.add_tokens(
        [
            AddedToken(tokens[i], special=types[i] == CONTROL, normalized=False)
            for i in range(len(tokens))
            if types[i] in (CONTROL, USER_DEFINED)
        ]
    )
    add_bos = _get(meta, "tokenizer.ggml.add_bos_token", "bool", kind == "llama")
    add_eos = _get(meta, "tokenizer.ggml.add_eos_token", "bool", False)
    head = [ids["bos"]] if add_bos and ids["bos"] is not None else []
    tail = [ids["eos"]] if add_eos and ids["eos"] is not None else []
    single = " ".join([tokens[i] for i in head] + ["$A"] + [tokens[i] for i in tail])
    pair = " ".join([single] + [tokens[i] for i in head] + ["$B:1"] + [tokens[i] for i in tail])
    special = [(tokens[i], i) for i in dict.fromkeys(head + tail)]
    steps = [processors.ByteLevel(trim_offsets=False)] if kind == "gpt2" else []
    tok.post_processor = processors.Sequence(
        steps + [processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)]
    )
    names = {"bos": "bos_token", "eos": "eos_token", "unknown": "unk_token", "padding": "pad_token"}
    config = {names[k]: tokens[i] for k, i in ids.items() if i is not None}
    return HFTokenizer.from_tokenizer(tok, config, {}, _get(meta, "tokenizer.chat_template", "str"))


def _byte_level(meta: dict, vocab: dict) -> RustTokenizer:
    pre = _get(meta, "tokenizer.ggml.pre", "str", "default")
    if pre not in PRE:
        raise TokenizerError(
            f"GGUF metadata: tokenizer.ggml.pre {pre!r} is not supported; "
            f"lora_course knows {', '.join(sorted(PRE))}"
        )
    regex, ignore_merges, nfc = PRE[pre]
    merges = [tuple(m.split(" ", 1)) for m in _get(meta, "tokenizer.ggml.merges", "strs", [])]
    if any(len(m) != 2 for m in merges):
        raise TokenizerError("GGUF metadata: every tokenizer.ggml.merges entry must be 'left right'")
    tok = RustTokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(meta: dict, tokens: list, types: list, vocab: dict, unk: int | None) -> RustTokenizer:
    """SentencePiece BPE as a tokenizers BPE: a pair is merged if the joined piece exists,
    and a piece with a higher score is merged first (merges ranked by that score)."""
    scores = _get(meta, "tokenizer.ggml.scores", "floats")
    if scores is None or len(scores) != len(tokens):
        raise TokenizerError("GGUF metadata: key 'tokenizer.ggml.scores' must hold one score per token")
    normal = {t for t, k in zip(tokens, types) if k == NORMAL}
    merges = []
    for i in sorted(range(len(tokens)), key=lambda i: (-scores[i], i)):
        piece = tokens[i]
        if types[i] == NORMAL and len(piece) > 1:
            merges += [
                (piece[:k], piece[k:])
                for k in range(1, len(piece))
                if piece[:k] in normal and piece[k:] in normal
            ]
    tok = RustTokenizer(
        models.BPE(
            vocab,
            merges,
            unk_token=None if unk is None else tokens[unk],
            fuse_unk=True,
            byte_fallback=BYTE in types,
        )
    )
    prefix = _get(meta, "tokenizer.ggml.add_space_prefix", "bool", True)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        SPACE, prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


def spm_to_gguf(tok: Tokenizer) -> dict:
    """A SentencePiece model as llama.cpp's "llama" vocabulary: pieces, scores and types."""
    sp, n = tok.sp, tok.vocab_size
    kinds = [
        UNKNOWN
        if sp.is_unknown(i)
        else CONTROL
        if sp.is_control(i)
        else BYTE
        if sp.is_byte(i)
        else UNUSED
        if sp.is_unused(i)
        else NORMAL
        for i in range(n)
    ]
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": mx.array([sp.get_score(i) for i in range(n)], dtype=mx.float32),
        "tokenizer.ggml.token_type": mx.array(kinds, dtype=mx.int32),
        # SentencePiece's dummy prefix: "a" encodes as "▁a" when the model adds one
        "tokenizer.ggml.add_space_prefix": mx.array(sp.encode("a", out_type=str)[0].startswith(SPACE)),
        "tokenizer.ggml.add_bos_token": mx.array(tok.bos_id is not None),
        "tokenizer.ggml.add_eos_token": mx.array(False),
    }
    for key, i in (("bos", tok.bos_id), ("eos", tok.eos_id), ("unknown", sp.unk_id())):
        if i is not None and i >= 0:
            meta[f"tokenizer.ggml.{key}_token_id"] = mx.array(i, dtype=mx.uint32)
    if tok.chat_template is not None:
        meta["tokenizer.chat_template"] = tok.chat_template
    return meta


def tokenizer_to_gguf(tok: HFTokenizer | Tokenizer) -> dict:
    """GGUF metadata for ``tok``, in llama.cpp's keys, ready for ``mx.save_gguf``."""
    if isinstance(tok, Tokenizer):
        return spm_to_gguf(tok)
    spec = json.loads(tok.backend.to_str())
    model, pre = spec.get("model") or {}, json.dumps(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE":
        raise TokenizerError(
            f"tokenizer_to_gguf: a {model.get('type')} model has no GGUF form here; "
            "lora_course writes BPE tokenizers only"
        )
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise TokenizerError("tokenizer_to_gguf: the token ids are not 0..n-1 without gaps")
    added = {a["content"]: a for a in spec.get("added_tokens", [])}
    byte_level = '"ByteLevel"' in pre
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    types = []
    for t in tokens:
        if t in added:
            types.append(CONTROL if added[t]["special"] else USER_DEFINED)
        elif t == model.get("unk_token"):
            types.append(UNKNOWN)
        elif not byte_level and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types.append(BYTE)
        else:
            types.append(NORMAL)
    meta = {
        "tokenizer.ggml.model": "gpt2" if byte_level else "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": mx.array(types, dtype=mx.int32),
    }
    if byte_level:
        name = next((n for n, (regex, *_) in PRE.items() if json.dumps(regex)[1:-1] in pre), None)
        if name is None:
            raise TokenizerError(
                "tokenizer_to_gguf: the pre-tokenizer regex is not one llama.cpp "
                f"names ({', '.join(sorted(PRE))})"
            )
        meta["tokenizer.ggml.pre"] = name
        meta["tokenizer.ggml.merges"] = merges
    else:  # the piece a merge makes scores by the merge's rank: earlier merges score higher
        rank = {}
        for r, m in enumerate(merges):
            rank.setdefault(m.replace(" ", ""), r)
        meta["tokenizer.ggml.scores"] = mx.array(
            [-float(rank.get(t, len(merges) + i)) for i, t in enumerate(tokens)], dtype=mx.float32
        )
        meta["tokenizer.ggml.add_space_prefix"] = mx.array(
            '"prepend_scheme":"never"' not in pre.replace(" ", "")
        )
    for key, i in (
        ("bos", tok.bos_id),
        ("eos", tok.eos_id),
        ("unknown", tok.special_id("unk_token")),
        ("padding", tok.special_id("pad_token")),
    ):
        if i is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = mx.array(i, dtype=mx.uint32)
    meta["tokenizer.ggml.add_bos_token"] = mx.array(
        tok.bos_id is not None and tok.added_around[0] == [tok.bos_id]
    )
    meta["tokenizer.ggml.add_eos_token"] = mx.array(
        tok.eos_id is not None and tok.added_around[1] == [tok.eos_id]
    )
    if tok.chat_template is not None:
        meta["tokenizer.chat_template"] = tok.chat_template
    return meta
