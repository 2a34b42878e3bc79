"""Benchmarks: lora_course against mlx-lm and PyTorch + PEFT, on identical work.

Run ``python -m benchmarks.run`` from the repository root (``--help`` for options).
Every measurement runs in a fresh subprocess (``benchmarks/worker.py``), because
which BLAS MLX calls is fixed per process by what was loaded before ``mlx.core``.
Nothing in this package imports ``mlx`` or ``lora_course`` at import time, so the
orchestrator stays neutral and each worker sets its own BLAS up first.

Modules: ``configs`` (model shapes), ``flops`` (analytic FLOP counts), ``weights``
(seeded random checkpoints shared by all peers), ``blas`` (per-process BLAS setup),
``measure`` (timing and peak memory inside a worker), ``train_step`` (LoRA and QLoRA
steps), ``generation``, ``gemm`` (the machine's measured GEMM rate), ``jobs`` (whole
jobs: quickstart, notebooks), ``summary`` (medians, ratios, checks, targets),
``report`` (table and plot), ``worker`` and ``run``. ``qlora_step.py`` is a
stand-alone QLoRA vs fp32 script. See ``benchmarks/README.md``.
"""
