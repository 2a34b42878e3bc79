"""``lora-course train``: fine-tune and/or test from the command line or a YAML file.

    lora-course train --model path/to/model --train --data data/ --iters 600
    lora-course train -c run.yaml --learning-rate 2e-4      # the flag wins over the file
    lora-course train --model path/to/model --adapter-path adapters --data data/ --test

The flags follow the MLX LoRA example's ``lora.py`` (``--lora-layers``,
``--resume-adapter-file``, ``--test-batches``, ...) plus mlx-lm's newer options. A
value comes from the command line if given, else from the ``-c`` YAML file, else
from the defaults in ``FineTuneConfig`` / ``TrainingArgs`` (the only place defaults
live; argparse's defaults are None so we can tell "not given" apart). YAML keys are
the field names (``learning_rate``, ``num_layers``, ...); an unknown key or a wrong
type is an error naming the file, line and key. Taught in notebook 10.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, fields
from pathlib import Path

from lora_course.adapters.apply import count_parameters
from lora_course.adapters.files import load_adapters
from lora_course.config import ConfigError, checked_fields
from lora_course.limits import is_int, is_number
from lora_course.recipes.finetune import (
    FineTuneConfig,
    finetune,
    load_data,
    load_model,
    prepare_base,
)
from lora_course.safe_io import InputError, load_yaml, read_text
from lora_course.training.distributed import world
from lora_course.training.evaluate import evaluate
from lora_course.training.optimizers import OPTIMIZERS

import yaml


@dataclass
class TrainCommandConfig(FineTuneConfig):
    model: str | None = None  # checkpoint directory; None: the course's embedded base model
    data: str | None = None  # dataset folder (train/valid/test.jsonl) or file
    train: bool = False  # run training
    test: bool = False  # report loss and perplexity on the test split (after training, if any)
    test_batches: int = 500  # test batches to evaluate; -1: the whole split


# flag -> (field, help); types and defaults come from the dataclass
FLAGS = [
    ("--model", "model", "checkpoint directory, .gguf file or Hub id org/name"),
    ("--train", "train", "train the adapters"),
    ("--data", "data", "dataset folder with train.jsonl, valid.jsonl, test.jsonl (or one file)"),
    (
        "--lora-layers",
        "num_layers",
        "number of final blocks to adapt (-1: all; default: 16, or all blocks "
        "of a smaller model); alias --num-layers",
    ),
    ("--batch-size", "batch_size", "examples per micro-batch (over all processes)"),
    ("--iters", "iters", "optimizer steps"),
    ("--epochs", "epochs", "passes over the training set (overrides --iters)"),
    ("--val-batches", "val_batches", "validation batches per evaluation (-1: all)"),
    ("--learning-rate", "learning_rate", "peak learning rate"),
    ("--steps-per-report", "steps_per_report", "steps between training-loss reports"),
    ("--steps-per-eval", "steps_per_eval", "steps between validations (0: never)"),
    (
        "--resume-adapter-file",
        "resume_adapter_file",
        "adapter directory to start from; resumes exactly when it holds training_state.safetensors",
    ),
    ("--adapter-path", "adapter_path", "where adapters and checkpoints are written"),
    ("--save-every", "save_every", "steps between checkpoints"),
    ("--test", "test", "evaluate on the test split and print loss and perplexity"),
    ("--test-batches", "test_batches", "test batches (-1: all)"),
    ("--seed", "seed", "seed for data order, dropout and LoRA init"),
    ("--fine-tune-type", "fine_tune_type", "lora, dora or full"),
    ("--rank", "rank", "LoRA rank"),
    ("--alpha", "alpha", "LoRA alpha (scale = alpha / rank)"),
    ("--dropout", "dropout", "dropout on the adapter input"),
    ("--keys", "keys", "linear layers to adapt inside a block, e.g. self_attn.q_proj self_attn.v_proj"),
    ("--optimizer", "optimizer", "the optimizer (mlx.optimizers)"),
    ("--weight-decay", "weight_decay", "weight decay (sgd, adamw, lion, adafactor, muon)"),
    (
        "--optimizer-config",
        "optimizer_config",
        "the optimizer's other settings as JSON, e.g. '{\"betas\": [0.9, 0.95]}'",
    ),
    ("--lora-plus-ratio", "lora_plus_ratio", "LoRA+: lora_b learns this many times faster than lora_a"),
    (
        "--loss-chunk-size",
        "loss_chunk_size",
        "positions per cross-entropy chunk (0: the plain loss; default: chunked from a 32k vocabulary up)",
    ),
    ("--lr-schedule", "lr_schedule", "constant, linear or cosine"),
    ("--warmup", "warmup", "linear warmup steps"),
    ("--min-learning-rate", "min_learning_rate", "where linear/cosine decay ends"),
    ("--grad-accumulation-steps", "grad_accumulation_steps", "micro-batches per optimizer step"),
    ("--grad-clip", "grad_clip", "clip the global gradient norm to this"),
    ("--grad-checkpoint", "grad_checkpoint", "recompute blocks in the backward pass to save memory"),
    ("--max-seq-length", "max_seq_length", "longer examples are truncated"),
    ("--mask-prompt", "mask_prompt", "only completion / assistant tokens carry loss"),
    ("--early-stopping-patience", "early_stopping_patience", "stop after N validations without improvement"),
    ("--quantize", "quantize", "quantize the base model first (QLoRA)"),
    ("--q-bits", "q_bits", "bits per quantized weight"),
    ("--q-group-size", "q_group_size", "weights per quantization group"),
    ("--dtype", "dtype", "cast float weights first: float32 (fastest on CPU), float16, bfloat16"),
]


_CHOICES = {
    "fine_tune_type": ["lora", "dora", "full"],
    "optimizer": list(OPTIMIZERS),
    "lr_schedule": ["constant", "linear", "cosine"],
    "dtype": ["float32", "float16", "bfloat16"],
}
_PATHS = {"model", "data", "adapter_path", "resume_adapter_file"}


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"eps\": 1e-6}}', got {text!r}")
    return value


def add_train_command(subparsers) -> None:
    defaults = TrainCommandConfig()
    kinds = {f.name: f.type for f in fields(TrainCommandConfig)}
    p = subparsers.add_parser(
        "train",
        help="fine-tune with LoRA / DoRA / QLoRA and test",
        description="Fine-tune a model with LoRA, DoRA or full fine-tuning (QLoRA with --quantize), "
        "and/or report test loss and perplexity.",
    )
    p.add_argument("-c", "--config", help="YAML file of options (keys are the long flag names with _)")
    for flag, name, text in FLAGS:
        names = [flag, "--num-layers"] if name == "num_layers" else [flag]
        help_ = text if "default:" in text else f"{text} (default: {getattr(defaults, name)})"
        kind = str(kinds[name])
        if kind == "bool":
            p.add_argument(*names, dest=name, action="store_true", default=None, help=help_)
        elif name == "keys":
            p.add_argument(*names, dest=name, nargs="+", default=None, help=help_)
        else:
            cast = {"int": int, "float": float, "dict": _json_dict}.get(kind.split(" ")[0], str)
            metavar = {int: "N", float: "X", _json_dict: "JSON"}.get(
                cast, "PATH" if name in _PATHS else "NAME"
            )
            p.add_argument(
                *names,
                dest=name,
                type=cast,
                default=None,
                help=help_,
                choices=_CHOICES.get(name),
                metavar=None if name in _CHOICES else metavar,
            )
    p.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        default=None,
        help="run the step without mx.compile (slower; for debugging)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=run_train_command)


# mlx-lm / example spellings accepted in YAML files
_YAML_ALIASES = {"lora_layers": "num_layers", "adapter_file": "adapter_path"}


def read_yaml_config(path) -> dict:
    """The YAML file as a flat dict of checked option names (values checked later)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such config file")
    try:
        text = read_text(path)  # a regular file of bounded size
        raw = load_yaml(text, path)  # SafeLoader, aliases and nesting bounded
    except InputError as e:
        raise ConfigError(str(e)) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value, got a {type(raw).__name__}")
    flat = {}
    for key, value in raw.items():
        if key == "lora_parameters" and isinstance(value, dict):  # mlx-lm's nested form
            value = dict(value)
            if "scale" in value and "alpha" not in value:
                scale, rank = value.pop("scale"), value.get("rank", FineTuneConfig.rank)
                if not (is_number(scale) and is_int(rank)):
                    line = _line_of(text, "scale")
                    raise ConfigError(
                        f"{path}{f', line {line}' if line else ''}: lora_parameters 'scale' must be a "
                        f"number and 'rank' an integer, got {repr(scale)[:60]} and {repr(rank)[:60]}",
                        key="scale",
                    )
                value["alpha"] = scale * rank
            flat.update(value)
        else:
            flat[_YAML_ALIASES.get(key, key)] = value
    try:
        checked_fields(TrainCommandConfig, flat, source=str(path))
    except ConfigError as e:
        line = _line_of(text, e.key)
        if line is not None:
            raise ConfigError(str(e).replace(f"{path}:", f"{path}, line {line}:", 1), key=e.key) from None
        raise
    return flat


