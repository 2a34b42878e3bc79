"""Checkpoints on disk: load and save Llama / Mistral weights, and convert between layouts.

Three directory layouts are read, told apart by the files they hold:

- **HF** (``config.json`` + ``model.safetensors``, or shards listed in
  ``model.safetensors.index.json``): the Hugging Face layout. Tensor names are already
  ours (``model.layers.0.self_attn.q_proj.weight``), so loading is a lookup.
- **MLX**: what :func:`save` writes. The same layout, plus an optional ``quantization``
  entry (``group_size``, ``bits``) in ``config.json`` as mlx-community models carry; the
  quantized layers are built first, then filled.
- **Meta / Mistral originals** (``params.json`` + ``consolidated.*.pth``): read by
  ``meta_format.py``, which renames Meta's tensors (``layers.0.attention.wq.weight``) to
  ours and joins model-parallel shards. Their RoPE rotates interleaved feature pairs
  (Su et al., 2021, "RoFormer"), so the model is built with ``rope_traditional=True``
  rather than permuting the weights. ``.pth`` files are read with
  ``torch.load(weights_only=True)``, which refuses pickled code.

Loading is lazy: ``mx.load`` maps tensors without reading them, each tensor is checked
against the shape the config implies and then handed to the model, so there is never
a second full copy of the weights. Saving is atomic (``lora_course.atomic``): everything
is written into a temporary directory beside the target, which is then renamed into place.

``convert`` (``lora-course convert``: load, cast, quantize, save) lives in
``conversion.py``. Taught in notebook 04 (checkpoints, tokenizers and sampling).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from lora_course import atomic
from lora_course.model import Model, ModelArgs
from lora_course.quant import dequantize, use_dequant_layers
from lora_course.tokenizer import Tokenizer
from lora_course.tree import tree_flatten

BASE_DIR = Path(__file__).parent / "assets" / "base"  # the course's embedded base model
DEFAULT_SHARD_MB = 5000  # write one safetensors file per this many MiB
INDEX = "model.safetensors.index.json"
FLOATS = (mx.float16, mx.bfloat16, mx.float32)
SUPPORTED_TYPES = ("llama", "mistral")
# HF config.json keys without which the model cannot be built (ModelArgs' defaults are 7B's).
REQUIRED_HF = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "intermediate_size", "vocab_size")
REQUIRED_META = ("dim", "n_layers", "n_heads")
# Optional keys (HF and Meta spellings) and what they must hold when present and not null.
OPTIONAL = {"num_key_value_heads": "int", "n_kv_heads": "int", "head_dim": "int",
            "max_position_embeddings": "int", "rms_norm_eps": "float", "norm_eps": "float",
            "rope_theta": "float", "tie_word_embeddings": "bool", "attention_bias": "bool",
            "mlp_bias": "bool", "rope_scaling": "dict", "rope_parameters": "dict"}
IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$|^rope\.freqs$")  # recomputed, not learned
# What save() writes; it replaces an existing directory only if it holds nothing else.
CHECKPOINT_FILES = re.compile(
    r"^(config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|"
    r"tokenizer\.model|chat_template\.jinja)$"
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written; the message names the file and tensor or key."""


# ----------------------------------------------------------------------------- finding things


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
    if not folder.exists():
        raise CheckpointError(f"{folder}: no such checkpoint directory")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: a checkpoint is a directory (config.json, *.safetensors, "
                              "tokenizer.model), not a file; pass its directory")
    return folder


