"""``lora-course quickstart``: LoRA-fine-tune the course model on mlx's docstrings, offline.

The whole course in one command. The embedded base model (``lora_course/assets/base``)
was pretrained on the documentation of Python's standard library and numpy but never
saw mlx; the docstrings of the installed ``mlx`` become a Q/A dataset (the MLX LoRA example's
idea, ``build_docstring_dataset``), and LoRA (Hu et al., 2021) teaches the model about
mlx in a couple of minutes on a laptop CPU. Before and after fine-tuning it measures the
held-out (test split) loss and perplexity and answers a few held-out questions, and
prints them side by side. It writes the adapters, a loss-curve PNG and ``results.json``
into ``--out``.

Every flag points somewhere else: ``--model`` any local Llama/Mistral checkpoint,
``--data`` any dataset folder that ``load_dataset`` reads, ``--packages`` other
packages' docstrings. Built on ``lora_course.recipes.finetune``. Taught in notebook 13.
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from lora_course.checkpoint.load import load
from lora_course.data.datasets import TokenizedDataset, load_dataset
from lora_course.data.docstrings import build_docstring_dataset
from lora_course.data.records import DatasetWarning
from lora_course.model.generate import generate
from lora_course.recipes.finetune import finetune
from lora_course.training.evaluate import evaluate
from lora_course.training.plots import (
    finish_axes,
    new_figure,
    plot_train_loss,
    save_png,
)

import mlx.core as mx

RESULTS_FILE = "results.json"
CURVE_FILE = "loss_curve.png"


@dataclass
class QuickstartConfig:
    model: str | None = None  # checkpoint directory; None: the embedded course model
    data: str | None = None  # dataset folder (train.jsonl, valid/test.jsonl); None: build from --packages
    out: str = "lora-course-quickstart"  # where adapters, the curve and results.json go
    packages: tuple[str, ...] = ("mlx",)  # whose docstrings make the dataset when --data is not given
    iters: int = 150  # optimizer steps (about 2 minutes on 2 CPU cores)
    batch_size: int = 8  # samples per step
    learning_rate: float = (
        1e-3  # peak LoRA learning rate (cosine decay after a short warmup; 2e-3 is unstable)
    )
    rank: int = 16  # LoRA rank r
    alpha: float = 32.0  # LoRA alpha; the update is scaled by alpha / r
    num_layers: int = -1  # adapt the last N blocks; -1: all of them
    max_seq_length: int = 256  # longer samples are truncated (the course model saw 256-token windows)
    seed: int = 0  # dataset split, LoRA init and data order
    max_samples: int | None = None  # use only the first N training samples (and N/4 held-out ones)
    questions: int = 3  # held-out questions answered before and after
    answer_tokens: int = 32  # greedy tokens per answer

    @classmethod
    def from_dict(cls, d: dict) -> QuickstartConfig:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if kw.get("packages") is not None:
            kw["packages"] = tuple(kw["packages"])
        return cls(**kw)


def _subset(ds, n: int | None):

    if ds is None or n is None or n >= len(ds):
        return ds
    return TokenizedDataset([ds[i] for i in range(n)], path=ds.path)


def _questions(folder: Path, n: int) -> list[tuple[str, str]]:
    """(prompt, reference answer) for the first n held-out records that have a Q/A shape."""
    for split in ("test", "valid"):
        path = folder / f"{split}.jsonl"
        if path.is_file():
            break
    else:
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        text = rec.get("text") if isinstance(rec, dict) else None
        if isinstance(text, str) and "\nA:" in text:
            q, a = text.split("\nA:", 1)
            out.append((q + "\nA:", a.strip()))
        elif isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
            out.append((rec["prompt"], str(rec.get("completion", "")).strip()))
        if len(out) == n:
            break
    return out


def _answers(model, tokenizer, questions, max_tokens: int) -> list[str]:

    return [generate(model, tokenizer, q, max_tokens=max_tokens, temp=0.0).strip() for q, _ in questions]


def quickstart(config: QuickstartConfig | None = None, progress: bool = True, verbose: bool = True) -> dict:
    """Run the quickstart; returns what it printed as a dict (also in ``results.json``)."""

    cfg = config or QuickstartConfig()
    say = print if verbose else (lambda *a, **k: None)
    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    # 1. data
    if cfg.data is None:
        data_dir = out / "data"
        counts = build_docstring_dataset(list(cfg.packages), data_dir, seed=cfg.seed)
        say(
            f"data: {counts['train']} train / {counts['valid']} valid / {counts['test']} test Q/A records "
            f"from the docstrings of {', '.join(cfg.packages)} -> {data_dir}/"
        )
    else:
        data_dir = Path(cfg.data)
        if not data_dir.is_dir():
            raise FileNotFoundError(
                f"--data {data_dir}: not a folder; give a folder with train.jsonl "
                "and valid.jsonl or test.jsonl"
            )

    # 2. model and the "before" numbers
    model, tokenizer = load(cfg.model)
    if mx.default_device() == mx.cpu:
        model.set_dtype(mx.float32)  # MLX's CPU matmuls are fast in float32 only
    with warnings.catch_warnings(record=True) as caught:  # one short line instead of the long warning
        warnings.simplefilter("always", DatasetWarning)
        splits = load_dataset(data_dir, tokenizer, max_seq_length=cfg.max_seq_length)
    for w in caught:
        if issubclass(w.category, DatasetWarning):
            say(f"note: {str(w.message).split(' (')[0]}")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    held = splits.test if splits.test is not None else splits.valid
    if held is None:
        raise ValueError(f"{data_dir}: has no valid.jsonl or test.jsonl to measure held-out loss on")
    n_held = None if cfg.max_samples is None else max(cfg.batch_size, cfg.max_samples // 4)
    train_set, held = _subset(splits.train, cfg.max_samples), _subset(held, n_held)
    questions = _questions(data_dir, cfg.questions)
    before_loss, before_ppl = evaluate(model, held, cfg.batch_size, -1, cfg.max_seq_length)
    before_answers = _answers(model, tokenizer, questions, cfg.answer_tokens)
    say(f"model: {cfg.model or 'the course base model'}; held-out loss before fine-tuning {before_loss:.3f}")

    # 3. LoRA fine-tuning
    tic = time.perf_counter()
    result = finetune(
        model=model,
        tokenizer=tokenizer,
        data=(train_set, None),
        adapter_path=str(out / "adapters"),
        fine_tune_type="lora",
        rank=cfg.rank,
        alpha=cfg.alpha,
        num_layers=cfg.num_layers,
        iters=cfg.iters,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        lr_schedule="cosine",
        warmup=min(10, cfg.iters),
        optimizer="adam",
        grad_clip=1.0,
        max_seq_length=cfg.max_seq_length,
        steps_per_report=max(1, cfg.iters // 4),
        steps_per_eval=0,
        save_every=0,
        seed=cfg.seed,
        progress=progress,
        verbose=False,
    )
    train_s = time.perf_counter() - tic
    model = result.model

    # 4. the "after" numbers
    after_loss, after_ppl = evaluate(model, held, cfg.batch_size, -1, cfg.max_seq_length)
    after_answers = _answers(model, tokenizer, questions, cfg.answer_tokens)
    total_s = time.perf_counter() - t0

    losses = list(result.history.losses)
    results = {
        "config": {**asdict(cfg), "packages": list(cfg.packages)},
        "held_out_split": Path(held.path).name if held.path else None,
        "held_out_samples": len(held),
        "train_samples": len(train_set),
        "before": {"loss": before_loss, "perplexity": before_ppl},
        "after": {"loss": after_loss, "perplexity": after_ppl},
        "loss_reduction": 1.0 - after_loss / before_loss,
        "questions": [
            {"question": q, "reference": ref, "before": b, "after": a}
            for (q, ref), b, a in zip(questions, before_answers, after_answers)
        ],
        "train_loss": [round(x, 4) for x in losses],
        "adapter_path": str(result.adapter_path),
        "train_seconds": round(train_s, 1),
        "total_seconds": round(total_s, 1),
    }
    plot_losses(results, out / CURVE_FILE)
    tmp = out / f".{RESULTS_FILE}.tmp"
    tmp.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / RESULTS_FILE)
    say(report(results))
    return results


def report(results: dict) -> str:
    """The before/after table and the answers side by side, as printed."""
    b, a = results["before"], results["after"]
    lines = [
        "",
        f"{'held-out (' + str(results['held_out_split']) + ')':<22}{'before':>10}{'after':>10}{'change':>10}",
        f"{'loss':<22}{b['loss']:>10.3f}{a['loss']:>10.3f}{-results['loss_reduction']:>+10.1%}",
        f"{'perplexity':<22}{b['perplexity']:>10.2f}{a['perplexity']:>10.2f}"
        f"{a['perplexity'] / b['perplexity'] - 1:>+10.1%}",
        "",
    ]
    width = max(20, (shutil.get_terminal_size((100, 24)).columns - 7) // 2)
    width = min(width, 46)
    for qa in results["questions"]:
        lines.append(qa["question"].replace("\nA:", ""))
        left = textwrap.wrap(_flat(qa["before"]) or "(nothing)", width)[:4]
        right = textwrap.wrap(_flat(qa["after"]) or "(nothing)", width)[:4]
        lines.append(f"  {'before':<{width}} | after")
        for i in range(max(len(left), len(right))):
            before = left[i] if i < len(left) else ""
            after = right[i] if i < len(right) else ""
            lines.append(f"  {before:<{width}} | {after}")
        lines.append("")
    lines.append(
        f"adapters: {results['adapter_path']}/   curve: {CURVE_FILE}   "
        f"time: {results['total_seconds']:.0f}s (training {results['train_seconds']:.0f}s)"
    )
    return "\n".join(lines)


def _flat(text: str) -> str:
    return " ".join(text.split())


def plot_losses(results: dict, path=None, ax=None):
    """Train loss per step, with the held-out loss before and after as two markers."""
    fig = None
    if ax is None:
        fig, ax = new_figure()
    plot_train_loss(ax, results["train_loss"], points=20, alpha=0.3)
    ax.plot([0], [results["before"]["loss"]], "o", color="tab:red", ms=8, label="held-out loss before")
    ax.plot(
        [len(results["train_loss"])],
        [results["after"]["loss"]],
        "o",
        color="tab:green",
        ms=8,
        label="held-out loss after",
    )
    finish_axes(ax, f"LoRA fine-tuning: held-out loss {results['loss_reduction']:.0%} lower")
    if fig is not None and path is not None:
        save_png(fig, path)
    return ax
