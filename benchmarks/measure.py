"""Timing and memory measurement inside a worker process, the same for every peer.

Time: a few untimed warm-up calls (compilation, allocator), then timed calls until
``cfg.steps`` are done or ``cfg.max_seconds`` have passed (at least ``cfg.min_steps``).
Each call must return only after its work is finished (the callers force
evaluation). We keep every call's duration and report the median, which shrugs off
the odd slow call when other processes share the cores. The process CPU time of each
call (all threads) is recorded too: waiting for a busy core does not count in it, but a
BLAS thread spinning while it waits for work does.

Before each timed call an untimed 1024 x 1024 fp32 GEMM can be timed too (``probe``):
shared cores make absolute rates drift, and a GEMM measured next to the steps gives a
yardstick under the same load.

Other processes: the machine is shared, so every timed section also records what else
ran during it (``watch_load``): the load average before and after, and the CPU seconds
that processes other than ours took on the cores we may use, from their busy time in
``/proc/stat`` minus our own process tree's ``getrusage`` (10 ms resolution: a window
under a second gives a coarse figure). ``other_cores`` is that divided by the wall
time; at ``BUSY_CORES`` or more the measurement is flagged ``busy`` (the runner can
re-run it, ``--rerun-busy``).

Memory: the peak resident set size (VmHWM) of the process during the timed calls.
Linux lets a process reset its own high-water mark (``echo 5 > /proc/self/clear_refs``),
so the figure covers the timed steps only: the resident weights, activations,
gradients, optimizer state, and the libraries' own resident code and data. Where the
reset is unavailable we fall back to ``getrusage`` max RSS (the whole process life)
and say so in ``rss_method``.
"""

from __future__ import annotations

import contextlib
import gc
import os
import resource
import statistics
import time

# Half a core of other work on average: on 2 cores enough to slow a 2-thread step visibly.
BUSY_CORES = 0.5


def _cores() -> set[int]:
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def _busy_cpu_s() -> float | None:
    """CPU seconds the cores we may run on have spent busy since boot (``/proc/stat``)."""
    cores, busy = {f"cpu{i}" for i in _cores()}, 0
    try:
        with open("/proc/stat") as f:
            for line in f:
                name, *ticks = line.split()
                if name in cores:  # user nice system idle iowait irq softirq steal
                    t = [int(x) for x in ticks[:8]]
                    busy += sum(t) - t[3] - t[4]  # all but idle and iowait
    except (OSError, ValueError):
        return None
    return busy / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    """CPU seconds of this process (all threads) and of its finished children."""
    return sum(
        r.ru_utime + r.ru_stime
        for r in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )


def _loadavg() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


@contextlib.contextmanager
def watch_load():
    """``with watch_load() as load: ...``: afterwards ``load`` holds the load average at
    start and end, the CPU seconds other processes took meanwhile, and ``busy``."""
    load = {"load_average_start": _loadavg()}
    busy0, own0, tic = _busy_cpu_s(), _own_cpu_s(), time.perf_counter()
    yield load
    wall = time.perf_counter() - tic
    busy1, own1 = _busy_cpu_s(), _own_cpu_s()
    load["load_average_end"] = _loadavg()
    load["wall_s"] = wall
    if busy0 is None or busy1 is None:
        load.update(other_cpu_s=None, other_cores=None, busy=None)
        return
    # The busy count moves in 10 ms ticks: over a short window it can round past what the
    # cores could do, so the figure is clamped to [0, our cores].
    other = max((busy1 - busy0) - (own1 - own0), 0.0)
    load["other_cpu_s"] = other
    load["other_cores"] = min(other / max(wall, 1e-9), float(len(_cores())))
    load["busy"] = load["other_cores"] >= BUSY_CORES


def reset_peak_rss() -> str:
    """Reset the peak-RSS mark; returns the method the matching peak_rss_mib() will use."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "VmHWM after reset"
    except OSError:
        return "ru_maxrss (whole process)"


def peak_rss_mib(method: str) -> float:
    if method.startswith("VmHWM"):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB -> MiB
    # ru_maxrss is in kilobytes on Linux and bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    import sys

    return rss / (2**20 if sys.platform == "darwin" else 1024.0)


def time_calls(fn, cfg, before_timing=None, probe=None) -> dict:
    """Warm up, then time ``fn()``; returns durations, the median and fn's last result.

    ``probe()``, if given, runs (untimed) before each timed call and its values are
    returned as ``probes``: a GEMM rate measured in the same process at the same moment.
    """
    result = None
    for _ in range(cfg.warmup):
        result = fn()
    if before_timing is not None:
        before_timing()
    times, cpu_times, probes = [], [], []
    start = time.perf_counter()
    with watch_load() as load:
        while len(times) < cfg.steps:
            if probe is not None:
                probes.append(probe())
            tic, cpu_tic = time.perf_counter(), time.process_time()
            result = fn()
            times.append(time.perf_counter() - tic)
            cpu_times.append(time.process_time() - cpu_tic)
            if len(times) >= cfg.min_steps and time.perf_counter() - start > cfg.max_seconds:
                break
    return {
        "load": load,
        "times_s": times,
        "median_s": statistics.median(times),
        "cpu_s": statistics.median(cpu_times),
        "last": result,
        "probes": probes,
    }


def mlx_gemm_probe(n: int = 1024):
    """A function measuring one fp32 (n x n) @ (n x n) MLX matmul, in GFLOP/s."""
    import mlx.core as mx

    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a, b)

    def probe() -> float:
        tic = time.perf_counter()
        mx.eval(a @ b)
        return 2.0 * n**3 / (time.perf_counter() - tic) / 1e9

    return probe


def torch_gemm_probe(n: int = 1024):
    """Like mlx_gemm_probe, through torch."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)

    def probe() -> float:
        tic = time.perf_counter()
        a @ b
        return 2.0 * n**3 / (time.perf_counter() - tic) / 1e9

    return probe
