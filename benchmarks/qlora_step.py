"""QLoRA vs fp32 LoRA: tokens per second and peak memory of one training step.

Three ways to train the same LoRA adapters (rank 8 on every linear of every block):

- ``fp32``:   the base model in float32, as is;
- ``qlora``:  the base quantized with lora_course.quantize_model (4 bits, group 64),
              whose DequantLinear layers dequantize into a BLAS matmul on CPU;
- ``stock``:  the same quantized weights in MLX's own nn.QuantizedLinear
              (mx.quantized_matmul forward and backward), what mlx-lm uses.

Each variant runs in a fresh process so that ``mx.get_peak_memory()`` sees only it;
variants alternate for ``--rounds`` rounds and the fastest step counts, because other
processes may share the cores. The step is nn.value_and_grad + mlx.optimizers.Adam,
evaluated with mx.eval (``--compile``: the whole step mx.compile'd, as lora_course.train does).

    python benchmarks/qlora_step.py                 # all three, default config
    python benchmarks/qlora_step.py --variants fp32 qlora --steps 10
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("fp32", "qlora", "stock")


def run_variant(opts) -> dict:
    import lora_course  # noqa: F401  (BLAS before mlx)
    from lora_course import Model, ModelArgs, apply_lora
    from lora_course.quant.dequant import DequantLinear
    from lora_course.quant.layers import quantize_model
    from lora_course.quant.size import model_size

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    mx.random.seed(0)
    args = ModelArgs(
        dim=opts.dim,
        n_layers=opts.layers,
        hidden_dim=opts.hidden,
        n_heads=opts.heads,
        n_kv_heads=opts.kv_heads,
        vocab_size=opts.vocab,
    )
    model = Model(args)
    mx.eval(model.parameters())
    if opts.variant != "fp32":
        linear_class = nn.QuantizedLinear if opts.variant == "stock" else DequantLinear
        quantize_model(model, group_size=opts.group_size, bits=opts.bits, linear_class=linear_class)
        mx.eval(model.parameters())
    apply_lora(model, num_layers=opts.layers, rank=opts.rank, alpha=2.0 * opts.rank)
    mx.eval(model.parameters())
    size = model_size(model)
    mx.clear_cache()
    mx.reset_peak_memory()

    def loss_fn(model, x, y):
        return nn.losses.cross_entropy(model(x), y, reduction="mean")

    step_grad = nn.value_and_grad(model, loss_fn)
    optimizer = optim.Adam(learning_rate=1e-4)
    tokens = mx.random.randint(0, opts.vocab, (opts.batch, opts.seq + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]  # (B, L) inputs and next-token targets
    mx.eval(x, y)

    def update(x, y):
        loss, grads = step_grad(model, x, y)
        optimizer.update(model, grads)
        return loss

    if opts.compile:  # as lora_course.train does by default
        state = [model.state, optimizer.state]
        update = mx.compile(update, inputs=state, outputs=state)

    def step():
        loss = update(x, y)
        mx.eval(loss, model.trainable_parameters(), optimizer.state)
        return loss.item()

    steps = opts.stock_steps if opts.variant == "stock" else opts.steps
    for _ in range(opts.warmup):
        step()
    walls, cpus, losses = [], [], []
    for _ in range(steps):
        wall, cpu = time.perf_counter(), time.process_time()
        losses.append(step())
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    seconds = min(walls)  # the least disturbed step: other processes share these cores
    return {
        "variant": opts.variant,
        "tokens_per_s": opts.batch * opts.seq / seconds,
        "step_s": seconds,
        "median_step_s": sorted(walls)[len(walls) // 2],
        "cpu_s": min(cpus),
        "peak_mib": mx.get_peak_memory() / 2**20,
        "model_mib": size.total_bytes / 2**20,
        "bits_per_weight": size.bits_per_weight,
        "loss": losses[-1],
        "steps": steps,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1408, help="SwiGLU inner width")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="timed steps (fp32 and qlora)")
    p.add_argument("--stock-steps", type=int, default=2, help="timed steps for the slow stock path")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="mx.compile the step (model + optimizer)")
    p.add_argument("--rounds", type=int, default=2, help="fresh processes per variant, alternating")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # child process
    opts = p.parse_args(argv)

    if opts.variant:  # we are the child: measure one variant, print one JSON line
        print(json.dumps(run_variant(opts)))
        return 0

    forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
    best = {}
    for _ in range(opts.rounds):  # alternate the variants, keep each one's fastest round
        for variant in opts.variants:
            out = subprocess.run(
                [sys.executable, __file__, *forwarded, "--variant", variant],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            r = json.loads(out.strip().splitlines()[-1])
            if variant not in best or r["step_s"] < best[variant]["step_s"]:
                best[variant] = r
    results = [best[v] for v in opts.variants]
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=1))
    print(
        f"dim {opts.dim}, {opts.layers} layers, hidden {opts.hidden}, vocab {opts.vocab}, "
        f"seq {opts.seq}, batch {opts.batch}, LoRA rank {opts.rank} on all linears, "
        f"{opts.bits}-bit group {opts.group_size}{', compiled' if opts.compile else ''}"
    )
    base = next((r for r in results if r["variant"] == "fp32"), None)
    print(
        f"{'variant':8} {'tok/s':>8} {'vs fp32':>8} {'cpu s/step':>10} {'peak MiB':>9} "
        f"{'model MiB':>10} {'bits/w':>7}"
    )
    for r in results:
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        print(
            f"{r['variant']:8} {r['tokens_per_s']:8.0f} {ratio:>8} {r['cpu_s']:10.2f} "
            f"{r['peak_mib']:9.1f} {r['model_mib']:10.1f} {r['bits_per_weight']:7.2f}"
        )
    print("tok/s from the fastest timed step of the fastest round; cpu s/step: process CPU time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
