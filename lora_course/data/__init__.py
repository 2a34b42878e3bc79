"""Data: dataset files in, tokenized samples and batches out; the docstring Q/A set and the corpus.

Taught in notebooks 09 (data) and 12 (pretraining the base model).
"""

from lora_course.data.batching import iterate_batches
from lora_course.data.datasets import DatasetSplits, TokenizedDataset, load_dataset
from lora_course.data.docstrings import build_docstring_dataset
from lora_course.data.records import DatasetError, DatasetWarning

__all__ = [
    "DatasetError",
    "DatasetWarning",
    "DatasetSplits",
    "TokenizedDataset",
    "load_dataset",
    "iterate_batches",
    "build_docstring_dataset",
]
