"""Recipes: whole jobs built from the parts below, and the ``lora-course`` command line.

``finetune`` (one call from a model and data to a fine-tuned model), ``convert``,
``pretrain`` (the course's base model), ``quickstart``, and ``cli`` that wires every
subcommand.
"""