def detect_format(folder: Path) -> str:
    """``"hf"`` (also our MLX layout: config.json + safetensors) or ``"meta"`` (params.json)."""
    if (folder / "config.json").is_file():
        return "hf"
    if (folder / "params.json").is_file():
        return "meta"
    raise CheckpointError(f"{folder}: neither config.json (Hugging Face / MLX) nor params.json "
                          "(Meta / Mistral) found; is this a checkpoint directory?")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_config(folder: Path) -> ModelArgs:
    """Build ``ModelArgs`` from ``config.json`` or ``params.json``, checking required keys."""
    fmt = detect_format(folder)
    path = folder / ("config.json" if fmt == "hf" else "params.json")
    config = _read_json(path)
    for key in REQUIRED_HF if fmt == "hf" else REQUIRED_META:
        if key not in config:
            raise CheckpointError(f"{path}: missing required key '{key}'")
        value = config[key]
        if key != "model_type" and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise CheckpointError(f"{path}: key '{key}' must be a positive integer, got {value!r}")
    if fmt == "hf":
        if config["model_type"] not in SUPPORTED_TYPES:
            raise CheckpointError(f"{path}: model_type '{config['model_type']}' is not supported; "
                                  f"lora_course reads {' and '.join(SUPPORTED_TYPES)} checkpoints")
        if config.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{path}: hidden_act '{config['hidden_act']}' is not supported "
                                  "(Llama and Mistral use 'silu')")
    elif "sliding_window" in config:
        config.setdefault("model_type", "mistral")
    _check_optional(path, config)
    dim, heads = (config["hidden_size"], config["num_attention_heads"]) if fmt == "hf" else (
        config["dim"], config["n_heads"])
    head_dim = config.get("head_dim") or dim // heads
    if head_dim < 2 or head_dim % 2:  # RoPE rotates pairs of features
        source = "key 'head_dim'" if config.get("head_dim") else f"{dim} / {heads} heads"
        raise CheckpointError(f"{path}: attention heads would be {head_dim} wide ({source}); "
                              "RoPE needs an even head width of at least 2")
    try:
        return ModelArgs.from_dict(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def _check_optional(path: Path, config: dict) -> None:
    """Wrong types in optional keys fail here, naming the key, not deep inside the model."""
    wants = {"int": "a positive integer", "float": "a positive number", "bool": "true or false",
             "dict": "an object (or null)"}
    for key, kind in OPTIONAL.items():
        value = config.get(key)
        if value is None:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = {"int": number and isinstance(value, int) and value > 0,
              "float": number and math.isfinite(value) and value > 0,
              "bool": isinstance(value, bool), "dict": isinstance(value, dict)}[kind]
        if not ok:
            raise CheckpointError(f"{path}: key '{key}' must be {wants[kind]}, got {repr(value)[:60]}")
    scaling = config.get("rope_scaling") or {}
    factor = scaling.get("factor")
    if scaling.get("type", scaling.get("rope_type")) == "linear" and not (
            isinstance(factor, (int, float)) and not isinstance(factor, bool) and math.isfinite(factor)
            and factor > 0):
        raise CheckpointError(f"{path}: key 'rope_scaling' of type linear needs a positive 'factor', "
                              f"got {repr(factor)[:60]}")


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of an HF/MLX checkpoint, from the index if there is one."""
    index_path = folder / INDEX
    if index_path.is_file():
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: missing or empty 'weight_map'")
        files = {}
        for tensor, name in weight_map.items():
            parts = Path(str(name)).parts
            if not isinstance(name, str) or Path(name).is_absolute() or ".." in parts or not parts:
                raise CheckpointError(f"{index_path}: tensor '{tensor}' points to '{name}', outside "
                                      "the checkpoint directory; shard names must be plain file names")
            if not (folder / name).is_file():
                raise CheckpointError(f"{index_path}: shard '{name}' (holding tensor '{tensor}') is "
                                      "missing; copy all shards listed in the index")
            files.setdefault(name, folder / name)
        return list(files.values())
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no model.safetensors, {INDEX} or model-*.safetensors found")
    return files


# ----------------------------------------------------------------------------- loading


def load(path=None, lazy: bool = True) -> tuple[Model, Tokenizer]:
    """Load ``(model, tokenizer)`` from a checkpoint directory (HF, MLX or Meta layout).

    ``path=None`` (or ``"base"``) loads the course's embedded base model. With ``lazy``
    the tensors are read from disk on first use; ``lazy=False`` reads them now, one
    file at a time. Any problem raises one :class:`CheckpointError` naming the file.
    """
    folder = resolve(path)
    tokenizer = _load_tokenizer(folder)  # cheap, so a missing one is reported first
    if detect_format(folder) == "meta":
        model = load_meta(folder, lazy)
    else:
        args, files = read_config(folder), weight_files(folder)
        model = _build(args, _quantized_paths(files), folder / "config.json")
        sources = ((f, _mx_load(f)) for f in files)  # one file's tensors at a time
        load_weights(model, sources, folder, lazy)
    if tokenizer.vocab_size > model.args.vocab_size:  # its ids would index past the embedding
        raise CheckpointError(f"{folder / 'tokenizer.model'}: has {tokenizer.vocab_size} pieces but the "
                              f"model's vocab_size is {model.args.vocab_size}; this tokenizer belongs to "
                              "another model")
    return model, tokenizer


def _mx_load(path: Path) -> dict[str, mx.array]:
    try:
        return mx.load(str(path))
    except (RuntimeError, ValueError, OSError) as e:
        reason = str(e).replace("[load_safetensors] ", "").splitlines()[0]
        raise CheckpointError(f"{path}: cannot read safetensors: {reason}") from None


def _quantized_paths(files: list[Path]) -> set[str]:
    """Module paths that have ``.scales`` tensors, i.e. that were saved quantized."""
    paths = set()
    for f in files:
        paths |= {k[: -len(".scales")] for k in _mx_load(f) if k.endswith(".scales")}
    return paths


def _build(args: ModelArgs, quantized: set[str], config_path: Path) -> Model:
    """A model with random lazy weights (never computed), its quantized layers in place."""
    model = Model(args)
    if quantized:
        q = dict(args.quantization or {})
        if "group_size" not in q or "bits" not in q:
            raise CheckpointError(f"{config_path}: the weights are quantized (found "
                                  f"'{sorted(quantized)[0]}.scales') but there is no "
                                  "'quantization' entry with group_size and bits")

        def predicate(path, module):
            if path not in quantized or not hasattr(module, "to_quantized"):
                return False
            return q[path] if isinstance(q.get(path), dict) else True

        nn.quantize(model, q["group_size"], q["bits"], mode=q.get("mode", "affine"),
                    class_predicate=predicate)
        use_dequant_layers(model)  # the same layer classes quantize_model makes (fast on CPU)
    return model


def load_weights(model: Model, sources, where, lazy: bool = True) -> None:
    """Fill ``model`` from ``sources``: pairs ``(file, {name: array})``, one file at a time.

    Every tensor is checked (known name, shape, dtype) before it is used, and every
    parameter must be filled; the first problem raises a :class:`CheckpointError`.
    """
    expected = dict(tree_flatten(model.parameters()))
    args, seen = model.args, set()
    for file, tensors in sources:
        items = []
        for name, value in tensors.items():
            if IGNORED.search(name) or (name == "lm_head.weight" and args.tie_word_embeddings):
                continue
            _check_tensor(file, name, value, expected.get(name), args)
            items.append((name, value))
            seen.add(name)
        model.load_weights(items, strict=False)
        if not lazy:
            mx.eval([v for _, v in items])
        del items, tensors  # drop this file's references before opening the next
    missing = [k for k in expected if k not in seen]
    if missing:
        hint = ""
        if missing[0] == "lm_head.weight":
            hint = "; if the model reuses its embedding as output head, set tie_word_embeddings: true"
        raise CheckpointError(
            f"{where}: tensor '{missing[0]}' (shape {tuple(expected[missing[0]].shape)}) is missing "
            f"from the checkpoint ({len(missing)} missing in all){hint}"
        )


def _check_tensor(file, name: str, value: mx.array, want: mx.array | None, args: ModelArgs) -> None:
    if want is None:
        raise CheckpointError(
            f"{file}: unexpected tensor '{name}' (shape {tuple(value.shape)}); a {args.model_type} "
            f"model with {args.n_layers} layers and tie_word_embeddings={args.tie_word_embeddings} "
            "has no such parameter; does config.json belong to these weights?"
        )
    if want.dtype == mx.uint32:
        ok, expect = value.dtype == mx.uint32, "uint32 (quantized)"
    else:
        ok, expect = value.dtype in FLOATS, "float16, bfloat16 or float32"
    if not ok:
        raise CheckpointError(f"{file}: tensor '{name}' has dtype {_name(value.dtype)}, expected {expect}; "
                              "re-save the checkpoint with a supported dtype")
    if tuple(value.shape) != tuple(want.shape):
        if (name in ("model.embed_tokens.weight", "lm_head.weight") and value.ndim == 2
                and value.shape[0] != args.vocab_size):
            raise CheckpointError(
                f"{file}: tensor '{name}' has {value.shape[0]} rows (shape {tuple(value.shape)}) but "
                f"config vocab_size is {args.vocab_size} (expects {tuple(want.shape)}); fix "
                "vocab_size in the config to match the embedding"
            )
        raise CheckpointError(f"{file}: tensor '{name}' has shape {tuple(value.shape)}, but the "
                              f"model built from the config expects {tuple(want.shape)}")


def _load_tokenizer(folder: Path) -> Tokenizer:
    if not (folder / "tokenizer.model").is_file():
        raise CheckpointError(f"{folder}: no tokenizer.model (a SentencePiece model); lora_course "
                              "needs the tokenizer.model that came with the checkpoint")
    return Tokenizer(folder / "tokenizer.model")


# ----------------------------------------------------------------------------- saving


def _quantized_modules(model) -> dict[str, nn.Module]:
    return {p: m for p, m in model.named_modules() if hasattr(m, "scales") and hasattr(m, "bits")}


def _quantization_config(model) -> dict | None:
    """``{"group_size", "bits"}`` of the quantized layers, plus per-layer entries that differ."""
    mods = _quantized_modules(model)
    if not mods:
        return None
    first = next(iter(mods.values()))
    q = {"group_size": first.group_size, "bits": first.bits}
    if getattr(first, "mode", "affine") != "affine":
        q["mode"] = first.mode
    for path, m in mods.items():
        if (m.group_size, m.bits) != (q["group_size"], q["bits"]):
            q[path] = {"group_size": m.group_size, "bits": m.bits}
    return q


def hf_weights(model: Model) -> dict[str, mx.array]:
    """The model's tensors as a plain HF checkpoint: dequantized, RoPE in HF's layout."""
    weights = dict(tree_flatten(model.parameters()))
    for path, m in _quantized_modules(model).items():
        if getattr(m, "mode", "affine") != "affine":
            raise CheckpointError(f"layer '{path}': mode '{m.mode}' quantization cannot be "
                                  "written in HF format; save with format='mlx'")
        weights[f"{path}.weight"] = dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits)
        del weights[f"{path}.scales"], weights[f"{path}.biases"]
    if model.args.rope_traditional:
        for name in list(weights):
            if re.search(r"self_attn\.[qk]_proj\.(weight|bias)$", name):
                heads = model.args.n_heads if ".q_proj." in name else model.args.n_kv_heads
                weights[name] = interleaved_to_halves(weights[name], heads)
    return weights


def _name(dtype: mx.Dtype) -> str:
    return str(dtype).split(".")[-1]  # mlx.core.bfloat16 -> bfloat16


def _dtype_name(weights: dict[str, mx.array]) -> str:
    return next((_name(v.dtype) for v in weights.values() if v.dtype in FLOATS), "float32")


def save(model: Model, tokenizer: Tokenizer | None, path, format: str = "mlx",
         shard_size_mb: float = DEFAULT_SHARD_MB) -> Path:
    """Write ``model`` (and ``tokenizer``) as a checkpoint directory at ``path``, atomically.

    ``format="mlx"`` keeps quantized layers and RoPE layout as they are; ``format="hf"``
    writes a plain Hugging Face checkpoint (dequantized, HF RoPE layout) that
    ``transformers.AutoModelForCausalLM.from_pretrained`` loads. Weights above
    ``shard_size_mb`` are split into shards with an index. An existing directory is
    replaced only if it holds nothing but checkpoint files.
    """
    if format not in ("mlx", "hf"):
        raise CheckpointError(f"save: format must be 'mlx' or 'hf', got {format!r}")
    names = [k for k, _ in tree_flatten(model.parameters())]
    lora = next((k for k in names if ".lora_" in k), None)
    if lora:
        raise CheckpointError(f"save: the model still has adapter parameters ('{lora}'); merge them "
                              "first with lora_course.fuse(model), or save the adapters alone")
    path = Path(path)
    _check_replaceable(path)
    args = model.args
    if format == "hf":
        weights = hf_weights(model)
        config = {k: v for k, v in args.to_hf_dict().items() if k != "quantization"}
    else:
        weights = dict(tree_flatten(model.parameters()))
        config = args.to_hf_dict()
        config.pop("quantization", None)
        quantization = _quantization_config(model)  # read from the layers, not trusted from args
        if quantization:
            config["quantization"] = quantization
        if args.rope_traditional:
            config["rope_traditional"] = True
    config["torch_dtype"] = config["dtype"] = _dtype_name(weights)
    if tokenizer is not None:
        config["bos_token_id"], config["eos_token_id"] = tokenizer.bos_id, tokenizer.eos_id

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = atomic.temp_dir(path)  # the new version is built beside the old, then swapped in
    except OSError as e:
        raise CheckpointError(f"{path}: cannot write here ({e.strerror}); nothing was changed") from None
    try:
        _write_shards(tmp, weights, shard_size_mb, {"format": "pt" if format == "hf" else "mlx"})
        del weights
        atomic.write_json(tmp / "config.json", config)
        if tokenizer is not None:
            tokenizer.save(tmp)
        atomic.fsync_files(tmp)
        atomic.replace_dir(tmp, path)
    except (OSError, RuntimeError) as e:  # mx.save_safetensors reports a full disk as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        why = getattr(e, "strerror", None) or e
        raise CheckpointError(f"{path}: writing the checkpoint failed ({why}); "
                              "the previous contents are unchanged") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _check_replaceable(path: Path) -> None:
    if not path.exists():
        return
    if not path.is_dir():
        raise CheckpointError(f"{path}: exists and is a file; save needs a directory path")
    for child in path.iterdir():
        if child.is_dir() or not CHECKPOINT_FILES.match(child.name):
            raise CheckpointError(f"{path}: exists and holds '{child.name}', which is not a checkpoint "
                                  "file; save to a new or empty directory (nothing was written)")


def _write_shards(folder: Path, weights: dict, shard_size_mb: float, metadata: dict) -> None:
    limit = shard_size_mb * 2**20
    shards, current, size = [], {}, 0
    for name in sorted(weights):
        nbytes = weights[name].nbytes
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = {}, 0
        current[name] = weights[name]
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        mx.save_safetensors(str(folder / "model.safetensors"), shards[0], metadata=metadata)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(folder / file), shard, metadata=metadata)  # evaluates this shard only
        weight_map.update({k: file for k in shard})
        total += sum(v.nbytes for v in shard.values())
    shards.clear()
    atomic.write_json(folder / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})


# ----------------------------------------------------------------------------- moved out
# The Meta / Mistral reader and ``convert`` build on this module, so they are imported
# last (load() and hf_weights() call them); their names stay importable from here.
from lora_course.meta_format import META_NAMES, interleaved_to_halves, load_meta, meta_to_hf_name  # noqa: E402,F401
from lora_course.conversion import add_convert_command, convert  # noqa: E402,F401
