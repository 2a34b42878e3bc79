"""The results as a text table (for the terminal and the README) and a PNG plot.

python -m benchmarks.report [benchmarks/results/results.json]   # print the README section again
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PEER_LABELS = {
    "lora_course": "lora_course (MKL)",
    "mlx_lm_stock": "mlx-lm, stock BLAS",
    "mlx_lm_same_blas": "mlx-lm, same BLAS (MKL)",
    "torch_peft": "PyTorch + PEFT",
    "torch_peft_1t": "PyTorch + PEFT, 1 thread",
    "lora_course_full_logits": "lora_course, plain loss (full logits)",
    "lora_course_qembed": "lora_course, embedding quantized too",
    "lora_course_ckpt": "lora_course, gradient checkpointing",
    "lora_course_gguf": "GGUF (lora_course.load)",
}
BENCH_TITLES = {
    "lora": "LoRA training step",
    "qlora": "QLoRA (4-bit) training step",
    "generation": "Greedy generation, batch 1",
    "load": "Loading a checkpoint (float16 weights)",
}


def _fmt(v, spec="{:,.0f}", none="-"):
    return spec.format(v) if isinstance(v, (int, float)) else none


def _ratio_lookup(results):
    return {(r["bench"], r["config"], r["vs"], r["metric"]): r["ratio"] for r in results.get("ratios", [])}


def _markdown(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def table(results: dict) -> str:
    """Markdown tables of every benchmark, the GEMM yardstick, the targets and the checks."""
    ratio = _ratio_lookup(results)
    rows = results.get("rows", [])
    parts = []
    gemm = results.get("gemm", {})
    if gemm.get("measured_gflops"):
        parts.append(f"Measured fp32 GEMM rate: {gemm['measured_gflops']:.1f} GFLOP/s ({gemm['source']}).")
    for bench in ("lora", "qlora"):
        sel = [r for r in rows if r["bench"] == bench]
        if not sel:
            continue
        body = []
        for r in sel:
            key = (bench, r["config"], r["peer"])
            vs = "" if r["peer"] == "lora_course" else _fmt(ratio.get((*key, "tokens_per_s")), "{:.2f}x")
            vs_cpu = "" if r["peer"] == "lora_course" else _fmt(ratio.get((*key, "cpu_s")), "{:.2f}x")
            if not r.get("status", "").startswith("ok"):
                body.append([r["config"], PEER_LABELS.get(r["peer"], r["peer"]), r["status"]] + [""] * 9)
                continue
            body.append(
                [
                    r["config"],
                    PEER_LABELS.get(r["peer"], r["peer"]),
                    _fmt(r.get("tokens_per_s")),
                    _fmt(r.get("step_s") and 1e3 * r["step_s"], "{:,.0f}"),
                    _fmt(r.get("cpu_s") and 1e3 * r["cpu_s"], "{:,.0f}"),
                    _fmt(r.get("gflops"), "{:.1f}"),
                    _fmt(r.get("gemm_fraction"), "{:.0%}"),
                    _fmt(r.get("gemm_fraction_paired"), "{:.0%}"),
                    _fmt(r.get("peak_rss_mib")),
                    _fmt(r.get("mlx_peak_mib")),
                    vs,
                    vs_cpu,
                ]
            )
        parts.append(
            f"**{BENCH_TITLES[bench]}**\n\n"
            + _markdown(
                [
                    "config",
                    "peer",
                    "tokens/s",
                    "step ms",
                    "CPU ms/step",
                    "GFLOP/s",
                    "of GEMM",
                    "of own GEMM",
                    "peak RSS MiB",
                    "MLX peak MiB",
                    "lora_course is (tokens/s)",
                    "(CPU time)",
                ],
                body,
            )
        )
    sel = [r for r in rows if r["bench"] == "generation"]
    if sel:
        body = []
        for r in sel:
            if not r.get("status", "").startswith("ok"):
                body.append([r["config"], PEER_LABELS.get(r["peer"], r["peer"]), r["status"], "", "", ""])
                continue
            key = ("generation", r["config"], r["peer"])
            vp, vd = ratio.get((*key, "prefill_tokens_per_s")), ratio.get((*key, "decode_tokens_per_s"))
            cp, cd = ratio.get((*key, "prefill_cpu_s")), ratio.get((*key, "decode_cpu_s"))
            ours = r["peer"] == "lora_course"
            body.append(
                [
                    r["config"],
                    PEER_LABELS.get(r["peer"], r["peer"]),
                    _fmt(r.get("prefill_tokens_per_s")),
                    _fmt(r.get("decode_tokens_per_s"), "{:,.1f}"),
                    "" if ours else f"{_fmt(vp, '{:.2f}x')} / {_fmt(vd, '{:.2f}x')}",
                    "" if ours else f"{_fmt(cp, '{:.2f}x')} / {_fmt(cd, '{:.2f}x')}",
                ]
            )
        parts.append(
            f"**{BENCH_TITLES['generation']}**\n\n"
            + _markdown(
                [
                    "config",
                    "peer",
                    "prompt tokens/s",
                    "decode tokens/s",
                    "lora_course is (prompt / decode)",
                    "(CPU time)",
                ],
                body,
            )
        )
    sel = [r for r in rows if r["bench"] == "load"]
    if sel:
        body = [
            [r["config"], PEER_LABELS.get(r["peer"], r["peer"]), r["status"]] + [""] * 5
            if not r.get("status", "").startswith("ok")
            else [
                r["config"],
                "safetensors (lora_course.load)"
                if r["peer"] == "lora_course"
                else PEER_LABELS.get(r["peer"]),
                _fmt(r.get("weight_bytes") and r["weight_bytes"] / 2**20),
                _fmt(r.get("rss_before_mib")),
                _fmt(r.get("peak_rss_mib")),
                _fmt(r.get("peak_over_weights"), "{:.2f}x"),
                _fmt(r.get("load_s"), "{:.1f}"),
                "",
            ]
            for r in sel
        ]
        parts.append(
            f"**{BENCH_TITLES['load']}**\n\n"
            + _markdown(
                [
                    "config",
                    "format",
                    "weights MiB",
                    "RSS before MiB",
                    "peak RSS MiB",
                    "peak - before",
                    "s",
                    "",
                ],
                body,
            )
        )
    loaded = [r for r in rows if r.get("status", "").startswith("ok")]
    if loaded:
        body = [
            [
                r["bench"],
                r["config"],
                PEER_LABELS.get(r["peer"], r["peer"]),
                " / ".join(str((la or [None])[0]) for la in r.get("load_average", [])) or "-",
                _fmt(r.get("other_cores"), "{:.2f}"),
                _fmt(r.get("other_cores_max"), "{:.2f}"),
                f"{r.get('busy_rounds', 0)} of {r['rounds']}" + ("" if not r.get("busy_rounds") else " BUSY"),
                str(r.get("attempts", r["rounds"])),
            ]
            for r in loaded
        ]
        parts.append(
            "**Machine load during each measurement** (other processes' CPU, in cores, while the "
            "timed steps ran; busy: half a core or more)\n\n"
            + _markdown(
                ["bench", "config", "peer", "1-min load", "others (median)", "others (max)", "busy", "runs"],
                body,
            )
        )
    if results.get("targets"):
        body = [[t["target"], t["text"], "met" if t["met"] else "MISSED"] for t in results["targets"]]
        parts.append("**Targets**\n\n" + _markdown(["target", "measured", ""], body))
    if results.get("checks"):
        body = [[c["what"], "ok" if c["ok"] else "FAILED"] for c in results["checks"]]
        parts.append("**Same work**\n\n" + _markdown(["check", ""], body))
    jobs = results.get("jobs")
    if isinstance(jobs, dict):
        body = [
            [
                "lora-course quickstart",
                _fmt(jobs["quickstart"].get("seconds"), "{:.0f} s"),
                jobs["quickstart"]["status"],
            ]
        ]
        body += [[j["notebook"], _fmt(j.get("seconds"), "{:.0f} s"), j["status"]] for j in jobs["notebooks"]]
        parts.append("**Whole jobs (wall time)**\n\n" + _markdown(["job", "time", "status"], body))
    parts.append(f"GPU: {results.get('gpu')}")
    return "\n\n".join(parts)


def plot(results: dict, path: Path) -> None:
    """Tokens/s per peer for each benchmark and configuration (log scale), one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results.get("rows", []) if r.get("status", "").startswith("ok")]
    panels = [
        ("lora", "tokens_per_s", "LoRA step, tokens/s"),
        ("qlora", "tokens_per_s", "QLoRA 4-bit step, tokens/s"),
        ("generation", "prefill_tokens_per_s", "generation: prompt tokens/s"),
        ("generation", "decode_tokens_per_s", "generation: decode tokens/s"),
    ]
    panels = [p for p in panels if any(r["bench"] == p[0] for r in rows)]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.2 * max(len(panels), 1), 4.2), squeeze=False)
    peers = list(PEER_LABELS)
    colors = {
        "lora_course": "#d62728",
        "mlx_lm_stock": "#7f7f7f",
        "mlx_lm_same_blas": "#1f77b4",
        "torch_peft": "#ff7f0e",
        "torch_peft_1t": "#ffbb78",
        "lora_course_full_logits": "#ff9896",
        "lora_course_qembed": "#98df8a",
        "lora_course_ckpt": "#c5b0d5",
        "lora_course_gguf": "#9467bd",
    }
    for ax, (bench, key, title) in zip(axes[0], panels):
        sel = [r for r in rows if r["bench"] == bench and r.get(key)]
        configs = list(dict.fromkeys(r["config"] for r in sel))
        width = 0.8 / len(peers)
        for j, peer in enumerate(peers):
            xs, ys = [], []
            for i, c in enumerate(configs):
                hit = [r for r in sel if r["config"] == c and r["peer"] == peer]
                if hit:
                    xs.append(i + (j - (len(peers) - 1) / 2) * width)
                    ys.append(hit[0][key])
            if xs:
                ax.bar(xs, ys, width, label=PEER_LABELS[peer], color=colors[peer])
                for x, y in zip(xs, ys):
                    ax.text(x, y, f"{y:,.0f}", ha="center", va="bottom", fontsize=6, rotation=90)
        ax.set_xticks(range(len(configs)), configs)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower left")
    cores = results.get("machine", {}).get("cores")
    fig.suptitle(
        f"lora_course vs mlx-lm and PyTorch + PEFT, CPU ({cores} cores), medians of "
        f"{results.get('rounds')} alternating rounds",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def versions_line(results: dict) -> str:
    """One line naming the machine and the versions every worker reported."""
    seen = {}
    for row in results.get("rows", []):
        seen.update(row.get("versions") or {})
    m = results.get("machine", {})
    load = m.get("load_average_at_start"), m.get("load_average_at_end")
    parts = [f"{k} {v}" for k, v in sorted(seen.items())]
    return (
        f"{m.get('cpu', m.get('processor', '?'))}, {m.get('cores')} cores, {m.get('memory_gib', '?')} GiB, "
        f"{m.get('platform', '?')}; load average (1/5/15 min) {load[0]} at start, {load[1]} at the end; "
        + ", ".join(parts)
    )


def readme_section(results: dict) -> str:
    """The README's "Performance" section: command, machine and versions, tables, plot."""
    return "\n\n".join(
        [
            "## Performance",
            f"`{results.get('command', 'python -m benchmarks.run')}` on {results.get('created', '?')}: "
            f"{results.get('rounds')} alternating rounds, medians (see `benchmarks/README.md` for what is "
            "measured and how).",
            f"Machine and versions: {versions_line(results)}.",
            table(results),
            "![lora_course vs mlx-lm and PyTorch + PEFT](benchmarks/results/results.png)",
        ]
    )


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0] if argv else Path(__file__).parent / "results" / "results.json")
    print(readme_section(json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
