"""The ``lora-course`` model subcommands: generate, fuse, convert and export-adapter.

Each is an ``add_<name>_command(subparsers)`` that adds an argparse parser and sets
``func`` to a handler that calls the library and prints. ``cli.py`` collects them;
``train`` has its own module (``train_cli.py``) for its flags and YAML config.
"""

from __future__ import annotations

import sys
import time

from lora_course.adapters.files import export_peft, load_adapters
from lora_course.checkpoint.files import DEFAULT_SHARD_MB
from lora_course.checkpoint.load import load
from lora_course.model.generate import (
    check_sampling,
    detokenize,
    generate_tokens,
    prompt_ids,
    stop_ids,
    until_eos,
)
from lora_course.recipes.convert import convert
from lora_course.recipes.fuse import fuse_adapters


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
    if args.write_every < 1:
        raise ValueError(f"--write-every must be at least 1, got {args.write_every}")
    flags = {"max_tokens": "--num-tokens", "temp": "--temp", "top_p": "--top-p", "top_k": "--top-k"}
    check_sampling(args.num_tokens, args.temp, args.top_p, args.top_k, args.seed, {**flags, "seed": "--seed"})
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
    for piece in detokenize(tokenizer, until_eos(counted(tokens), stop_ids(tokenizer)), at_start=False):
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


def add_fuse_command(subparsers) -> None:
    p = subparsers.add_parser(
        "fuse",
        help="merge LoRA/DoRA adapters into a model and save it standalone",
        description="Load --model, apply the adapters in --adapter-path, merge them into the "
        "weights and save the result to --save-path.",
    )
    p.add_argument(
        "--model", required=True, help="checkpoint directory (HF, MLX or Meta layout), .gguf file or Hub id"
    )
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
    p.add_argument(
        "--export-gguf",
        action="store_true",
        help="write one llama.cpp .gguf file: --save-path if it ends in .gguf, else "
        "SAVE_PATH/ggml-model-<type>.gguf (implies --de-quantize)",
    )
    p.add_argument(
        "--gguf-type", choices=["f16", "f32", "q8_0"], default="f16", help="tensor type for --export-gguf"
    )
    p.set_defaults(func=_fuse_cli)


def _fuse_cli(args) -> int:
    out = fuse_adapters(
        args.model,
        args.adapter_path,
        args.save_path,
        args.de_quantize,
        args.export_hf,
        args.export_gguf,
        args.gguf_type,
    )
    print(f"saved fused model to {out}")
    return 0


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


# ----------------------------------------------------------------------------- export-adapter


def add_export_adapter_command(subparsers) -> None:
    p = subparsers.add_parser(
        "export-adapter",
        help="rewrite an adapter directory for Hugging Face PEFT",
        description="Read --adapter-path (lora_course / mlx-lm adapters) and write a PEFT "
        "LoRA/DoRA directory (adapter_config.json + adapter_model.safetensors) to "
        "--save-path, for peft.PeftModel.from_pretrained(model, save_path).",
    )
    p.add_argument("--adapter-path", required=True, help="adapter directory to read")
    p.add_argument("--save-path", required=True, help="output directory for the PEFT adapter")
    p.add_argument("--format", choices=["peft"], default="peft", help="output format (peft)")
    p.add_argument(
        "--base-model",
        default=None,
        help="Hub id or path recorded as base_model_name_or_path in adapter_config.json",
    )
    p.set_defaults(func=_export_cli)


def _export_cli(args) -> int:
    out = export_peft(args.adapter_path, args.save_path, args.base_model)
    print(f"saved PEFT adapter to {out}")
    return 0
