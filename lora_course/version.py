"""The version of lora_course (one place; the package, the CLI and notebooks read it)."""

__version__ = "0.1.0"
