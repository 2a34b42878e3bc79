"""Greedy generation, batch 1: prompt processing and decoding tokens/s.

The same weights (``weights.py``) and the same random prompt go to
``lora_course.model.generate.generate_tokens`` and to ``mlx_lm.generate.generate_step``
(greedy: mlx-lm's default sampler is argmax). Each run is timed from the call to
the first new token (prompt processing, "prefill": prompt_len / that time) and from
the first to the last new token (decoding: (gen_tokens - 1) / that time), in wall time
and in process CPU time. The runner asserts that both produce the same token ids.
"""

from __future__ import annotations

import statistics
import time

from benchmarks import measure
from benchmarks.weights import load_into_mlx, load_npz

REPEATS = 3  # timed generations per run, after one untimed


def _timed(generate_ids, cfg) -> dict:
    """Run ``generate_ids()`` (an iterator of ints) 1 + REPEATS times; medians of the timed ones."""
    import mlx.core as mx

    def once():
        t0, c0 = time.perf_counter(), time.process_time()
        ids, t_first, c_first = [], None, None
        for t in generate_ids():
            if t_first is None:
                t_first, c_first = time.perf_counter(), time.process_time()
            ids.append(int(t))
        t_end, c_end = time.perf_counter(), time.process_time()
        return t_first - t0, t_end - t_first, ids, c_first - c0, c_end - c_first

    runs = [once()]  # untimed
    mx.clear_cache()
    mx.reset_peak_memory()
    rss_method = measure.reset_peak_rss()
    with measure.watch_load() as load:
        runs += [once() for _ in range(REPEATS)]
    timed = runs[1:]
    prefill_s = statistics.median(r[0] for r in timed)
    decode_s = statistics.median(r[1] for r in timed)
    if any(r[2] != runs[0][2] for r in runs):
        raise AssertionError("greedy generation is not deterministic across repeats")
    return {
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "prefill_cpu_s": statistics.median(r[3] for r in timed),
        "decode_cpu_s": statistics.median(r[4] for r in timed),
        "prefill_tokens_per_s": cfg.prompt_len / prefill_s,
        "decode_tokens_per_s": (cfg.gen_tokens - 1) / max(decode_s, 1e-9),
        "ids": runs[0][2],
        "peak_rss_mib": measure.peak_rss_mib(rss_method),
        "rss_method": rss_method,
        "mlx_peak_mib": mx.get_peak_memory() / 2**20,
        "load": load,
    }


def run_lora_course(cfg, weights_path, data_path, quant: bool = False) -> dict:
    from lora_course import Model, ModelArgs
    from lora_course.model.generate import generate_tokens

    args = ModelArgs.from_dict(cfg.hf_config())
    model = Model(args)
    load_into_mlx(model, weights_path)
    prompt = [int(t) for t in load_npz(data_path)["prompt"]]
    return _timed(lambda: generate_tokens(model, prompt, max_tokens=cfg.gen_tokens, temp=0.0), cfg)


def run_mlx_lm(cfg, weights_path, data_path, quant: bool = False) -> dict:
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.models.llama import Model, ModelArgs

    args = ModelArgs(**cfg.hf_config())
    model = Model(args)
    load_into_mlx(model, weights_path)
    prompt = mx.array(load_npz(data_path)["prompt"])

    def ids():
        for token, _ in generate_step(prompt, model, max_tokens=cfg.gen_tokens):
            yield token

    return _timed(ids, cfg)


RUNNERS = {"lora_course": run_lora_course, "mlx_lm": run_mlx_lm}
