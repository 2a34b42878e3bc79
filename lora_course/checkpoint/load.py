"""Loading a checkpoint: ``load(path) -> (model, tokenizer)`` from any layout we read.

Three directory layouts are read, told apart by the files they hold, plus single files
and Hub ids:

- **HF** (``config.json`` + ``model.safetensors``, or shards listed in
  ``model.safetensors.index.json``): the Hugging Face layout. Tensor names are already
  ours (``model.layers.0.self_attn.q_proj.weight``), so loading is a lookup.
- **MLX**: what :func:`save` writes. The same layout, plus an optional ``quantization``
  entry (``group_size``, ``bits``) in ``config.json`` as mlx-community models carry; the
  quantized layers are built first, then filled.
- **Meta / Mistral originals** (``params.json`` + ``consolidated.*.pth``): read by
  ``meta.py``, which renames Meta's tensors (``layers.0.attention.wq.weight``) to
  ours and joins model-parallel shards. Their RoPE rotates interleaved feature pairs
  (Su et al., 2021, "RoFormer"), so the model is built with ``rope_traditional=True``
  rather than permuting the weights. ``.pth`` files are read with
  ``torch.load(weights_only=True)``, which refuses pickled code.
- **GGUF** (one ``.gguf`` file, as llama.cpp, Ollama and LM Studio keep models): read by
  ``gguf_read.py``; Q4_0 / Q4_1 / Q8_0 layers stay quantized.
- **Hub ids** (``org/name``): fetched into, or found in, the Hugging Face cache
  (``hub.py``), then read as an HF folder. A local path of that name always wins.

Loading is lazy: ``mx.load`` maps tensors without reading them, each tensor is checked
against the shape the config implies and then handed to the model, so there is never
a second full copy of the weights. The tokenizer is ``tokenizer.json`` (Hugging Face
``tokenizers``) or ``tokenizer.model`` (SentencePiece), whichever the folder has.

Taught in notebook 04 (checkpoints, tokenizers and sampling).
"""

from __future__ import annotations

from pathlib import Path

from lora_course.checkpoint.config import read_config
from lora_course.checkpoint.files import (
    CheckpointError,
    detect_format,
    is_gguf,
    mx_load,
    resolve,
    weight_files,
)
from lora_course.checkpoint.gguf_read import load_gguf
from lora_course.checkpoint.meta import load_meta
from lora_course.checkpoint.weights import build, load_weights, quantized_paths
from lora_course.model.transformer import Model
from lora_course.tokenizer.hf import HFTokenizer
from lora_course.tokenizer.load import load_tokenizer
from lora_course.tokenizer.spm import Tokenizer


def load(path=None, lazy: bool = True) -> tuple[Model, Tokenizer]:
    """Load ``(model, tokenizer)`` from a checkpoint directory (HF, MLX or Meta layout).

    ``path=None`` (or ``"base"``) loads the course's embedded base model. With ``lazy``
    the tensors are read from disk on first use; ``lazy=False`` reads them now, one
    file at a time. Any problem raises one :class:`CheckpointError` naming the file.
    """
    if is_gguf(path):  # one llama.cpp file, not a directory (gguf_read.py)
        return load_gguf(path, lazy)
    folder = resolve(path)
    tokenizer = _load_tokenizer(folder)  # cheap, so a missing one is reported first
    if detect_format(folder) == "meta":
        model = load_meta(folder, lazy)
    else:
        args, files = read_config(folder), weight_files(folder)
        model = build(args, quantized_paths(files), folder / "config.json")
        sources = ((f, mx_load(f)) for f in files)  # one file's tensors at a time
        load_weights(model, sources, folder, lazy)
    if tokenizer.vocab_size > model.args.vocab_size:  # its ids would index past the embedding
        raise CheckpointError(
            f"{tokenizer.path}: has {tokenizer.vocab_size} pieces but the "
            f"model's vocab_size is {model.args.vocab_size}; this tokenizer belongs to "
            "another model"
        )
    return model, tokenizer


def _load_tokenizer(folder: Path) -> Tokenizer | HFTokenizer:
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise CheckpointError(
            f"{folder}: no tokenizer.model or tokenizer.json; lora_course "
            "needs the tokenizer files that came with the checkpoint"
        )
    return load_tokenizer(folder)
