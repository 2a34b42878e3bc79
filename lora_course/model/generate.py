"""Text generation: temperature / top-k / top-p sampling and a KV-cached decode loop.

Sampling follows the usual recipe: divide the logits by a temperature, keep the
``top_k`` most likely tokens (Fan et al., 2018, "Hierarchical Neural Story
Generation"), then the smallest set whose probability reaches ``top_p`` (nucleus
sampling; Holtzman et al., 2020, "The Curious Case of Neural Text Degeneration"), and
draw from what is left. ``temp=0`` is greedy decoding.

Decoding runs the prompt through the model once (prefill; every prompt token but the
last only fills the KV cache, so the output head runs once), then one token at a
time with the KV cache. While Python hands token ``t`` to the caller, ``mx.async_eval``
is already computing token ``t + 1``, so the model never waits for the loop.

Taught in notebook 04 (checkpoints, tokenizers and sampling).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from lora_course import limits
from lora_course.model.transformer import make_cache

import mlx.core as mx

PREFILL_STEP = 512  # prompt tokens per forward pass while filling the cache


SHORT_PROMPT = 16  # prompts up to this long are processed in a single call


def filter_logits(logits: mx.array, temp: float = 1.0, top_p: float = 1.0, top_k: int = 0) -> mx.array:
    """Logits (..., V) rescaled by ``1/temp``, with tokens outside top-k / top-p set to -inf.

    ``softmax`` of the result is the distribution :func:`sample` draws from.
    """
    if temp <= 0:
        raise ValueError(f"filter_logits: temp must be > 0 (temp=0 means greedy), got {temp}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits = logits.astype(mx.float32) / temp
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:  # keep values >= the k-th largest (ties may keep a few more)
        kth = mx.min(mx.topk(logits, top_k, axis=-1), axis=-1, keepdims=True)
        logits = mx.where(logits >= kth, logits, -mx.inf)
    if top_p < 1.0:
        order = mx.argsort(-logits, axis=-1)  # most likely first
        probs = mx.softmax(mx.take_along_axis(logits, order, axis=-1), axis=-1)
        before = mx.cumsum(probs, axis=-1) - probs  # probability mass ranked above each token
        keep_sorted = before < top_p  # the first token is always kept
        keep = mx.take_along_axis(keep_sorted, mx.argsort(order, axis=-1), axis=-1)
        logits = mx.where(keep, logits, -mx.inf)
    return logits


def sample(
    logits: mx.array, temp: float = 0.0, top_p: float = 1.0, top_k: int = 0, key: mx.array | None = None
) -> mx.array:
    """Draw one token id per row of ``logits`` (..., V) -> (...,). ``temp=0``: argmax."""
    if temp == 0:
        return mx.argmax(logits, axis=-1)
    return mx.random.categorical(filter_logits(logits, temp, top_p, top_k), axis=-1, key=key)


def check_sampling(max_tokens, temp, top_p, top_k, seed, names=None) -> None:
    """Refuse settings that would sample garbage or be silently ignored. ``names`` maps a
    parameter to how the caller spells it (``{"top_p": "--top-p"}``)."""
    name = lambda key: (names or {}).get(key, key)  # noqa: E731
    problems = [
        (limits.is_int(max_tokens) and max_tokens >= 1, "max_tokens", "an integer >= 1", max_tokens),
        (limits.is_number(temp) and temp >= 0, "temp", "a finite number >= 0 (0: greedy)", temp),
        (limits.is_number(top_p) and 0 < top_p <= 1, "top_p", "a number in (0, 1] (1: off)", top_p),
        (limits.is_int(top_k) and top_k >= 0, "top_k", "an integer >= 0 (0: off)", top_k),
        (
            seed is None or (limits.is_int(seed) and 0 <= seed <= limits.MAX_SEED),
            "seed",
            "an integer >= 0",
            seed,
        ),
    ]
    for ok, key, want, value in problems:
        if not ok:
            raise ValueError(f"generate: {name(key)} must be {want}, got {repr(value)[:60]}")


def check_prompt(prompt, vocab_size: int | None) -> list[int]:
    """The prompt as a list of ints, each a valid index into the embedding. MLX does not
    bounds-check that lookup: an id past the vocabulary reads garbage or crashes."""
    try:
        ids = [int(t) for t in prompt]
        if any(i != t for i, t in zip(ids, prompt)):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise ValueError("generate: the prompt must be a list of integer token ids") from None
    if not ids:
        raise ValueError("generate: the prompt is empty (encode it with bos=True, or give some text)")
    bad = next((i for i in ids if i < 0 or (vocab_size is not None and i >= vocab_size)), None)
    if bad is not None:
        raise ValueError(
            f"generate: prompt token id {bad} is outside the model's vocabulary "
            f"[0, {vocab_size}); was it encoded with another model's tokenizer?"
        )
    return ids


def generate_tokens(
    model,
    prompt: list[int],
    max_tokens: int = 100,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
) -> Iterator[int]:
    """Yield up to ``max_tokens`` new token ids after ``prompt`` (a list of ids).

    The arguments are checked when it is called, before the first token is asked for.
    """
    check_sampling(max_tokens, temp, top_p, top_k, seed)
    prompt = check_prompt(prompt, getattr(getattr(model, "args", None), "vocab_size", None))
    return _decode(model, prompt, max_tokens, temp, top_p, top_k, seed)


def _decode(
    model, prompt: list[int], max_tokens: int, temp: float, top_p: float, top_k: int, seed
) -> Iterator[int]:
    cache = make_cache(model)
    key = mx.random.key(seed) if seed is not None else None

    def step(tokens: mx.array) -> mx.array:  # (1, L) -> next token, shape (1,)
        nonlocal key
        logits = model(tokens, cache=cache)[:, -1, :]  # (1, V)
        sub = None
        if key is not None and temp > 0:
            key, sub = mx.random.split(key)
        return sample(logits, temp, top_p, top_k, sub)

    tokens = mx.array(prompt, dtype=mx.int32)
    # All but the last prompt token only fill the cache, so the output head runs once; a short
    # prompt goes in one call (the head over a few tokens costs less than another call).
    while tokens.size > SHORT_PROMPT:
        chunk = min(PREFILL_STEP, tokens.size - 1)
        model(tokens[None, :chunk], cache=cache)
        mx.eval([(c.keys, c.values) for c in cache])  # the output head (logits) is never computed
        tokens = tokens[chunk:]
    y = step(tokens[None])  # the last prompt token gives the first new token
    mx.async_eval(y)
    for n in range(1, max_tokens + 1):
        if n < max_tokens:
            next_y = step(y[None])  # queue token n+1 before waiting for token n
            mx.async_eval(next_y)
        yield y.item()
        if n < max_tokens:
            y = next_y


class DiffDetokenizer:
    """Fallback for tokenizers without ``detokenizer()``: decode everything, emit the new suffix."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.text = tokenizer, [], ""

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.text):
            return ""  # an incomplete multi-byte character: wait for its last byte
        piece, self.text = text[len(self.text) :], text
        return piece

    def finalize(self) -> str:
        text = self.tokenizer.decode(self.ids)
        return text[len(self.text) :] if text.startswith(self.text) else ""


