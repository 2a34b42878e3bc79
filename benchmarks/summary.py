"""From per-round worker results to the figures we report: medians, ratios, checks, targets.

A row is one (benchmark, configuration, peer): medians over rounds of each run's
median. A ratio pairs lora_course and a peer measured in the same round and takes the
median over rounds (load drifts hit both sides of a pair alike). The checks confirm the
peers did the same work; the targets are issue 8's (and issue 5's QLoRA one), each met
or missed with its measured value.
"""

from __future__ import annotations

import statistics

from benchmarks.configs import BenchConfig
from benchmarks.flops import generation_flops, train_step_flops


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(bench: str, cfg: BenchConfig, peer: str, runs: list[dict], gemm_rate: float | None) -> dict:
    ok = [r for r in runs if "error" not in r and "skipped" not in r]
    row = {"bench": bench, "config": cfg.name, "peer": peer, "rounds": len(ok)}
    if not ok:
        first = runs[0] if runs else {}
        row["status"] = (
            first.get("skipped")
            and f"skipped: {first['skipped']}"
            or f"error: {first.get('error', 'not run')}"
        )
        return row
    row["status"] = "ok" if len(ok) == len(runs) else f"ok in {len(ok)} of {len(runs)} rounds"
    for key in (
        "tokens_per_s",
        "step_s",
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
        "peak_rss_mib",
        "mlx_peak_mib",
        "first_loss",
        "last_loss",
        "blas_check_gflops_512",
        "gemm_probe_gflops",
        "cpu_s",
        "prefill_cpu_s",
        "decode_cpu_s",
        "load_s",
        "file_bytes",
        "weight_bytes",
        "rss_before_mib",
        "peak_over_weights",
    ):
        vals = [r.get(key) for r in ok]
        if any(v is not None for v in vals):
            row[key] = _median(vals)
            if key.endswith("tokens_per_s"):
                row[key + "_runs"] = vals
    if bench in ("lora", "qlora"):
        flops = train_step_flops(cfg)["total"]
        row["gflops"] = flops / row["step_s"] / 1e9
        if gemm_rate:
            row["gemm_fraction"] = row["gflops"] / gemm_rate
        # the same, against a GEMM timed in the worker between its steps (same load)
        probes = [
            (flops / r["step_s"] / 1e9) / r["gemm_probe_gflops"] for r in ok if r.get("gemm_probe_gflops")
        ]
        if probes:
            row["gemm_fraction_paired"] = statistics.median(probes)
    if bench == "generation":
        row["ids"] = ok[0]["ids"]
        row["ids_equal_across_rounds"] = all(r["ids"] == ok[0]["ids"] for r in ok)
        g = generation_flops(cfg)
        row["prefill_gflops"] = g["prefill"] / ok[0]["prefill_s"] / 1e9 if ok[0]["prefill_s"] else None
    loads = [r.get("load") or {} for r in ok]
    others = [x["other_cores"] for x in loads if x.get("other_cores") is not None]
    row["other_cores"] = _median(others)  # other processes' CPU use during the timed steps
    row["other_cores_max"] = max(others) if others else None
    row["busy_rounds"] = sum(bool(x.get("busy")) for x in loads)
    row["load_average"] = [x.get("load_average_start") for x in loads]
    row["attempts"] = sum(r.get("attempts", 1) for r in ok)
    row["rss_method"] = ok[0].get("rss_method")
    row["preloaded_blas"] = ok[0].get("preloaded_blas")
    row["mapped_blas"] = ok[0].get("mapped_blas")
    row["versions"] = ok[0].get("versions")
    if "torch_threads" in ok[0]:
        row["torch_threads"] = ok[0]["torch_threads"]
    return row


def paired_ratio(runs_a: list[dict], runs_b: list[dict], key: str) -> float | None:
    """Median over rounds of a[key] / b[key], pairing runs from the same round."""
    ratios = [
        a[key] / b[key]
        for a, b in zip(runs_a, runs_b)
        if a.get(key) and b.get(key) and "error" not in a and "error" not in b
    ]
    return statistics.median(ratios) if ratios else None


def gemm_summary(gemm_raw: dict) -> dict:
    out = {"runs": {}}
    best, source = None, None
    for peer, runs in gemm_raw.items():
        ok = [r for r in runs if "gflops" in r]
        if not ok:
            if runs:
                out["runs"][peer] = {"status": runs[0].get("error", runs[0].get("skipped", "?"))}
            continue
        per_size = {n: max(r["gflops"][n] for r in ok) for n in ok[0]["gflops"]}
        out["runs"][peer] = {
            "best_gflops_by_size": per_size,
            "versions": ok[0].get("versions"),
            "preloaded_blas": ok[0].get("preloaded_blas"),
        }
        for n, v in per_size.items():
            if best is None or v > best:
                best, source = v, f"{peer} fp32 {n}x{n}"
    if best is not None:
        out["measured_gflops"], out["source"] = best, source
    return out


