"""The ``lora-course`` command line.

Each subcommand lives next to the code it drives: the module named in ``_COMMANDS``
defines ``add_<name>_command(subparsers)``, which adds an argparse parser and sets
``func`` to a handler taking the parsed arguments. Modules are imported only when the
command line is built, so ``lora-course info`` stays quick.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> "module:function that registers it"
_COMMANDS = {
    "info": "lora_course.cli:add_info_command",
    "train": "lora_course.train_cli:add_train_command",
    "fuse": "lora_course.adapters:add_fuse_command",
    "convert": "lora_course.conversion:add_convert_command",
    "generate": "lora_course.generate:add_generate_command",
    "dataset": "lora_course.docstrings:add_dataset_command",
    "pretrain": "lora_course.pretrain:add_pretrain_command",
    "quickstart": "lora_course.quickstart:add_quickstart_command",
}


def add_info_command(subparsers) -> None:
    p = subparsers.add_parser("info", help="print versions, the MLX device and the BLAS in use")
    p.set_defaults(func=_info)


def _info(args) -> int:
    import platform

    from lora_course import __version__, _blas

    import mlx.core as mx

    rows = [
        ("lora_course", __version__),
        ("python", platform.python_version()),
        ("platform", platform.platform()),
        ("mlx", mx.__version__),
        ("device", str(mx.default_device())),
        ("blas", _blas.blas_in_use()),
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
    for target in _COMMANDS.values():
        module, func = target.split(":")
        getattr(importlib.import_module(module), func)(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    import lora_course  # noqa: F401  (BLAS first, before any mlx import)

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