def detokenize(tokenizer, token_ids: Iterable[int], at_start: bool) -> Iterator[str]:
    """Text pieces for a stream of ids, each yielded once it decodes to whole characters."""
    if hasattr(tokenizer, "detokenizer"):
        detok = tokenizer.detokenizer(at_start=at_start)
    else:
        detok = DiffDetokenizer(tokenizer)
    for t in token_ids:
        piece = detok.add(t)
        if piece:
            yield piece
    tail = detok.finalize()
    if tail:
        yield tail


def prompt_ids(tokenizer, prompt) -> list[int]:
    return tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]


def stop_ids(tokenizer) -> frozenset[int]:
    """Ids that end a generation: every one in ``eos_ids`` (Llama 3 declares several)."""
    ids = getattr(tokenizer, "eos_ids", None)
    if ids is None:  # a tokenizer-like object with only eos_id
        ids = () if tokenizer.eos_id is None else (tokenizer.eos_id,)
    return frozenset(ids)


def until_eos(token_ids: Iterable[int], stop: frozenset[int]) -> Iterator[int]:
    for t in token_ids:
        if t in stop:
            return
        yield t


def stream_generate(
    model,
    tokenizer,
    prompt,
    max_tokens: int = 100,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
) -> Iterator[str]:
    """Yield the continuation of ``prompt`` (text, or a list of ids) piece by piece.

    Stops after ``max_tokens`` tokens or at any of ``tokenizer.eos_ids`` (not yielded).
    """
    vocab = getattr(getattr(model, "args", None), "vocab_size", None)
    if vocab is not None and getattr(tokenizer, "vocab_size", 0) > vocab:  # any tokenizer kind
        raise ValueError(
            f"generate: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
            f"vocab_size is {vocab}; this tokenizer belongs to another model"
        )
    ids = prompt_ids(tokenizer, prompt)
    tokens = generate_tokens(model, ids, max_tokens, temp, top_p, top_k, seed)
    at_start = tokenizer.decode(ids) == ""  # nothing before us: drop SentencePiece's dummy space
    yield from detokenize(tokenizer, until_eos(tokens, stop_ids(tokenizer)), at_start)


def generate(
    model,
    tokenizer,
    prompt,
    max_tokens: int = 100,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
) -> str:
    """The continuation of ``prompt`` as one string (see :func:`stream_generate`)."""
    return "".join(stream_generate(model, tokenizer, prompt, max_tokens, temp, top_p, top_k, seed))
