"""Finding a checkpoint's files: the folder, its layout, its JSON and its safetensors.

The lowest layer of ``lora_course.checkpoint``: everything here reads, nothing builds
a model. Every problem raises :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import re
from pathlib import Path

from lora_course.checkpoint import hub
from lora_course.safe_io import InputError, check_safetensors, read_json_object

import mlx.core as mx

BASE_DIR = Path(__file__).parent.parent / "assets" / "base"  # the course's embedded base model


DEFAULT_SHARD_MB = 5000  # write one safetensors file per this many MiB


INDEX = "model.safetensors.index.json"


# What save() writes; it replaces an existing directory only if it holds nothing else.
CHECKPOINT_FILES = re.compile(
    r"^(config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|"
    r"tokenizer\.model|chat_template\.jinja|tokenizer\.json|tokenizer_config\.json|"
    r"generation_config\.json)$"
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written; the message names the file and tensor or key."""


def resolve(path=None) -> Path:
    """The checkpoint directory: ``None`` or ``"base"`` mean the course's embedded base model
    (a local directory named ``base`` wins over it)."""
    if path is None or (str(path) == "base" and not Path("base").is_dir()):
        if not (BASE_DIR / "config.json").is_file():
            raise CheckpointError(
                f"{BASE_DIR}: the course base model is not there (it is built by the course's "
                "asset script); pass the path of a checkpoint directory instead"
            )
        return BASE_DIR
    folder = Path(path).expanduser()
    if not folder.exists() and hub.is_hub_id(path):  # a local path always wins (hub.py)
        folder = hub.download(str(path))
    if not folder.exists():
        raise CheckpointError(f"{folder}: no such checkpoint directory")
    if not folder.is_dir():
        raise CheckpointError(
            f"{folder}: a checkpoint is a directory (config.json, *.safetensors, "
            "tokenizer.model), not a file; pass its directory"
        )
    return folder


def detect_format(folder: Path) -> str:
    """``"hf"`` (also our MLX layout: config.json + safetensors) or ``"meta"`` (params.json)."""
    if (folder / "config.json").is_file():
        return "hf"
    if (folder / "params.json").is_file():
        return "meta"
    raise CheckpointError(
        f"{folder}: neither config.json (Hugging Face / MLX) nor params.json "
        "(Meta / Mistral) found; is this a checkpoint directory?"
    )


def read_json(path: Path) -> dict:
    """A JSON object from a regular file, bounded in size and depth (``safe_io``)."""
    try:
        return read_json_object(path)
    except InputError as e:
        raise CheckpointError(str(e)) from None


def mx_load(path: Path) -> dict[str, mx.array]:
    try:
        check_safetensors(path)  # a regular file whose header is sound, before MLX reads it
        return mx.load(str(path))
    except InputError as e:
        raise CheckpointError(str(e)) from None
    except (RuntimeError, ValueError, OSError) as e:
        reason = str(e).replace("[load_safetensors] ", "").splitlines()[0]
        raise CheckpointError(f"{path}: cannot read safetensors: {reason}") from None


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of an HF/MLX checkpoint, from the index if there is one."""
    index_path = folder / INDEX
    if index_path.is_file():
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: missing or empty 'weight_map'")
        files = {}
        for tensor, name in weight_map.items():
            parts = Path(str(name)).parts
            if not isinstance(name, str) or Path(name).is_absolute() or ".." in parts or not parts:
                raise CheckpointError(
                    f"{index_path}: tensor '{tensor}' points to '{name}', outside "
                    "the checkpoint directory; shard names must be plain file names"
                )
            if not (folder / name).is_file():
                raise CheckpointError(
                    f"{index_path}: shard '{name}' (holding tensor '{tensor}') is "
                    "missing; copy all shards listed in the index"
                )
            files.setdefault(name, folder / name)
        return list(files.values())
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no model.safetensors, {INDEX} or model-*.safetensors found")
    return files


def dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).split(".")[-1]  # mlx.core.bfloat16 -> bfloat16


def is_gguf(path) -> bool:
    """True for a path to one ``.gguf`` file (llama.cpp's single-file format)."""
    return path is not None and str(path).endswith(".gguf") and Path(path).expanduser().is_file()
