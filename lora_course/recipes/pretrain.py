"""Pretraining the course's base model from scratch: ``lora-course pretrain``.

The model shipped in ``lora_course/assets/base/`` was made by this file, on two CPU
cores, from nothing but the documentation installed on the machine:

1. ``corpus.build_corpus``: docstrings of the standard library, numpy, matplotlib,
   PyYAML and tqdm (mlx held out), split into train and valid documents.
2. ``train_tokenizer``: a SentencePiece BPE vocabulary learned on the train documents.
3. Packing: every document becomes ``<bos> text <eos>``, all of them are joined into
   one long stream and cut into windows of ``seq_length + 1`` tokens (each token is a
   target exactly once). No padding, so every position of every batch carries loss.
4. A Llama ``Model`` (Touvron et al., 2023) with MLX's default initialization,
   trained by the library's own ``trainer.train`` with AdamW (Loshchilov & Hutter,
   2019), linear warmup and cosine decay. Every parameter is trained. (GPT-2's
   initialization, Radford et al., 2019, is available as ``init="gpt2"``; with tied
   embeddings its N(0, 0.02) output layer starts too timid for a run this short:
   held-out loss 6.25 vs 5.25 after the same 150 toy steps. Notebook 12 shows both.)
5. Held-out loss and perplexity on the valid windows, a few generations, the curve.

Taught in notebook 12 ("pretraining the course's base model").
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from lora_course import atomic
from lora_course.checkpoint.files import CHECKPOINT_FILES
from lora_course.checkpoint.save import save
from lora_course.data.corpus import (
    DEFAULT_PACKAGES,
    HELD_OUT,
    build_corpus,
    save_corpus,
)
from lora_course.model.args import ModelArgs
from lora_course.model.generate import generate
from lora_course.model.transformer import Model
from lora_course.tokenizer.train import train_tokenizer
from lora_course.training.args import TrainingArgs
from lora_course.training.evaluate import evaluate
from lora_course.training.plots import (
    finish_axes,
    new_figure,
    plot_train_loss,
    save_png,
)
from lora_course.training.trainer import train
from lora_course.tree import tree_flatten

import mlx.core as mx

LOG_FILE = "training_log.json"
CURVE_FILE = "training_curve.png"
# Prompts for the sample generations recorded in the log (names the corpus lacks).
SAMPLE_PROMPTS = (
    "statistics.trimmed_mean(data, proportion=0.1)\n\n",
    "numpy.rolling_sum(a, window, axis=-1)\n\n",
    "collections.RingBuffer(maxlen)\n\n",
)


@dataclass
class PretrainConfig:
    # -- model (a Llama; tied embeddings keep the file small)
    dim: int = 256  # residual width
    n_layers: int = 6  # transformer blocks
    n_heads: int = 4  # query heads (head_dim = dim / n_heads = 64)
    n_kv_heads: int = 2  # key/value heads: grouped-query attention, 2 query heads per K/V head
    hidden_dim: int = 512  # SwiGLU inner width
    vocab_size: int = 4096  # SentencePiece BPE pieces, 256 byte-fallback pieces included
    seq_length: int = 256  # tokens per training window (also recorded as the context length)
    rope_theta: float = 10000.0  # RoPE base
    # -- corpus
    packages: tuple[str, ...] = DEFAULT_PACKAGES  # what to read ("stdlib" = the standard library)
    valid_fraction: float = 0.05  # share of documents held out for perplexity
    max_documents: int | None = None  # keep only the first N documents (tests, quick looks)
    # -- optimization
    iters: int = 800  # optimizer steps
    batch_size: int = 8  # windows per step (batch_size * seq_length tokens)
    learning_rate: float = 1e-3  # peak AdamW learning rate
    min_learning_rate: float = 1e-4  # where the cosine decay ends
    warmup: int = 50  # linear warmup steps
    weight_decay: float = 0.1  # AdamW decoupled weight decay
    grad_clip: float = 1.0  # clip the global gradient norm
    init: str = "mlx"  # "mlx": MLX's default initialization; "gpt2": init_weights (N(0, 0.02))
    steps_per_eval: int = 100  # validate every N steps (on val_batches batches)
    val_batches: int = 10  # batches per intermediate validation; the final one uses all
    seed: int = 0  # corpus split, initialization and data order

    def __post_init__(self):
        if self.init not in ("mlx", "gpt2"):
            raise ValueError(f"pretrain: init={self.init!r}; choose 'mlx' or 'gpt2'")
        for key in (
            "dim",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "hidden_dim",
            "vocab_size",
            "seq_length",
            "iters",
            "batch_size",
        ):
            if getattr(self, key) < 1:
                raise ValueError(f"pretrain: {key}={getattr(self, key)} must be at least 1")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PretrainConfig:
        """Build from a dict (e.g. a training log's "config"); unknown keys are ignored."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if "packages" in kw:
            kw["packages"] = tuple(kw["packages"])
        return cls(**kw)

    def model_args(self, vocab_size: int | None = None) -> ModelArgs:
        return ModelArgs(
            dim=self.dim,
            n_layers=self.n_layers,
            hidden_dim=self.hidden_dim,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            vocab_size=vocab_size or self.vocab_size,
            rope_theta=self.rope_theta,
            tie_word_embeddings=True,
            max_position_embeddings=self.seq_length,
            model_type="llama",
        )


# ----------------------------------------------------------------------------- data


def pack(documents, tokenizer, seq_length: int) -> list[list[int]]:
    """Token windows of length ``seq_length + 1``: ``<bos> doc <eos> <bos> doc ...`` cut
    every ``seq_length`` tokens, so consecutive windows share one token and every token
    after the first is a target exactly once. The ragged tail is dropped."""
    stream = []
    for doc in documents:
        stream += tokenizer.encode(doc, bos=True, eos=True)
    n = (len(stream) - 1) // seq_length
    return [stream[i * seq_length : (i + 1) * seq_length + 1] for i in range(n)]


# ----------------------------------------------------------------------------- model


def init_weights(model: Model, std: float = 0.02) -> None:
    """GPT-2 initialization, in place: every weight matrix ~ N(0, std), the projections
    that write into the residual stream (o_proj, down_proj) ~ N(0, std / sqrt(2 L)) so
    the stream's variance does not grow with depth; norms stay at 1."""
    residual_std = std / math.sqrt(2 * len(model.layers))
    new = []
    for name, w in tree_flatten(model.parameters()):
        if name.endswith("norm.weight"):
            continue
        s = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
        new.append((name, mx.random.normal(w.shape) * s))
    model.load_weights(new, strict=False)
    mx.eval(model.parameters())


def count_params(model) -> int:
    return sum(v.size for _, v in tree_flatten(model.parameters()))


# ----------------------------------------------------------------------------- the run


def pretrain(
    config: PretrainConfig | None = None,
    out: str | os.PathLike = "base-model",
    corpus_dir: str | os.PathLike | None = None,
    progress: bool = True,
    verbose: bool = True,
) -> dict:
    """Build the corpus and tokenizer, train a model from scratch and save it to ``out``.

    ``out`` receives ``config.json``, ``model.safetensors`` (float32), ``tokenizer.model``,
    ``training_log.json`` and ``training_curve.png``; ``lora_course.load(out)`` loads it.
    Returns the training log (also in ``training_log.json``).
    """

    cfg = config or PretrainConfig()
    say = print if verbose else (lambda *a, **k: None)
    out = Path(out)
    _check_out(out)
    t0 = time.perf_counter()
    timings = {}

    corpus = build_corpus(cfg.packages, cfg.valid_fraction, cfg.seed)
    if cfg.max_documents:
        corpus.train = corpus.train[: cfg.max_documents]
        corpus.valid = corpus.valid[: max(1, int(cfg.max_documents * cfg.valid_fraction))]
    if corpus_dir is not None:
        save_corpus(corpus, corpus_dir)
    timings["corpus_s"] = time.perf_counter() - t0
    say(
        f"corpus: {len(corpus.train)} train / {len(corpus.valid)} valid documents, "
        f"{sum(map(len, corpus.train)) / 1e6:.2f}M train characters ({timings['corpus_s']:.1f}s)"
    )

    tic = time.perf_counter()
    tokenizer = train_tokenizer(corpus.train, cfg.vocab_size, None, max_sentence_length=1 << 16)
    train_set = pack(corpus.train, tokenizer, cfg.seq_length)
    valid_set = pack(corpus.valid, tokenizer, cfg.seq_length)
    timings["tokenizer_s"] = time.perf_counter() - tic
    n_train_tokens = len(train_set) * cfg.seq_length
    say(
        f"tokenizer: {tokenizer.vocab_size} pieces; {n_train_tokens / 1e6:.2f}M train tokens in "
        f"{len(train_set)} windows, {len(valid_set)} valid windows ({timings['tokenizer_s']:.1f}s)"
    )
    if len(valid_set) == 0:
        raise ValueError(
            "pretrain: the valid split is shorter than one window; raise valid_fraction or lower seq_length"
        )

    mx.random.seed(cfg.seed)
    model = Model(cfg.model_args(tokenizer.vocab_size))  # MLX's init: U(+-1/sqrt(fan_in)), N(0, 1/dim)
    if cfg.init == "gpt2":
        init_weights(model)
    mx.eval(model.parameters())
    n_params = count_params(model)
    say(f"model: {n_params:,} parameters ({n_params * 4 / 2**20:.1f} MiB in float32)")

    work = Path(tempfile.mkdtemp(prefix=".pretrain-", dir=out.parent if out.parent.exists() else None))
    args = TrainingArgs(
        iters=cfg.iters,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        lr_schedule="cosine",
        warmup=min(cfg.warmup, cfg.iters),
        min_learning_rate=cfg.min_learning_rate,
        optimizer="adamw",
        weight_decay=cfg.weight_decay,
        grad_clip=cfg.grad_clip,
        max_seq_length=cfg.seq_length + 1,
        steps_per_report=max(1, min(50, cfg.iters)),
        steps_per_eval=cfg.steps_per_eval,
        val_batches=cfg.val_batches,
        save_every=0,
        adapter_path=str(work),
        seed=cfg.seed,
    )
    tic = time.perf_counter()
    try:
        history = train(model, train_set, valid_set, args, progress=progress, verbose=verbose)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    timings["train_s"] = time.perf_counter() - tic

    val_loss, val_ppl = evaluate(model, valid_set, cfg.batch_size, -1, cfg.seq_length + 1)
    say(
        f"held-out: loss {val_loss:.4f}, perplexity {val_ppl:.2f} "
        f"over {len(valid_set) * cfg.seq_length} tokens"
    )

    samples = [
        {"prompt": p, "completion": generate(model, tokenizer, p, max_tokens=60, temp=0.0)}
        for p in SAMPLE_PROMPTS
    ]
    for s in samples:
        say(f"--- {s['prompt']!r}\n{s['prompt']}{s['completion']}")
    timings["total_s"] = time.perf_counter() - t0

    log = {
        "config": {**asdict(cfg), "packages": list(cfg.packages)},
        "held_out_packages": list(HELD_OUT),
        "corpus": corpus.stats,
        "parameters": n_params,
        "dtype": "float32",
        "train_windows": len(train_set),
        "train_tokens": n_train_tokens,
        "tokens_seen": cfg.iters * cfg.batch_size * cfg.seq_length,
        "valid_tokens": len(valid_set) * cfg.seq_length,
        "train_loss": [round(x, 4) for x in history.losses],
        "evals": [{"step": e["step"], "val_loss": round(e["val_loss"], 4)} for e in history.evals],
        "final_val_loss": round(val_loss, 4),
        "final_val_perplexity": round(val_ppl, 2),
        "samples": samples,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "versions": _versions(),
    }
    for name in (LOG_FILE, CURVE_FILE):  # ours; save() keeps only checkpoint files in `out`
        (out / name).unlink(missing_ok=True)
    save(model, tokenizer, out)
    atomic.write_text(out / LOG_FILE, json.dumps(log, indent=1) + "\n")
    plot_curve(log, out / CURVE_FILE)
    say(f"saved {out}/ in {timings['total_s'] / 60:.1f} min")
    return log


def _check_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        stray = [
            p.name
            for p in out.iterdir()
            if p.is_dir() or not (CHECKPOINT_FILES.match(p.name) or p.name in (LOG_FILE, CURVE_FILE))
        ]
        if stray:
            raise ValueError(
                f"pretrain: {out} holds '{stray[0]}', which pretrain did not write; "
                "choose a new or empty --out directory"
            )


def _versions() -> dict:
    import importlib.metadata as md

    v = {"python": platform.python_version(), "mlx": mx.__version__}
    for name in ("numpy", "matplotlib", "pyyaml", "tqdm", "sentencepiece"):
        try:
            v[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return v


def plot_curve(log: dict, path, ax=None):
    """Train loss per step (light), its moving average, and validation loss (dots)."""
    fig = None
    if ax is None:
        fig, ax = new_figure()
    plot_train_loss(ax, log["train_loss"], points=40)
    ev = log["evals"]
    ax.plot([e["step"] for e in ev], [e["val_loss"] for e in ev], "o-", color="tab:orange", label="held-out")
    finish_axes(
        ax,
        f"pretraining: {log['parameters'] / 1e6:.1f}M parameters, "
        f"final held-out perplexity {log['final_val_perplexity']:.1f}",
    )
    if fig is not None and path is not None:
        save_png(fig, path)
    return ax
