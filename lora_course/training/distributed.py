"""Data-parallel training on MLX's distributed engine (``mx.distributed`` + ``mlx.launch``).

Data parallelism (e.g. Goyal et al., 2017, "Accurate, Large Minibatch SGD") runs one
copy of the model per process. Each process takes its share of every batch, computes
gradients on it, and an all-reduce sums the gradients so every copy applies the same
update. ``train`` does this by itself when it finds more than one process:

    rank r of N takes rows [r*B/N, (r+1)*B/N) of each global batch of B examples
    grads = all_sum(grads of the summed token losses) / all_sum(token count)
    only rank 0 prints, calls callbacks and writes checkpoints

Because the gradient is divided by the *global* token count, N processes with B/N
rows each take exactly the step one process takes with B rows (up to float rounding;
``tests/training/test_distributed.py`` checks <= 1e-5).

Launching. ``mlx.launch`` starts the processes and tells each its rank:

    mlx.launch -n 2 --backend ring --env MKL_NUM_THREADS=1 -- python train.py   # 2 processes here
    mlx.launch --hostfile hosts.json --backend ring -- python train.py

(On one machine, give each process its share of the cores: N processes each running
a multi-threaded BLAS on all cores slow each other down badly; ``launch`` below does it.)

A ring hostfile for two machines lists how to reach each one (ssh) and the IPs the
ring connects over; every machine needs the same Python environment and the same
paths (data, model, script)::

    {"backend": "ring",
     "hosts": [{"ssh": "mac-1.local", "ips": ["192.168.1.10"]},
               {"ssh": "mac-2.local", "ips": ["192.168.1.11"]}]}

Checkpoints are written by rank 0 only; to resume, every process must be able to
read them (a shared folder, or copy the adapter directory to each machine first).
Taught in notebook 11.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path


def world() -> tuple[int, int]:
    """(rank, size) of this process; (0, 1) when not launched by mlx.launch."""
    import mlx.core as mx

    group = mx.distributed.init()
    return group.rank(), group.size()


def launcher() -> list[str]:
    """The ``mlx.launch`` command of the running Python environment."""
    local = Path(sys.executable).parent / "mlx.launch"
    if local.exists():
        return [str(local)]
    found = shutil.which("mlx.launch")
    if found:
        return [found]
    raise FileNotFoundError(
        "mlx.launch not found next to this Python nor on PATH; install mlx (it ships the mlx.launch command)"
    )


def _free_ports(n: int) -> int:
    """A port p such that p .. p + n - 1 look free (the ring backend listens on each)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65535:
            continue
        try:
            socks = []
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"could not find {n} consecutive free ports for the ring backend")


def launch(
    script,
    *args: str,
    n: int = 2,
    backend: str = "ring",
    hostfile=None,
    timeout: float | None = None,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """Run ``python script args...`` as ``n`` processes on this machine (or on the machines
    of ``hostfile``) through ``mlx.launch``; returns the finished process with its output.

    On one machine the processes share its cores: each gets ``cores // n`` BLAS threads
    (unless MKL_NUM_THREADS / OMP_NUM_THREADS are set). Oversubscribed BLAS threads spin
    against each other; we measured a 2-process run on 2 cores take 38 s instead of 5 s.
    """
    env = {**os.environ, **(env or {})}
    if hostfile is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        per_process = str(max(1, cores // n))
        for var in ("MKL_NUM_THREADS", "OMP_NUM_THREADS"):
            env.setdefault(var, per_process)
    cmd = launcher() + ["--backend", backend]
    if hostfile is not None:
        cmd += ["--hostfile", str(hostfile)]
    else:
        cmd += ["-n", str(n), "--starting-port", str(_free_ports(n))]
    cmd += ["--", sys.executable, str(script), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
