"""One LoRA (or QLoRA) training step in each peer, on the same weights and tokens.

Every peer does the same work: forward over (batch, seq) random tokens, mean
cross-entropy over all positions, gradients for the rank-r adapters on all seven
linears of every block, and one Adam update (lr 1e-4, no weight decay).

- ``lora_course``: ``lora_course.training.step.make_step`` (the trainer's step: accumulate,
  normalize by tokens, grad norm, update) compiled the way ``lora_course.training.trainer``
  compiles it, with ``apply_lora`` and, for QLoRA, ``quantize_model`` (DequantLinear), and
  the trainer's default loss (chunked cross-entropy from a 32k vocabulary up).
- ``lora_course_full_logits``: the same with the plain loss (the full logits at once);
  run only where the two differ (vocabulary >= 32k), to show the memory chunking saves.
- ``mlx_lm``: ``mlx_lm.models.llama.Model``, ``mlx_lm.tuner.utils.linear_to_lora_layers``,
  ``mlx_lm.tuner.trainer.default_loss``, ``nn.value_and_grad`` and ``optim.Adam``, with the
  step compiled as mlx-lm's trainer compiles it (``state = [model.state,
  optimizer.state, mx.random.state]``); QLoRA quantizes with ``nn.quantize``.
  Run with MLX's stock BLAS and with the BLAS lora_course uses (``blas.py``).
- ``torch_peft``: ``transformers.LlamaForCausalLM`` + ``peft.get_peft_model``, fp32,
  eager, ``torch.optim.Adam``, ``torch.set_num_threads(<cores>)``. PEFT's 4-bit
  QLoRA needs bitsandbytes and a CUDA GPU, so it has no CPU QLoRA row.
- ``torch_peft_1t``: the same with one thread. On our shared 2-core machine PyTorch's
  GNU OpenMP made 2-thread GEMMs of these shapes 5-20x slower than 1-thread ones when
  another process held a core (measured: 512x256 @ 256x256 took 20 ms on 2 threads,
  0.9 ms on 1), so we show both and compare against the faster.

Quantization (QLoRA): 4-bit affine, group 64, every block linear; the embedding and
the output head stay float32 in both MLX peers (lora_course's default predicate).
"""

from __future__ import annotations

import os
import statistics

from benchmarks import measure
from benchmarks.weights import load_into_mlx, load_npz

PEFT_QLORA_SKIP = (
    "PEFT's 4-bit QLoRA needs bitsandbytes, which runs on CUDA GPUs only; "
    "there is no CPU QLoRA in PyTorch + PEFT to compare"
)


def _mlx_result(timing, cfg, rss_method) -> dict:
    import mlx.core as mx

    return {
        "step_s": timing["median_s"],
        "times_s": timing["times_s"],
        "cpu_s": timing["cpu_s"],
        "tokens_per_s": cfg.tokens_per_step / timing["median_s"],
        "peak_rss_mib": measure.peak_rss_mib(rss_method),
        "rss_method": rss_method,
        "mlx_peak_mib": mx.get_peak_memory() / 2**20,
        "gemm_probe_gflops": statistics.median(timing["probes"]),
        "load": timing["load"],
    }


def _mlx_tokens(data_path):
    import mlx.core as mx

    tokens = mx.array(load_npz(data_path)["tokens"])  # (B, L + 1)
    mx.eval(tokens)
    return tokens


def _reset_mlx_memory():
    import mlx.core as mx

    mx.clear_cache()
    mx.reset_peak_memory()
    return measure.reset_peak_rss()


def lora_course_step(cfg, quant: bool = False, load_weights=None):
    """lora_course's compiled training step on ``cfg``'s shape, as the trainer builds it:
    ``(update, state)``. ``load_weights(model)`` fills the weights (else they stay random)."""
    from lora_course import Model, ModelArgs, apply_lora, quantize_model
    from lora_course.training.chunked_loss import default_loss
    from lora_course.training.step import enable_grad_checkpoint, make_step

    import mlx.core as mx
    import mlx.optimizers as optim

    args = ModelArgs.from_dict(cfg.hf_config())
    mx.random.seed(cfg.seed)
    model = Model(args)
    if load_weights is not None:
        load_weights(model)
    if quant:
        # peer lora_course_qembed: the embedding (and so the tied head) quantized as well
        embed = bool(cfg.extra.get("quantize_embedding"))
        quantize_model(model, group_size=cfg.group_size, bits=cfg.bits, quantize_embedding=embed)
    apply_lora(model, num_layers=-1, keys=list(cfg.keys), rank=cfg.rank, alpha=cfg.alpha)
    model.train()
    if cfg.extra.get("grad_checkpoint"):  # peer lora_course_ckpt: recompute each block
        enable_grad_checkpoint(model)
    optimizer = optim.Adam(learning_rate=1e-4)
    optimizer.init(model.trainable_parameters())

    # As lora_course.training.trainer.train does it: make_step, then compile with the state.
    # the trainer's loss: chunked over positions from a 32k vocabulary up (peer
    # lora_course_full_logits: the plain loss, for the memory comparison)
    loss = default_loss(model, cfg.extra.get("loss_chunk_size"))
    _, update = make_step(model, optimizer, loss)
    state = [model.state, optimizer.state, mx.random.state]
    mx.eval(state)
    return mx.compile(update, inputs=state, outputs=state), state


