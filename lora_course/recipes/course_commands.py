"""The course's own jobs on the command line: ``dataset``, ``pretrain`` and ``quickstart``.

``dataset`` builds the docstring Q/A set, ``pretrain`` the course's base model and
``quickstart`` runs the whole course in one command; ``cli.py`` collects them with the
model commands of ``commands.py``.
"""

from __future__ import annotations

import argparse

from lora_course.data.docstrings import build_docstring_dataset
from lora_course.recipes.pretrain import PretrainConfig, pretrain
from lora_course.recipes.quickstart import QuickstartConfig, quickstart


def add_dataset_command(subparsers) -> None:
    p = subparsers.add_parser("dataset", help="build a Q/A dataset from installed packages' docstrings")
    p.add_argument("--packages", nargs="+", default=["mlx"], help="packages to walk (default: mlx)")
    p.add_argument("--out", default="mlx-doc-data", help="output folder for train/valid/test.jsonl")
    p.add_argument("--seq-limit", type=int, default=2048, help="cut each record to this many characters")
    p.add_argument("--test-fraction", type=float, default=0.1, help="fraction for valid and for test")
    p.add_argument("--seed", type=int, default=0, help="seed of the split")
    p.add_argument("--workers", type=int, default=None, help="processes (one package each)")
    p.add_argument(
        "--answer",
        choices=["docstring", "summary", "sentence"],
        default="docstring",
        help="answer with the name and the whole docstring, the name and its first sentence, or the "
        "first sentence alone (default: %(default)s)",
    )
    p.add_argument(
        "--completion",
        action="store_true",
        help="write prompt/completion records (for --mask-prompt) instead of text records",
    )
    p.set_defaults(func=_dataset)


def _dataset(args) -> int:
    counts = build_docstring_dataset(
        args.packages,
        args.out,
        args.seq_limit,
        args.test_fraction,
        args.seed,
        args.workers,
        args.answer,
        args.completion,
    )
    print(
        f"wrote {args.out}: train {counts['train']}, valid {counts['valid']}, test {counts['test']} "
        f"records from {counts['modules']} modules in {counts['seconds']:.2f} s; "
        f"{counts['import_failures']} modules failed to import and were skipped"
        + (f" ({', '.join(counts['failed_modules'])})" if counts["failed_modules"] else "")
    )
    return 0


def add_pretrain_command(subparsers) -> None:
    d = PretrainConfig()
    p = subparsers.add_parser(
        "pretrain",
        help="pretrain a small Llama from scratch on installed packages' documentation",
        description="Build the documentation corpus, train a tokenizer and a small Llama from "
        "scratch, and save it (the course's base model was made with the defaults).",
    )
    p.add_argument("--out", default="base-model", help="output directory (default: %(default)s)")
    p.add_argument("--corpus-dir", default=None, help="also write the corpus as train/valid jsonl here")
    p.add_argument(
        "--packages",
        nargs="+",
        default=list(d.packages),
        help="packages to read; 'stdlib' is the standard library (default: %(default)s)",
    )
    for name in (
        "dim",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "hidden_dim",
        "vocab_size",
        "seq_length",
        "iters",
        "batch_size",
        "warmup",
        "steps_per_eval",
        "val_batches",
        "seed",
        "max_documents",
    ):
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=int,
            default=getattr(d, name),
            help=f"(default: {getattr(d, name)})",
        )
    for name in ("learning_rate", "min_learning_rate", "weight_decay", "grad_clip", "valid_fraction"):
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=float,
            default=getattr(d, name),
            help=f"(default: {getattr(d, name)})",
        )
    p.add_argument(
        "--init", choices=["mlx", "gpt2"], default=d.init, help="initialization (default: %(default)s)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or report lines")
    p.set_defaults(func=_pretrain_cli)


def _pretrain_cli(args) -> int:
    cfg = PretrainConfig.from_dict(vars(args))
    pretrain(cfg, args.out, corpus_dir=args.corpus_dir, progress=not args.quiet, verbose=not args.quiet)
    return 0


def add_quickstart_command(subparsers) -> None:
    d = QuickstartConfig()
    p = subparsers.add_parser(
        "quickstart",
        help="LoRA-fine-tune the course model on mlx's docstrings and show before/after",
        description="Build a Q/A dataset from installed docstrings, LoRA-fine-tune a model on it and "
        "print held-out loss, perplexity, and how many seen and held-out questions it answers right, "
        "before and after. Offline.",
    )
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded course model)")
    p.add_argument(
        "--data",
        default=None,
        help="dataset folder with train.jsonl and valid/test.jsonl (default: build one from --packages)",
    )
    p.add_argument("--out", default=d.out, help="output directory (default: %(default)s)")
    p.add_argument(
        "--packages",
        nargs="+",
        default=list(d.packages),
        help="packages whose docstrings make the dataset (default: %(default)s)",
    )
    for name, typ in (
        ("iters", int),
        ("batch_size", int),
        ("learning_rate", float),
        ("rank", int),
        ("alpha", float),
        ("num_layers", int),
        ("max_seq_length", int),
        ("seed", int),
        ("max_samples", int),
        ("train_records", int),
        ("questions", int),
        ("show", int),
        ("answer_tokens", int),
    ):
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=typ,
            default=getattr(d, name),
            help=f"(default: {getattr(d, name)})",
        )
    p.add_argument(
        "--answer",
        choices=["summary", "sentence", "docstring"],
        default=d.answer,
        help="dataset answers: the name and the docstring's first sentence, or the whole docstring "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--mask-prompt",
        action=argparse.BooleanOptionalAction,
        default=d.mask_prompt,
        help="train on the answers only (default: %(default)s)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_quickstart_cli)


def _quickstart_cli(args) -> int:
    quickstart(QuickstartConfig.from_dict(vars(args)), progress=not args.quiet)
    return 0
