"""Run every benchmark, alternating peers, and write a table, JSON and plot.

    python -m benchmarks.run                  # small, medium (2 rounds), smollm2-135m, llama-3.2-1b (1 round)
    python -m benchmarks.run --quick          # a micro model, 1 round: checks the machinery only
    python -m benchmarks.run --jobs           # also time the quickstart and every notebook (slow)
    python -m benchmarks.run --benches lora --configs small --peers lora_course mlx_lm_same_blas

Each (round, benchmark, configuration, peer) is one fresh worker process
(``benchmarks/worker.py``). Within a round every peer runs once per configuration,
in an order rotated from round to round, so slow drifts in machine load (other jobs
on shared cores) hit every peer alike. Figures are medians over rounds; ratios are
medians of the per-round ratios (ours / theirs measured in the same round).

Every measurement records the machine's load while it ran (``measure.watch_load``);
one taken while other processes held half a core or more is flagged ``busy`` and run
again (``--rerun-busy``, default once), keeping the least disturbed attempt.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import jobs, report, summary
from benchmarks.configs import CHUNKED_VOCAB, PRESETS, SKIP_REASONS, BenchConfig
from benchmarks.flops import generation_flops, train_step_flops
from benchmarks.weights import make_checkpoint
from benchmarks.worker import GEMM_PEERS, MARKER, PEERS

ROOT = Path(__file__).resolve().parent.parent
BENCHES = ("lora", "qlora", "generation", "load")
BENCH_PEERS = {
    "lora": (
        "lora_course",
        "lora_course_full_logits",
        "lora_course_ckpt",
        "mlx_lm_stock",
        "mlx_lm_same_blas",
        "torch_peft",
        "torch_peft_1t",
    ),
    "qlora": (
        "lora_course",
        "lora_course_qembed",
        "lora_course_ckpt",
        "mlx_lm_stock",
        "mlx_lm_same_blas",
        "torch_peft",
    ),
    "generation": ("lora_course", "mlx_lm_stock", "mlx_lm_same_blas"),
    "load": ("lora_course", "lora_course_gguf"),  # safetensors through lora_course.load; GGUF
}
OPT_IN = ("lora_course_ckpt",)  # run only when --peers names them
SCHEMA = 2  # 2: per-measurement machine load ("load"), real model shapes, skipped peers
TOKENIZER_PIECES = 4096  # lora_course/assets/base/tokenizer.model, which the load bench uses
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
            return json.loads(line[len(MARKER) :])
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
    return {"error": f"exit {proc.returncode}: {tail}"}


def bench_peers(bench: str, named: list[str] | None) -> list[str]:
    """The peers a bench runs: those named with --peers, else all but the opt-in ones."""
    return [p for p in BENCH_PEERS[bench] if (p in named if named else p not in OPT_IN)]


def skip_reason(bench: str, peer: str, cfg: BenchConfig) -> str | None:
    if bench == "load" and cfg.vocab_size < TOKENIZER_PIECES:
        return f"the course tokenizer (lora_course.load reads it) has {TOKENIZER_PIECES} pieces"
    for key in (f"{bench}:{peer}", peer):
        if key in cfg.skip_peers:
            return SKIP_REASONS.get(key, "not run at this size")
    if peer == "lora_course_qembed" and cfg.vocab_size < CHUNKED_VOCAB:
        return f"run where the embedding is large (a vocabulary of {CHUNKED_VOCAB:,} or more)"
    if peer == "lora_course_full_logits" and cfg.vocab_size < CHUNKED_VOCAB:
        return f"same work as lora_course: below a {CHUNKED_VOCAB:,}-token vocabulary its loss is not chunked"
    return None


def measure_once(spec: dict, timeout: float, reruns: int) -> dict:
    """One worker run; while it was flagged busy, up to ``reruns`` more. Keeps the attempt
    with the least other work and records how many there were and how busy each was."""
    attempts = [run_worker(spec, timeout)]
    while len(attempts) <= reruns and (attempts[-1].get("load") or {}).get("busy"):
        attempts.append(run_worker(spec, timeout))
    if len(attempts) == 1:
        return attempts[0]
    ok = [a for a in attempts if "load" in a] or attempts
    best = min(ok, key=lambda a: (a.get("load") or {}).get("other_cores") or 0.0)
    best["attempts"] = len(attempts)
    best["other_cores_per_attempt"] = [(a.get("load") or {}).get("other_cores") for a in attempts]
    return best


def machine_info() -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument(
        "--configs",
        nargs="+",
        default=["small", "medium", "smollm2-135m", "llama-3.2-1b"],
        choices=sorted(PRESETS),
    )
    p.add_argument("--benches", nargs="+", default=list(BENCHES), choices=BENCHES)
    p.add_argument(
        "--peers", nargs="+", default=None, choices=sorted(PEERS), help="limit to these peers (default: all)"
    )
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (default 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (overrides the config)")
    p.add_argument("--max-seconds", type=float, default=None, help="time budget per run (overrides)")
    p.add_argument("--quick", action="store_true", help="micro config, 1 round: a smoke test")
    p.add_argument("--jobs", action="store_true", help="also time the quickstart and each notebook (slow)")
    p.add_argument("--no-gemm", action="store_true", help="skip measuring the GEMM rate")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for results.json/png")
    p.add_argument("--timeout", type=float, default=1800, help="seconds before a worker is killed")
    p.add_argument(
        "--rerun-busy",
        type=int,
        default=1,
        metavar="N",
        help="re-run a measurement up to N times while other processes held a core (default 1)",
    )
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
    results = {
        "schema": SCHEMA,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(),
        "gpu": NO_GPU,
        "rounds": args.rounds,
        "configs": {
            c.name: {
                **c.to_dict(),
                "train_step_flops": train_step_flops(c),
                "generation_flops": generation_flops(c),
            }
            for c in configs
        },
    }
    raw = {}  # (bench, config, peer) -> list of per-round worker results
    gemm_raw = {p: [] for p in GEMM_PEERS}
    with tempfile.TemporaryDirectory(prefix="lora_course_bench_") as tmp:
        files = {c.name: make_checkpoint(c, Path(tmp) / c.name) for c in configs}
        for r in range(args.rounds):
            if not args.no_gemm:
                for peer in _rotate(list(GEMM_PEERS), r):
                    res = run_worker(
                        {"bench": "gemm", "peer": peer, "config": configs[0].to_dict()}, args.timeout
                    )
                    gemm_raw[peer].append(res)
                    print(f"[round {r + 1}] gemm {peer}: {_short(res, 'best_gflops')}", flush=True)
            for bench in args.benches:
                for cfg in configs:
                    if cfg.max_rounds is not None and r >= cfg.max_rounds:
                        continue
                    peers = bench_peers(bench, args.peers)
                    for peer in _rotate(peers, r):
                        why = skip_reason(bench, peer, cfg)
                        if why is not None:
                            raw.setdefault((bench, cfg.name, peer), []).append({"skipped": why})
                            continue
                        w, d = files[cfg.name]
                        spec = {
                            "bench": bench,
                            "peer": peer,
                            "config": cfg.to_dict(),
                            "weights": str(w),
                            "data": str(d),
                        }
                        res = measure_once(spec, args.timeout, args.rerun_busy)
                        raw.setdefault((bench, cfg.name, peer), []).append(res)
                        key = {"generation": "decode_tokens_per_s", "load": "peak_over_weights"}.get(
                            bench, "tokens_per_s"
                        )
                        print(
                            f"[round {r + 1}] {bench} {cfg.name} {peer}: {_short(res, key)}{_load(res)}",
                            flush=True,
                        )

    results["gemm"] = summary.gemm_summary(gemm_raw)
    gemm_rate = results["gemm"].get("measured_gflops")
    by_name = {c.name: c for c in configs}
    rows = [summary.summarize(b, by_name[c], p, runs, gemm_rate) for (b, c, p), runs in raw.items()]
    results["rows"] = rows
    results["checks"] = summary.consistency_checks(rows)
    results["ratios"] = summary.ratios(raw)
    results["targets"] = summary.targets(results["ratios"], rows)
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


def _load(res: dict) -> str:
    load = res.get("load") or {}
    if load.get("other_cores") is None:
        return ""
    flag = " BUSY" if load.get("busy") else ""
    return f" (others: {load['other_cores']:.2f} cores, load {load.get('load_average_start')}{flag})"


def _short(res: dict, key: str) -> str:
    if "error" in res:
        return "ERROR " + res["error"].splitlines()[-1][:200]
    if "skipped" in res:
        return "skipped"
    v = res.get(key)
    return f"{v:,.1f}" if isinstance(v, (int, float)) else str(v)


if __name__ == "__main__":
    sys.exit(main())
