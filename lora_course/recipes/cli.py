"""The ``lora-course`` command line: ``build_parser`` wires every subcommand, ``main`` runs one.

The subcommands live in ``commands.py`` (generate, fuse, convert, export-adapter),
``course_commands.py`` (dataset, pretrain, quickstart) and ``train_cli.py`` (train, with its
YAML config); ``info`` is here.
Errors raised at our boundaries are printed as one line, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys

from lora_course import blas
from lora_course.recipes.commands import (
    add_convert_command,
    add_export_adapter_command,
    add_fuse_command,
    add_generate_command,
)
from lora_course.recipes.course_commands import (
    add_dataset_command,
    add_pretrain_command,
    add_quickstart_command,
)
from lora_course.recipes.train_cli import add_train_command
from lora_course.version import __version__

import mlx.core as mx


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-course", description="LoRA and QLoRA fine-tuning with MLX, from the course."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in (
        add_info_command,
        add_train_command,
        add_fuse_command,
        add_export_adapter_command,
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
