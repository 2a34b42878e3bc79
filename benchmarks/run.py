"""Run every benchmark, alternating peers, and write a table, JSON and plot.

    python -m benchmarks.run                  # small + medium, 3 rounds (about half an hour on 2 cores)
    python -m benchmarks.run --quick          # a micro model, 1 round: checks the machinery only
    python -m benchmarks.run --jobs           # also time the quickstart and every notebook (slow)
    python -m benchmarks.run --benches lora --configs small --peers lora_course mlx_lm_same_blas

Each (round, benchmark, configuration, peer) is one fresh worker process
(``benchmarks/worker.py``). Within a round every peer runs once per configuration,
in an order rotated from round to round, so slow drifts in machine load (other jobs
on shared cores) hit every peer alike. Figures are medians over rounds; ratios are
medians of the per-round ratios (ours / theirs measured in the same round).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import jobs, report
from benchmarks.configs import PRESETS, BenchConfig
from benchmarks.flops import generation_flops, train_step_flops
from benchmarks.weights import make_checkpoint
from benchmarks.worker import GEMM_PEERS, MARKER, PEERS

ROOT = Path(__file__).resolve().parent.parent
BENCHES = ("lora", "qlora", "generation")
BENCH_PEERS = {
    "lora": ("lora_course", "mlx_lm_stock", "mlx_lm_same_blas", "torch_peft"),
    "qlora": ("lora_course", "mlx_lm_stock", "mlx_lm_same_blas", "torch_peft"),
    "generation": ("lora_course", "mlx_lm_stock", "mlx_lm_same_blas"),
}
SCHEMA = 1
NO_GPU = "not run: no GPU machine was available to this benchmark run (CPU only)"


def run_worker(spec: dict, timeout: float) -> dict:
    """One measurement in a fresh process; errors come back as {"error": ...}."""
    cmd = [sys.executable, "-m", "benchmarks.worker", json.dumps(spec)]
    env = {k: v for k, v in os.environ.items() if k not in ("LORA_COURSE_NO_BLAS",)}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
    return {"error": f"exit {proc.returncode}: {tail}"}


def machine_info() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["cpu"] = names[0]
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(bench: str, cfg: BenchConfig, peer: str, runs: list[dict], gemm_rate: float | None) -> dict:
    ok = [r for r in runs if "error" not in r and "skipped" not in r]
    row = {"bench": bench, "config": cfg.name, "peer": peer, "rounds": len(ok)}
    if not ok:
        first = runs[0] if runs else {}
        row["status"] = first.get("skipped") and f"skipped: {first['skipped']}" or \
            f"error: {first.get('error', 'not run')}"
        return row
    row["status"] = "ok" if len(ok) == len(runs) else f"ok in {len(ok)} of {len(runs)} rounds"
    for key in ("tokens_per_s", "step_s", "prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_mib",
                "mlx_peak_mib", "first_loss", "last_loss", "blas_check_gflops_512", "gemm_probe_gflops", "cpu_s",
                "prefill_cpu_s", "decode_cpu_s"):
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
        probes = [(flops / r["step_s"] / 1e9) / r["gemm_probe_gflops"] for r in ok if r.get("gemm_probe_gflops")]
        if probes:
            row["gemm_fraction_paired"] = statistics.median(probes)
    if bench == "generation":
        row["ids"] = ok[0]["ids"]
        row["ids_equal_across_rounds"] = all(r["ids"] == ok[0]["ids"] for r in ok)
        g = generation_flops(cfg)
        row["prefill_gflops"] = g["prefill"] / ok[0]["prefill_s"] / 1e9 if ok[0]["prefill_s"] else None
    row["rss_method"] = ok[0].get("rss_method")
    row["preloaded_blas"] = ok[0].get("preloaded_blas")
    row["mapped_blas"] = ok[0].get("mapped_blas")
    row["versions"] = ok[0].get("versions")
    if "torch_threads" in ok[0]:
        row["torch_threads"] = ok[0]["torch_threads"]
    return row


def paired_ratio(runs_a: list[dict], runs_b: list[dict], key: str) -> float | None:
    """Median over rounds of a[key] / b[key], pairing runs from the same round."""
    ratios = [a[key] / b[key] for a, b in zip(runs_a, runs_b)
              if a.get(key) and b.get(key) and "error" not in a and "error" not in b]
    return statistics.median(ratios) if ratios else None


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["small", "medium"], choices=sorted(PRESETS))
    p.add_argument("--benches", nargs="+", default=list(BENCHES), choices=BENCHES)
    p.add_argument("--peers", nargs="+", default=None, choices=sorted(PEERS),
                   help="limit to these peers (default: all)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (overrides the config)")
    p.add_argument("--max-seconds", type=float, default=None, help="time budget per run (overrides)")
    p.add_argument("--quick", action="store_true", help="micro config, 1 round: a smoke test")
    p.add_argument("--jobs", action="store_true", help="also time the quickstart and each notebook (slow)")
    p.add_argument("--no-gemm", action="store_true", help="skip measuring the GEMM rate")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for results.json/png")
    p.add_argument("--timeout", type=float, default=1800, help="seconds before a worker is killed")
    args = p.parse_args(argv)
    if args.quick:
        args.configs, args.rounds = ["micro"], 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    configs = []
    for name in args.configs:
        d = PRESETS[name].to_dict()
        if args.steps is not None:
            d["steps"] = args.steps
        if args.max_seconds is not None:
            d["max_seconds"] = args.max_seconds
        configs.append(BenchConfig.from_dict(d))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"schema": SCHEMA, "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
               "machine": machine_info(), "gpu": NO_GPU, "rounds": args.rounds,
               "configs": {c.name: {**c.to_dict(), "train_step_flops": train_step_flops(c),
                                    "generation_flops": generation_flops(c)} for c in configs}}
    raw = {}  # (bench, config, peer) -> list of per-round worker results
    gemm_raw = {p: [] for p in GEMM_PEERS}
    with tempfile.TemporaryDirectory(prefix="lora_course_bench_") as tmp:
        files = {c.name: make_checkpoint(c, Path(tmp) / c.name) for c in configs}
        for r in range(args.rounds):
            if not args.no_gemm:
                for peer in _rotate(list(GEMM_PEERS), r):
                    res = run_worker({"bench": "gemm", "peer": peer, "config": configs[0].to_dict()}, args.timeout)
                    gemm_raw[peer].append(res)
                    print(f"[round {r + 1}] gemm {peer}: {_short(res, 'best_gflops')}", flush=True)
            for bench in args.benches:
                for cfg in configs:
                    peers = [p for p in BENCH_PEERS[bench] if args.peers is None or p in args.peers]
                    for peer in _rotate(peers, r):
                        w, d = files[cfg.name]
                        spec = {"bench": bench, "peer": peer, "config": cfg.to_dict(), "weights": str(w),
                                "data": str(d)}
                        res = run_worker(spec, args.timeout)
                        raw.setdefault((bench, cfg.name, peer), []).append(res)
                        key = "tokens_per_s" if bench != "generation" else "decode_tokens_per_s"
                        print(f"[round {r + 1}] {bench} {cfg.name} {peer}: {_short(res, key)}", flush=True)

    results["gemm"] = _gemm_summary(gemm_raw)
    gemm_rate = results["gemm"].get("measured_gflops")
    by_name = {c.name: c for c in configs}
    rows = [summarize(b, by_name[c], p, runs, gemm_rate) for (b, c, p), runs in raw.items()]
    results["rows"] = rows
    results["checks"] = consistency_checks(rows)
    results["ratios"] = ratios(raw)
    results["targets"] = targets(results["ratios"], rows)
    if args.jobs:
        results["jobs"] = {"quickstart": jobs.quickstart(), "notebooks": jobs.notebooks()}
    else:
        results["jobs"] = "not run (pass --jobs)"
    if hasattr(os, "getloadavg"):
        results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]

    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    text = report.table(results)
    print(text)
    try:
        report.plot(results, out / "results.png")
    except ImportError as e:
        print(f"no plot: {e}")
    failed = [c for c in results["checks"] if not c["ok"]]
    for c in failed:
        print(f"CHECK FAILED: {c['what']}: {c['detail']}", file=sys.stderr)
    return 1 if failed else 0


def _rotate(items: list, r: int) -> list:
    k = r % len(items) if items else 0
    return items[k:] + items[:k]


def _short(res: dict, key: str) -> str:
    if "error" in res:
        return "ERROR " + res["error"].splitlines()[-1][:200]
    if "skipped" in res:
        return "skipped"
    v = res.get(key)
    return f"{v:,.1f}" if isinstance(v, (int, float)) else str(v)


def _gemm_summary(gemm_raw: dict) -> dict:
    out = {"runs": {}}
    best, source = None, None
    for peer, runs in gemm_raw.items():
        ok = [r for r in runs if "gflops" in r]
        if not ok:
            if runs:
                out["runs"][peer] = {"status": runs[0].get("error", runs[0].get("skipped", "?"))}
            continue
        per_size = {n: max(r["gflops"][n] for r in ok) for n in ok[0]["gflops"]}
        out["runs"][peer] = {"best_gflops_by_size": per_size, "versions": ok[0].get("versions"),
                             "preloaded_blas": ok[0].get("preloaded_blas")}
        for n, v in per_size.items():
            if best is None or v > best:
                best, source = v, f"{peer} fp32 {n}x{n}"
    if best is not None:
        out["measured_gflops"], out["source"] = best, source
    return out


def consistency_checks(rows: list[dict]) -> list[dict]:
    """Same work: first-step losses agree across peers; greedy ids are identical."""
    checks = []
    groups = {}
    for row in rows:
        groups.setdefault((row["bench"], row["config"]), []).append(row)
    for (bench, config), group in groups.items():
        if bench in ("lora", "qlora"):
            losses = {r["peer"]: r["first_loss"] for r in group if r.get("first_loss") is not None}
            if len(losses) > 1:
                spread = max(losses.values()) - min(losses.values())
                checks.append({"what": f"{bench} {config}: first-step loss equal across peers",
                               "ok": spread <= 1e-3 * max(abs(v) for v in losses.values()),
                               "detail": {k: round(v, 6) for k, v in losses.items()}})
        if bench == "generation":
            ids = {r["peer"]: r["ids"] for r in group if r.get("ids") is not None}
            if len(ids) > 1:
                ref = next(iter(ids.values()))
                checks.append({"what": f"generation {config}: greedy token ids identical across peers",
                               "ok": all(v == ref for v in ids.values()),
                               "detail": f"{len(ref)} tokens from {len(ids)} peers"})
    return checks


RATIO_KEYS = {"lora": ("tokens_per_s",), "qlora": ("tokens_per_s",),
              "generation": ("prefill_tokens_per_s", "decode_tokens_per_s")}


def ratios(raw: dict) -> list[dict]:
    out = []
    for (bench, config, peer), runs in raw.items():
        if peer == "lora_course":
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
    # QLoRA against our own fp32 LoRA step (issue 5's target)
    for (bench, config, peer), runs in raw.items():
        if bench == "qlora" and peer == "lora_course" and ("lora", config, "lora_course") in raw:
            ratio = paired_ratio(runs, raw[("lora", config, "lora_course")], "tokens_per_s")
            if ratio is not None:
                out.append({"bench": "qlora", "config": config, "vs": "lora_course fp32 LoRA",
                            "metric": "tokens_per_s", "ratio": ratio})
    return out


def targets(ratio_list: list[dict], rows: list[dict]) -> list[dict]:
    """Issue 8's targets (and issue 5's QLoRA one), each met or missed with its measured value."""
    out = []
    cpu = {(r["bench"], r["config"], r["vs"], r["metric"]): r["ratio"] for r in ratio_list}

    def add(name, goal, value, fmt="{:.2f}x", cpu_ratio=None):
        if value is not None:
            text = fmt.format(value) + (f" (CPU time: {cpu_ratio:.2f}x)" if cpu_ratio is not None else "")
            out.append({"target": name, "goal": goal, "measured": value, "text": text, "met": value >= goal,
                        "cpu_time_ratio": cpu_ratio})

    for r in ratio_list:
        if r["metric"].endswith("cpu_s"):
            continue
        cpu_key = "cpu_s" if r["bench"] != "generation" else r["metric"].replace("tokens_per_s", "cpu_s")
        c = cpu.get((r["bench"], r["config"], r["vs"], cpu_key))
        if r["bench"] == "lora" and r["vs"] == "mlx_lm_stock":
            add(f"LoRA step {r['config']}: >= 12x stock mlx-lm", 12.0, r["ratio"], cpu_ratio=c)
        if r["bench"] == "lora" and r["vs"] == "mlx_lm_same_blas":
            add(f"LoRA step {r['config']}: >= 1.0x mlx-lm with the same BLAS", 1.0, r["ratio"], cpu_ratio=c)
        if r["bench"] == "lora" and r["vs"] == "torch_peft":
            add(f"LoRA step {r['config']}: >= 1.0x PyTorch + PEFT", 1.0, r["ratio"], cpu_ratio=c)
        if r["bench"] == "generation" and r["vs"] in ("mlx_lm_same_blas", "mlx_lm_stock"):
            what = "prompt" if r["metric"].startswith("prefill") else "decode"
            add(f"generation {r['config']} {what}: >= 1.0x mlx-lm ({r['vs']})", 1.0, r["ratio"], cpu_ratio=c)
        if r["bench"] == "qlora" and r["vs"] == "lora_course fp32 LoRA":
            add(f"QLoRA step {r['config']}: >= 0.5x our fp32 LoRA step", 0.5, r["ratio"])
    for row in rows:
        if row["bench"] == "lora" and row["peer"] == "lora_course" and row["config"] == "medium" \
                and row.get("gemm_fraction") is not None:
            add("LoRA step medium: >= 50% of the measured GEMM rate", 0.5, row["gemm_fraction"], "{:.0%}")
    by = {(r["bench"], r["config"], r["peer"]): r for r in rows}
    for (bench, config, peer), row in by.items():
        fp32 = by.get(("lora", config, "lora_course"))
        if bench == "qlora" and peer == "lora_course" and fp32 and row.get("peak_rss_mib") and fp32.get("peak_rss_mib"):
            value = row["peak_rss_mib"] / fp32["peak_rss_mib"]
            out.append({"target": f"QLoRA step {config}: peak RSS below our fp32 LoRA step", "goal": 1.0,
                        "measured": value, "text": f"{value:.2f}x of fp32", "met": value < 1.0})
    return out


if __name__ == "__main__":
    sys.exit(main())