DIFFERENT_MODEL = "lora_course_qembed"


def consistency_checks(rows: list[dict]) -> list[dict]:
    """Same work: first-step losses agree across peers; greedy ids are identical."""
    checks = []
    groups = {}
    for row in rows:
        groups.setdefault((row["bench"], row["config"]), []).append(row)
    for (bench, config), group in groups.items():
        if bench in ("lora", "qlora"):
            losses = {r["peer"]: r["first_loss"] for r in group if r.get("first_loss") is not None}
            qembed = losses.pop(DIFFERENT_MODEL, None)  # its embedding is 4-bit: not the same model
            if qembed is not None and "lora_course" in losses:
                checks.append(
                    {
                        "what": f"{bench} {config}: first-step loss with the embedding quantized within 1%",
                        "ok": abs(qembed - losses["lora_course"]) <= 0.01 * abs(losses["lora_course"]),
                        "detail": {
                            "lora_course": round(losses["lora_course"], 6),
                            DIFFERENT_MODEL: round(qembed, 6),
                        },
                    }
                )
            if len(losses) > 1:
                spread = max(losses.values()) - min(losses.values())
                checks.append(
                    {
                        "what": f"{bench} {config}: first-step loss equal across peers",
                        "ok": spread <= 1e-3 * max(abs(v) for v in losses.values()),
                        "detail": {k: round(v, 6) for k, v in losses.items()},
                    }
                )
        if bench == "generation":
            ids = {r["peer"]: r["ids"] for r in group if r.get("ids") is not None}
            if len(ids) > 1:
                ref = next(iter(ids.values()))
                checks.append(
                    {
                        "what": f"generation {config}: greedy token ids identical across peers",
                        "ok": all(v == ref for v in ids.values()),
                        "detail": f"{len(ref)} tokens from {len(ids)} peers",
                    }
                )
    return checks


RATIO_KEYS = {
    "lora": ("tokens_per_s",),
    "qlora": ("tokens_per_s",),
    "generation": ("prefill_tokens_per_s", "decode_tokens_per_s"),
}


# our QLoRA peers, judged against our fp32 LoRA step: the default, and two variants
VARIANTS = {"lora_course_qembed": "embedding quantized too", "lora_course_ckpt": "gradient checkpointing"}
QLORA_PEERS = ("lora_course", *VARIANTS)


def variant(peer: str) -> str:
    """A target's suffix: nothing for lora_course, " (what differs)" for a variant of it."""
    return f" ({VARIANTS[peer]})" if peer in VARIANTS else ""


FP32 = "lora_course fp32 LoRA"
# issue 17's targets: tokens/s against PyTorch + PEFT (its faster run) per shape
PEFT_GOALS = {"small": 1.2, "medium": 1.2, "smollm2-135m": 1.2, "llama-3.2-1b": 1.0}
QLORA_1B = "llama-3.2-1b"  # where QLoRA must be <= 0.4x the fp32 step's peak RSS at >= 0.8x its speed


def ratios(raw: dict) -> list[dict]:
    out = []
    for (bench, config, peer), runs in raw.items():
        if peer == "lora_course" or bench not in RATIO_KEYS:  # load: no peer to compare with
            continue
        ours = raw.get((bench, config, "lora_course"))
        if not ours:
            continue
        for key in RATIO_KEYS[bench]:
            ratio = paired_ratio(ours, runs, key)
            if ratio is not None:
                out.append({"bench": bench, "config": config, "vs": peer, "metric": key, "ratio": ratio})
        # CPU seconds: theirs / ours (> 1: we need less CPU for the same work)
        for key in ("cpu_s",) if bench != "generation" else ("prefill_cpu_s", "decode_cpu_s"):
            ratio = paired_ratio(runs, ours, key)
            if ratio is not None:
                out.append({"bench": bench, "config": config, "vs": peer, "metric": key, "ratio": ratio})
    # QLoRA (both quantizations) against our own fp32 LoRA step
    for (bench, config, peer), runs in raw.items():
        fp32 = raw.get(("lora", config, "lora_course"))
        if bench == "qlora" and peer in QLORA_PEERS and fp32:
            ratio = paired_ratio(runs, fp32, "tokens_per_s")
            if ratio is not None:
                out.append(
                    {
                        "bench": "qlora",
                        "config": config,
                        "vs": FP32 + variant(peer),
                        "metric": "tokens_per_s",
                        "ratio": ratio,
                    }
                )
    return out


