"""Adapters: the LoRA and DoRA layers, the model surgery that places them, and their files.

``lora`` and ``dora`` are the layers; ``apply`` chooses between them (``apply_lora``,
``fuse``, counts); ``files`` reads and writes adapters in mlx-lm's and PEFT's formats.
Taught in notebooks 05 (LoRA from the math up) and 06 (DoRA, full fine-tuning, merging).
"""

from lora_course.adapters.apply import (
    LoRAConfig,
    apply_lora,
    count_parameters,
    fuse,
    print_trainable_parameters,
)
from lora_course.adapters.dora import DoRALinear
from lora_course.adapters.files import convert_peft_adapter, load_adapters, save_adapters
from lora_course.adapters.format import AdapterError
from lora_course.adapters.lora import LoRALinear, lora_scale

__all__ = [
    "LoRALinear",
    "lora_scale",
    "DoRALinear",
    "LoRAConfig",
    "apply_lora",
    "count_parameters",
    "fuse",
    "print_trainable_parameters",
    "AdapterError",
    "convert_peft_adapter",
    "load_adapters",
    "save_adapters",
]
