"""Whole jobs, timed end to end: ``lora-course quickstart`` and each notebook under nbval.

Opt-in (``python -m benchmarks.run --jobs``): they take minutes. Each runs as a plain
subprocess from the repository root, exactly as a user or CI would run it.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _timed(cmd: list[str], timeout: float) -> dict:
    tic = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "seconds": time.perf_counter() - tic, "command": " ".join(cmd[2:])}
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
    return {
        "status": "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})",
        "seconds": time.perf_counter() - tic,
        "command": " ".join(cmd[2:]),
        "tail": tail,
    }


def quickstart_available() -> bool:
    probe = "import lora_course.recipes.commands as c; print(hasattr(c, 'add_quickstart_command'))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    return out.returncode == 0 and out.stdout.strip().endswith("True")


def quickstart(timeout: float = 3600) -> dict:
    """Wall time of ``lora-course quickstart`` with its defaults, into a temporary folder."""
    if not quickstart_available():
        return {"status": "not available (no `lora-course quickstart` command in this checkout)"}
    with tempfile.TemporaryDirectory() as tmp:
        return _timed([sys.executable, "-m", "lora_course", "quickstart", "--out", tmp], timeout)


def _notebook_paths() -> list[str]:
    """The committed notebooks (a notebook someone is still writing is not timed); every
    ``notebooks/NN_*.ipynb`` when this is not a git checkout."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "notebooks/[0-9][0-9]_*.ipynb"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        if out:
            return sorted(out)
    except (OSError, subprocess.CalledProcessError):
        pass
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def notebooks(timeout: float = 1800) -> list[dict]:
    """Wall time of ``pytest notebooks/NN_x.ipynb`` (nbval, lax) for each notebook."""
    out = []
    for rel in _notebook_paths():
        res = _timed([sys.executable, "-m", "pytest", rel, "-q"], timeout)
        out.append({"notebook": rel, **res})
    return out
