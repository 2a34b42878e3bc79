"""The benchmark runner end to end on a micro model: it runs, and its JSON has the documented shape.

Numbers from the micro model mean nothing, so nothing here looks at timings.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_bench(tmp_path, *args):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--no-gemm", "--out", str(out), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (out / "results.png").stat().st_size > 0
    return json.loads((out / "results.json").read_text()), proc.stdout


def check_row(row):
    assert row["status"] == "ok", row
    assert row["rounds"] == 1
    assert row["peak_rss_mib"] > 0 and row["rss_method"]
    if row["bench"] in ("lora", "qlora"):
        assert row["tokens_per_s"] > 0 and row["step_s"] > 0 and row["gflops"] > 0
        assert row["first_loss"] > 0 and len(row["tokens_per_s_runs"]) == 1
    else:
        assert row["prefill_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0
        assert len(row["ids"]) == 4 and row["ids_equal_across_rounds"]


def test_runner_lora_course_only(tmp_path):
    results, stdout = run_bench(tmp_path, "--peers", "lora_course")
    assert results["schema"] == 1
    assert set(results) >= {
        "created",
        "command",
        "machine",
        "gpu",
        "rounds",
        "configs",
        "gemm",
        "rows",
        "checks",
        "ratios",
        "targets",
        "jobs",
    }
    assert results["rounds"] == 1 and list(results["configs"]) == ["micro"]
    micro = results["configs"]["micro"]
    assert micro["dim"] == 32 and micro["n_layers"] == 1
    assert micro["train_step_flops"]["total"] == sum(
        v for k, v in micro["train_step_flops"].items() if k != "total"
    )
    assert {(r["bench"], r["peer"]) for r in results["rows"]} == {
        ("lora", "lora_course"),
        ("qlora", "lora_course"),
        ("generation", "lora_course"),
    }
    for row in results["rows"]:
        check_row(row)
        assert (
            row["preloaded_blas"] is None
            or "blas" in row["preloaded_blas"].lower()
            or "mkl" in row["preloaded_blas"].lower()
        )
    # QLoRA against our own fp32 step is the one ratio without a peer
    assert [r["vs"] for r in results["ratios"]] == ["lora_course fp32 LoRA"]
    assert "LoRA training step" in stdout and "GPU:" in stdout


@pytest.mark.reference
def test_runner_against_mlx_lm(tmp_path):
    pytest.importorskip("mlx_lm", reason="the mlx-lm peer needs the 'reference' extra")
    results, _ = run_bench(
        tmp_path, "--benches", "lora", "generation", "--peers", "lora_course", "mlx_lm_same_blas"
    )
    for row in results["rows"]:
        check_row(row)
    mlx_lm_row = next(r for r in results["rows"] if r["peer"] == "mlx_lm_same_blas")
    assert "lora_course" not in mlx_lm_row["versions"]  # the mlx-lm worker never imported us
    assert all(c["ok"] for c in results["checks"]) and len(results["checks"]) == 2
    kinds = {(r["bench"], r["vs"], r["metric"]) for r in results["ratios"]}
    assert ("lora", "mlx_lm_same_blas", "tokens_per_s") in kinds
    assert ("generation", "mlx_lm_same_blas", "decode_tokens_per_s") in kinds
    assert {t["goal"] for t in results["targets"]} == {1.0}