def _line_of(text: str, key) -> int | None:
    """1-based line of ``key`` in a YAML mapping (top level or inside lora_parameters)."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return None
    stack = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == key:
                    return k.start_mark.line + 1
                stack.append(v)
    return None


def build_config(args: argparse.Namespace) -> TrainCommandConfig:
    """Defaults, overridden by the YAML file, overridden by the flags given."""
    merged = read_yaml_config(args.config) if args.config else {}
    names = {f.name for f in fields(TrainCommandConfig)}
    merged.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    source = args.config or "command line"
    try:
        return TrainCommandConfig.from_dict(merged, source=source)
    except ConfigError:
        raise
    except ValueError as e:  # a value of the right type out of range: name where it came from
        raise ConfigError(f"{source}: {e}") from None


def run_train_command(args: argparse.Namespace) -> int:

    cfg = build_config(args)
    if not (cfg.train or cfg.test):
        raise ValueError("nothing to do: pass --train to fine-tune and/or --test to evaluate")
    rank = world()[0]
    say = print if rank == 0 else (lambda *a, **k: None)
    options = {f.name: getattr(cfg, f.name) for f in fields(FineTuneConfig)}
    model, tokenizer = load_model(cfg.model)
    say(f"loaded {cfg.model or 'the course base model'}")
    if cfg.train:
        result = finetune((model, tokenizer), cfg.data, progress=getattr(args, "progress", True), **options)
        model, splits = result.model, result.data
        c = count_parameters(model)
        say(f"trainable parameters: {c['trainable']:,} of {c['total']:,} ({c['trainable_percent']:.3f}%)")
        say(
            f"adapters saved to {result.adapter_path}/ "
            f"({result.history.stop_reason} at step {result.history.step})"
        )
    else:
        adapters = Path(cfg.adapter_path)
        if not (adapters / "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"--test without --train needs trained adapters, but {adapters}/ has no "
                "adapter_config.json; pass --adapter-path or add --train"
            )

        prepare_base(model, cfg)
        load_adapters(model, adapters)  # the adapter layout comes from adapter_config.json
        splits = load_data(cfg.data, tokenizer, cfg)
    if cfg.test:
        if splits.test is None:
            raise FileNotFoundError(f"--test: {cfg.data} has no test.jsonl")
        loss, ppl = evaluate(model, splits.test, cfg.batch_size, cfg.test_batches, cfg.max_seq_length)
        say(f"Test loss {loss:.3f}, Test ppl {ppl:.3f}.")
    return 0
