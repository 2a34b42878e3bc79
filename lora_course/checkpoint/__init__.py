"""Checkpoints on disk: load and save weights folders in the ecosystem's layouts.

``files`` (find and read) -> ``config`` (ModelArgs from config.json / params.json) ->
``weights`` (fill a model, every tensor checked) -> ``meta`` (Meta / Mistral originals)
-> ``save`` -> ``load``. Taught in notebook 04 (checkpoints, tokenizers and sampling).
"""

from lora_course.checkpoint.config import read_config
from lora_course.checkpoint.files import CheckpointError, resolve, weight_files
from lora_course.checkpoint.load import load
from lora_course.checkpoint.meta import interleaved_to_halves, load_meta, meta_to_hf_name
from lora_course.checkpoint.save import hf_weights, save
from lora_course.checkpoint.weights import load_weights

__all__ = [
    "CheckpointError",
    "resolve",
    "weight_files",
    "read_config",
    "load_weights",
    "interleaved_to_halves",
    "load_meta",
    "meta_to_hf_name",
    "hf_weights",
    "save",
    "load",
]