def targets(ratio_list: list[dict], rows: list[dict]) -> list[dict]:
    """The targets (issue 17's, and the earlier mlx-lm ones), each met or missed with its measured value."""
    out = []
    cpu = {(r["bench"], r["config"], r["vs"], r["metric"]): r["ratio"] for r in ratio_list}

    def add(name, goal, value, fmt="{:.2f}x", cpu_ratio=None):
        if value is not None:
            text = fmt.format(value) + (f" (CPU time: {cpu_ratio:.2f}x)" if cpu_ratio is not None else "")
            out.append(
                {
                    "target": name,
                    "goal": goal,
                    "measured": value,
                    "text": text,
                    "met": value >= goal,
                    "cpu_time_ratio": cpu_ratio,
                }
            )

    for r in ratio_list:
        if r["metric"].endswith("cpu_s"):
            continue
        cpu_key = "cpu_s" if r["bench"] != "generation" else r["metric"].replace("tokens_per_s", "cpu_s")
        c = cpu.get((r["bench"], r["config"], r["vs"], cpu_key))
        if r["bench"] == "lora" and r["vs"] == "mlx_lm_stock":
            add(f"LoRA step {r['config']}: >= 12x stock mlx-lm", 12.0, r["ratio"], cpu_ratio=c)
        if r["bench"] == "lora" and r["vs"] == "mlx_lm_same_blas":
            add(f"LoRA step {r['config']}: >= 1.0x mlx-lm with the same BLAS", 1.0, r["ratio"], cpu_ratio=c)
        if r["bench"] == "generation" and r["vs"] in ("mlx_lm_same_blas", "mlx_lm_stock"):
            what = "prompt" if r["metric"].startswith("prefill") else "decode"
            add(f"generation {r['config']} {what}: >= 1.0x mlx-lm ({r['vs']})", 1.0, r["ratio"], cpu_ratio=c)
        if r["bench"] == "qlora" and r["vs"].startswith(FP32):
            goal = 0.8 if r["config"] == QLORA_1B else 0.5
            add(
                f"QLoRA step {r['config']}: >= {goal}x our fp32 LoRA step's tokens/s{r['vs'][len(FP32) :]}",
                goal,
                r["ratio"],
            )
    # PyTorch + PEFT: against the faster of its 2-thread and 1-thread runs
    peft = {}
    for r in ratio_list:
        if (
            r["bench"] == "lora"
            and r["vs"] in ("torch_peft", "torch_peft_1t")
            and r["metric"] == "tokens_per_s"
        ):
            if r["config"] not in peft or r["ratio"] < peft[r["config"]]["ratio"]:
                peft[r["config"]] = r
    for config, r in peft.items():
        threads = "1 thread" if r["vs"].endswith("_1t") else "all cores"
        goal = PEFT_GOALS.get(config, 1.0)
        add(
            f"LoRA step {config}: >= {goal}x PyTorch + PEFT (its faster run: {threads})",
            goal,
            r["ratio"],
            cpu_ratio=cpu.get(("lora", config, r["vs"], "cpu_s")),
        )
    for row in rows:
        if (
            row["bench"] == "lora"
            and row["peer"] == "lora_course"
            and row["config"] == "medium"
            and row.get("gemm_fraction") is not None
        ):
            add("LoRA step medium: >= 60% of the measured GEMM rate", 0.6, row["gemm_fraction"], "{:.0%}")
            if row.get("gemm_fraction_paired") is not None:
                out[-1]["text"] += f" ({row['gemm_fraction_paired']:.0%} of a GEMM timed between its steps)"

    def at_most(name, goal, value, unit):
        out.append(
            {
                "target": name,
                "goal": goal,
                "measured": value,
                "text": f"{value:.2f}x {unit}",
                "met": value <= goal,
            }
        )

    by = {(r["bench"], r["config"], r["peer"]): r for r in rows}
    for (bench, config, peer), row in by.items():
        fp32, torch = by.get(("lora", config, "lora_course")), by.get(("lora", config, "torch_peft"))
        rss = row.get("peak_rss_mib")
        if (
            bench == "lora"
            and peer in ("lora_course", "lora_course_ckpt")
            and rss
            and torch
            and torch.get("peak_rss_mib")
        ):
            at_most(
                f"LoRA step {config}{variant(peer)}: peak RSS <= 0.7x PyTorch + PEFT's",
                0.7,
                rss / torch["peak_rss_mib"],
                "of PEFT's",
            )
        if bench == "qlora" and peer in QLORA_PEERS and rss and fp32 and fp32.get("peak_rss_mib"):
            goal = 0.4 if config == QLORA_1B else 1.0
            at_most(
                f"QLoRA step {config}{variant(peer)}: peak RSS <= {goal}x our fp32 LoRA step's",
                goal,
                rss / fp32["peak_rss_mib"],
                "of fp32",
            )
    return out
