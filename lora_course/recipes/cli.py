"""The ``lora-course`` command line: every subcommand, wired with argparse.

Each subcommand is an ``add_<name>_command(subparsers)`` that adds its parser and sets
``func`` to a handler taking the parsed arguments; the handlers call the library and
print. ``train`` has a module of its own (``train_cli.py``: flags, YAML config and
their precedence). Errors raised at our boundaries are printed as one line.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
import time

import mlx.core as mx

from lora_course import blas
from lora_course.adapters.files import load_adapters
from lora_course.checkpoint.files import DEFAULT_SHARD_MB
from lora_course.checkpoint.load import load
from lora_course.data.docstrings import build_docstring_dataset
from lora_course.model.generate import (
    detokenize,
    generate_tokens,
    prompt_ids,
    until_eos,
)
from lora_course.recipes.convert import convert
from lora_course.recipes.fuse import fuse_adapters
from lora_course.recipes.pretrain import PretrainConfig, pretrain
from lora_course.recipes.quickstart import QuickstartConfig, quickstart
from lora_course.recipes.train_cli import add_train_command
from lora_course.version import __version__


def add_info_command(subparsers) -> None:
    p = subparsers.add_parser("info", help="print versions, the MLX device and the BLAS in use")
    p.set_defaults(func=_info)


def _info(args) -> int:
    rows = [
        ("lora_course", __version__),
        ("python", platform.python_version()),
        ("platform", platform.platform()),
        ("mlx", mx.__version__),
        ("device", str(mx.default_device())),
        ("blas", blas.blas_in_use()),
    ]
    for name in ("numpy", "sentencepiece", "transformers", "torch", "mlx_lm"):
        try:
            rows.append((name, importlib.import_module(name).__version__))
        except ImportError:
            rows.append((name, "not installed"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


# ----------------------------------------------------------------------------- generate


def add_generate_command(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate text from a checkpoint",
        description="Continue a prompt with a model (greedy unless --temp > 0).",
    )
    p.add_argument("--model", default=None, help="checkpoint directory (default: the course's base model)")
    p.add_argument("-p", "--prompt", default="Once upon a time", help="the text to continue")
    p.add_argument("-n", "--num-tokens", type=int, default=100, help="most tokens to generate")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely (0: off)")
    p.add_argument("--write-every", type=int, default=1, help="print after every N tokens")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--adapter-path", default=None, help="directory of trained LoRA adapters")
    p.set_defaults(func=_generate_cli)


def _generate_cli(args) -> int:
    if args.num_tokens < 1 or args.write_every < 1:
        raise ValueError("--num-tokens and --write-every must be at least 1")
    model, tokenizer = load(args.model)
    if args.adapter_path:
        load_adapters(model, args.adapter_path)
    ids = prompt_ids(tokenizer, args.prompt)
    print(args.prompt, end="", flush=True)

    count, t0, t_first = 0, time.perf_counter(), None

    def counted(tokens):
        nonlocal count, t_first
        for t in tokens:
            if t_first is None:
                t_first = time.perf_counter()
            count += 1
            yield t

    tokens = generate_tokens(model, ids, args.num_tokens, args.temp, args.top_p, args.top_k, args.seed)
    buffer, last_flush = [], 0
    for piece in detokenize(tokenizer, until_eos(counted(tokens), tokenizer.eos_id), at_start=False):
        buffer.append(piece)
        if count - last_flush >= args.write_every:
            print("".join(buffer), end="", flush=True)
            buffer, last_flush = [], count
    print("".join(buffer), flush=True)
    t_end = time.perf_counter()
    if t_first is not None:
        decode_rate = (count - 1) / (t_end - t_first) if count > 1 else float("nan")
        print(
            f"prompt: {len(ids)} tokens, {len(ids) / (t_first - t0):.1f} tokens/s | "
            f"generation: {count} tokens, {decode_rate:.1f} tokens/s",
            file=sys.stderr,
        )
    return 0


# ----------------------------------------------------------------------------- fuse


def add_fuse_command(subparsers) -> None:
    p = subparsers.add_parser(
        "fuse",
        help="merge LoRA/DoRA adapters into a model and save it standalone",
        description="Load --model, apply the adapters in --adapter-path, merge them into the "
        "weights and save the result to --save-path.",
    )
    p.add_argument("--model", required=True, help="checkpoint directory (HF or MLX layout)")
    p.add_argument(
        "--adapter-path",
        required=True,
        help="adapter directory (adapter_config.json + adapters.safetensors, or PEFT's)",
    )
    p.add_argument("--save-path", required=True, help="output directory for the fused model")
    p.add_argument(
        "--de-quantize", action="store_true", help="write float weights even if the model is quantized"
    )
    p.add_argument(
        "--export-hf",
        action="store_true",
        help="write a plain Hugging Face checkpoint (implies --de-quantize)",
    )
    p.set_defaults(func=_fuse_cli)


def _fuse_cli(args) -> int:
    out = fuse_adapters(args.model, args.adapter_path, args.save_path, args.de_quantize, args.export_hf)
    print(f"saved fused model to {out}")
    return 0


# ----------------------------------------------------------------------------- convert


def add_convert_command(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a Hugging Face or Meta checkpoint to MLX format, optionally quantized",
        description="Convert a Hugging Face (--hf-path) or original Meta/Mistral (--torch-path) "
        "checkpoint into an MLX checkpoint directory (--mlx-path).",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--torch-path", help="directory with params.json and consolidated.*.pth")
    source.add_argument("--hf-path", help="directory with config.json and *.safetensors")
    p.add_argument("--mlx-path", default="mlx_model", help="output directory (default: mlx_model)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the weights")
    p.add_argument("--q-group-size", type=int, default=64, help="quantization group size (default 64)")
    p.add_argument("--q-bits", type=int, default=4, help="bits per quantized weight (default 4)")
    p.add_argument(
        "--dtype",
        choices=["float16", "bfloat16", "float32"],
        default=None,
        help="cast float weights to this dtype (default: keep the stored dtype)",
    )
    p.add_argument(
        "--shard-size-mb",
        type=float,
        default=DEFAULT_SHARD_MB,
        help=f"largest safetensors file in MiB (default {DEFAULT_SHARD_MB})",
    )
    p.set_defaults(func=_convert_cli)


def _convert_cli(args) -> int:
    out = convert(
        torch_path=args.torch_path,
        hf_path=args.hf_path,
        mlx_path=args.mlx_path,
        quantize=args.quantize,
        q_group_size=args.q_group_size,
        q_bits=args.q_bits,
        dtype=args.dtype,
        shard_size_mb=args.shard_size_mb,
    )
    print(f"saved {out}")
    return 0


# ----------------------------------------------------------------------------- dataset


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


# ----------------------------------------------------------------------------- pretrain


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


# ----------------------------------------------------------------------------- quickstart


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


# ----------------------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-course", description="LoRA and QLoRA fine-tuning with MLX, from the course."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in (
        add_info_command,
        add_train_command,
        add_fuse_command,
        add_convert_command,
        add_generate_command,
        add_dataset_command,
        add_pretrain_command,
        add_quickstart_command,
    ):
        add_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        # Errors raised at our boundaries are written for people: one line, no traceback.
        print(f"lora-course {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lora-course {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