def run_lora_course(cfg, weights_path, data_path, quant: bool) -> dict:
    import mlx.core as mx

    update, state = lora_course_step(cfg, quant, lambda model: load_into_mlx(model, weights_path))
    tokens = _mlx_tokens(data_path)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]  # (B, L) each
    mask = mx.ones(inputs.shape, mx.float32)
    mx.eval(inputs, targets, mask)
    losses = []

    def step():
        value, ntoks, gnorm = update(inputs, targets, mask, None)
        mx.eval(state, value, ntoks, gnorm)
        losses.append(value.item())
        return losses[-1]

    rss = {}
    timing = measure.time_calls(
        step, cfg, before_timing=lambda: rss.update(m=_reset_mlx_memory()), probe=measure.mlx_gemm_probe()
    )
    return {**_mlx_result(timing, cfg, rss["m"]), "first_loss": losses[0], "last_loss": losses[-1]}


def run_mlx_lm(cfg, weights_path, data_path, quant: bool) -> dict:
    from functools import partial

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.nn.utils import average_gradients
    from mlx_lm.models.llama import Model, ModelArgs
    from mlx_lm.tuner.trainer import default_loss
    from mlx_lm.tuner.utils import linear_to_lora_layers

    args = ModelArgs(**cfg.hf_config())
    mx.random.seed(cfg.seed)
    model = Model(args)
    load_into_mlx(model, weights_path)
    if quant:
        nn.quantize(
            model,
            group_size=cfg.group_size,
            bits=cfg.bits,
            class_predicate=lambda path, m: isinstance(m, nn.Linear) and path != "lm_head",
        )
    model.freeze()  # as mlx_lm.lora does before converting
    linear_to_lora_layers(
        model, cfg.n_layers, {"rank": cfg.rank, "scale": cfg.scale, "dropout": 0.0, "keys": list(cfg.keys)}
    )
    model.train()
    optimizer = optim.Adam(learning_rate=1e-4)
    loss_value_and_grad = nn.value_and_grad(model, default_loss)
    state = [model.state, optimizer.state, mx.random.state]

    # mlx_lm.tuner.trainer.train's step, as written there (no accumulation, one process).
    @partial(mx.compile, inputs=state, outputs=state)
    def train_step(batch, prev_grad, do_update):
        (lvalue, toks), grad = loss_value_and_grad(model, *batch)
        if prev_grad is not None:
            grad = {k: grad[k] + prev_grad[k] for k in grad}
        if do_update:
            grad = average_gradients(grad)
            optimizer.update(model, grad)
            grad = None
        return lvalue, toks, grad

    tokens = _mlx_tokens(data_path)
    lengths = mx.array([[0, cfg.seq]] * cfg.batch)  # (B, 2): offset 0, all positions carry loss
    mx.eval(lengths)
    losses = []

    def step():
        lvalue, toks, _ = train_step((tokens, lengths), None, True)
        mx.eval(state, lvalue, toks)
        losses.append(lvalue.item())
        return losses[-1]

    rss = {}
    timing = measure.time_calls(
        step, cfg, before_timing=lambda: rss.update(m=_reset_mlx_memory()), probe=measure.mlx_gemm_probe()
    )
    return {**_mlx_result(timing, cfg, rss["m"]), "first_loss": losses[0], "last_loss": losses[-1]}


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def build_peft_model(cfg, weights_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        tie_word_embeddings=cfg.tie,
        attention_bias=False,
        mlp_bias=False,
        use_cache=False,
    )
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(config).float()
    state = {k: torch.from_numpy(v) for k, v in load_npz(weights_path).items()}
    if cfg.tie:  # one tensor, two names in the state dict
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    del state
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=sorted({k.split(".")[-1] for k in cfg.keys}),
    )
    return get_peft_model(model, lora)


def run_torch_peft(cfg, weights_path, data_path, quant: bool) -> dict:
    if quant:
        return {"skipped": PEFT_QLORA_SKIP}
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(cfg.extra.get("torch_threads", cores()))
    model = build_peft_model(cfg, weights_path)
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tokens = torch.from_numpy(load_npz(data_path)["tokens"]).long()
    inputs, targets = tokens[:, :-1], tokens[:, 1:]  # (B, L) each
    losses = []

    def step():
        logits = model(input_ids=inputs, use_cache=False).logits  # (B, L, V)
        value = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(value.item())
        return losses[-1]

    rss = {}
    timing = measure.time_calls(
        step,
        cfg,
        before_timing=lambda: rss.update(m=measure.reset_peak_rss()),
        probe=measure.torch_gemm_probe(),
    )
    return {
        "step_s": timing["median_s"],
        "times_s": timing["times_s"],
        "cpu_s": timing["cpu_s"],
        "gemm_probe_gflops": statistics.median(timing["probes"]),
        "tokens_per_s": cfg.tokens_per_step / timing["median_s"],
        "peak_rss_mib": measure.peak_rss_mib(rss["m"]),
        "rss_method": rss["m"],
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "torch_threads": torch.get_num_threads(),
        "load": timing["load"],
    }


RUNNERS = {"lora_course": run_lora_course, "mlx_lm": run_mlx_lm, "torch_peft": run_torch_peft}
