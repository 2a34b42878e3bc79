"""``lora-course quickstart``: LoRA-fine-tune the course model on mlx's docstrings, offline.

The whole course in one command. The embedded base model (``lora_course/assets/base``)
was pretrained on the documentation of Python's standard library and numpy but never
saw mlx; the docstrings of the installed ``mlx`` become a Q/A dataset (the MLX LoRA
example's idea, ``build_docstring_dataset``): "Q: What is ReLU in mlx?" answered by
"mlx.nn.ReLU Applies the Rectified Linear Unit.", the name and the first sentence of
its docstring. LoRA (Hu et al., 2021) trains on the first ``train_records`` records of
the training split for a couple of minutes on a laptop CPU.

Before and after, it asks two kinds of question, greedy decoding:

- **seen**: questions whose answers were in the training records. Can LoRA teach the
  model these facts?
- **held out**: questions from the test split, never trained on. Does the style
  generalise?

An answer counts as right when it reproduces the reference answer (the full name and
the docstring's first sentence), compared with whitespace collapsed and case ignored
(``is_right``). It also measures the held-out (test split) loss and perplexity. It
writes the adapters, a loss-curve PNG and ``results.json`` into ``--out``.

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
METRIC = (
    "right = the greedy answer reproduces the reference answer, the full name and the first "
    "sentence of its docstring (whitespace collapsed, case ignored)"
)
CURVE_FILE = "loss_curve.png"


@dataclass
class QuickstartConfig:
    model: str | None = None  # checkpoint directory; None: the embedded course model
    data: str | None = None  # dataset folder (train.jsonl, valid/test.jsonl); None: build from --packages
    out: str = "lora-course-quickstart"  # where adapters, the curve and results.json go
    packages: tuple[str, ...] = ("mlx",)  # whose docstrings make the dataset when --data is not given
    answer: str = "summary"  # dataset answers: "summary" (name + first sentence) or "docstring"
    mask_prompt: bool = True  # loss on the answers only (the dataset is written as prompt/completion)
    train_records: int | None = 96  # train on the first N records of the training split; None or 0: all
    iters: int = 400  # optimizer steps (about 2 minutes on 2 CPU cores)
    batch_size: int = 8  # samples per step
    learning_rate: float = 1e-3  # peak LoRA learning rate (cosine decay; 2e-3 and 3e-3 were unstable)
    rank: int = 16  # LoRA rank r
    alpha: float = 32.0  # LoRA alpha; the update is scaled by alpha / r
    num_layers: int = -1  # adapt the last N blocks; -1: all of them
    max_seq_length: int = 96  # longer samples are truncated (the longest summary record has about 70 tokens)
    seed: int = 7  # dataset split, LoRA init, data order; 7 puts "What is ReLU in mlx?" in training
    max_samples: int | None = None  # use only the first N training samples (and N/4 held-out ones)
    questions: int = 20  # seen and held-out questions scored before and after (each)
    show: int = 4  # of those, answers printed side by side (each kind)
    answer_tokens: int = 64  # greedy tokens per answer

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


SHOWCASE = ("ReLU",)  # the MLX LoRA example's question comes first when it is in a list


def _qa(text) -> tuple[str, str] | None:
    """(prompt, reference answer) of a record with a Q/A shape, else None."""
    if isinstance(text, str) and "\nA:" in text:
        q, a = text.split("\nA:", 1)
        return q + "\nA:", a.strip()
    return None


def _records(folder: Path, split: str) -> list[tuple[str, str]]:
    path = folder / f"{split}.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
            out.append((rec["prompt"], str(rec.get("completion", "")).strip()))
        elif isinstance(rec, dict) and _qa(rec.get("text")):
            out.append(_qa(rec["text"]))
    return out


def _pick(qas: list[tuple[str, str]], n: int) -> list[tuple[str, str]]:
    """The first n, with the showcased questions (if present) moved to the front."""
    first = [qa for qa in qas if any(f"What is {name} in" in qa[0] for name in SHOWCASE)]
    return (first + [qa for qa in qas if qa not in first])[:n]


def normalise(text: str) -> str:
    return " ".join(text.split()).lower()


def is_right(answer: str, reference: str) -> bool:
    """The answer reproduces the reference (whitespace collapsed, case ignored); text after it is allowed."""
    ref = normalise(reference)
    return bool(ref) and normalise(answer).startswith(ref)


def _answers(model, tokenizer, questions, max_tokens: int) -> list[str]:

    return [generate(model, tokenizer, q, max_tokens=max_tokens, temp=0.0).strip() for q, _ in questions]


def _scored(questions, before, after) -> list[dict]:
    return [
        {
            "question": q,
            "reference": ref,
            "before": b,
            "after": a,
            "right_before": is_right(b, ref),
            "right_after": is_right(a, ref),
        }
        for (q, ref), b, a in zip(questions, before, after)
    ]


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
        counts = build_docstring_dataset(
            list(cfg.packages), data_dir, seed=cfg.seed, answer=cfg.answer, completion=cfg.mask_prompt
        )
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
        splits = load_dataset(
            data_dir, tokenizer, max_seq_length=cfg.max_seq_length, mask_prompt=cfg.mask_prompt
        )
    for w in caught:
        if issubclass(w.category, DatasetWarning):
            say(f"note: {str(w.message).split(' (')[0]}")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    held = splits.test if splits.test is not None else splits.valid
    if held is None:
        raise ValueError(f"{data_dir}: has no valid.jsonl or test.jsonl to measure held-out loss on")
    n_held = None if cfg.max_samples is None else max(cfg.batch_size, cfg.max_samples // 4)
    limits = (cfg.train_records if cfg.train_records and cfg.train_records > 0 else None, cfg.max_samples)
    n_train = min(n for n in (*limits, len(splits.train)) if n is not None)
    train_set, held = _subset(splits.train, n_train), _subset(held, n_held)
    seen_q = _pick(_records(data_dir, "train")[:n_train], cfg.questions)
    held_q = _pick(_records(data_dir, Path(held.path).stem if held.path else "test"), cfg.questions)
    before_loss, before_ppl = evaluate(model, held, cfg.batch_size, -1, cfg.max_seq_length)
    before_seen = _answers(model, tokenizer, seen_q, cfg.answer_tokens)
    before_held = _answers(model, tokenizer, held_q, cfg.answer_tokens)
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
        mask_prompt=cfg.mask_prompt,
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
    after_seen = _answers(model, tokenizer, seen_q, cfg.answer_tokens)
    after_held = _answers(model, tokenizer, held_q, cfg.answer_tokens)
    total_s = time.perf_counter() - t0

    losses = list(result.history.losses)
    results = {
        "config": {**asdict(cfg), "packages": list(cfg.packages)},
        "data_dir": str(data_dir),
        "held_out_split": Path(held.path).name if held.path else None,
        "held_out_samples": len(held),
        "train_samples": len(train_set),
        "before": {"loss": before_loss, "perplexity": before_ppl},
        "after": {"loss": after_loss, "perplexity": after_ppl},
        "loss_reduction": 1.0 - after_loss / before_loss,
        "metric": METRIC,
        "seen": _scored(seen_q, before_seen, after_seen),
        "held_out": _scored(held_q, before_held, after_held),
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


def _score(items: list[dict], when: str) -> str:
    right = sum(qa[f"right_{when}"] for qa in items)
    return f"{right}/{len(items)}" if items else "-"


def report(results: dict, show: int | None = None) -> str:
    """The before/after tables and some answers side by side, as printed."""
    b, a = results["before"], results["after"]
    show = results["config"].get("show", 4) if show is None else show
    lines = [
        "",
        f"{'held-out (' + str(results['held_out_split']) + ')':<22}{'before':>10}{'after':>10}{'change':>10}",
        f"{'loss':<22}{b['loss']:>10.3f}{a['loss']:>10.3f}{-results['loss_reduction']:>+10.1%}",
        f"{'perplexity':<22}{b['perplexity']:>10.2f}{a['perplexity']:>10.2f}"
        f"{a['perplexity'] / b['perplexity'] - 1:>+10.1%}",
        "",
        f"{'answers right':<22}{'before':>10}{'after':>10}",
        *(
            f"{label:<22}{_score(results[key], 'before'):>10}{_score(results[key], 'after'):>10}"
            for label, key in (("seen (trained on)", "seen"), ("held out", "held_out"))
        ),
        f"({results['metric']})",
        "",
    ]
    width = max(20, (shutil.get_terminal_size((100, 24)).columns - 7) // 2)
    width = min(width, 46)
    for kind, items in (("seen", results["seen"]), ("held out", results["held_out"])):
        for qa in items[:show]:
            lines.append(f"[{kind}] {qa['question'].replace(chr(10) + 'A:', '')}")
            lines.append(f"  reference: {_flat(qa['reference'])}")
            left = textwrap.wrap(_flat(qa["before"]) or "(nothing)", width)[:3]
            right = textwrap.wrap(_flat(qa["after"]) or "(nothing)", width)[:3]
            was, now = (("right" if qa[f"right_{w}"] else "wrong") for w in ("before", "after"))
            lines.append(f"  {'before (' + was + ')':<{width}} | after ({now})")
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
