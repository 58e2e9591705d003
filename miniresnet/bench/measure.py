"""What the benchmark measures besides results: wall times, the machine's GEMM rate, whether the
CPU was contended while timing, and memory peaks.

While timing, each library's calls record how long this process's threads were ready to run
but waiting for a CPU (Linux ``/proc/self/task/*/schedstat``). Above :data:`WAIT_LIMIT` seconds
per second of wall time the machine was contended (other processes running, or more busy
threads than cores) and the times measure the scheduler, not the library: such times and the
ratios built on them are marked ``?`` and reported as unreliable (:func:`contended`).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np

Fn = Callable[[], Any]  # one timed call of one library

# Seconds this process's threads may wait for a CPU per second of timed wall time: above the
# wake-up latencies of an idle machine's thread pools, below what busy competitors cause (each
# run's waits are in the JSON report's contention.wait_per_wall).
WAIT_LIMIT = 0.2


def gemm_rate(dtype: str, n: int = 2048, repeats: int = 3) -> float:
    """This machine's GEMM rate in GFLOP/s: the best of ``repeats`` ``n×n`` NumPy matmuls."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n)).astype(dtype) for _ in range(2))
    a @ b  # warm-up
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


# -- contention -----------------------------------------------------------------------------------
def thread_waits() -> dict[str, int] | None:
    """Nanoseconds each thread of this process has spent ready to run but waiting for a CPU
    (Linux ``/proc/self/task/<tid>/schedstat``); None where the kernel does not report it."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    waits = {}
    for tid in tids:
        with contextlib.suppress(OSError, IndexError, ValueError):  # the thread has just ended
            with open(f"/proc/self/task/{tid}/schedstat", "rb") as fh:
                waits[tid] = int(fh.read().split()[1])
    return waits or None


def waited(before: dict[str, int] | None, after: dict[str, int] | None) -> float | None:
    """Seconds of CPU wait between two :func:`thread_waits` samples (a thread started in between
    counts from zero); None if either sample is."""
    if before is None or after is None:
        return None
    return sum(max(w - before.get(tid, 0), 0) for tid, w in after.items()) / 1e9


def contended(wall_s: float, wait_s: float | None, limit: float = WAIT_LIMIT) -> bool | None:
    """Whether a timed stretch of ``wall_s`` seconds, during which this process's threads waited
    ``wait_s`` seconds in all for a CPU, was contended: more than ``limit`` seconds of waiting per
    second. None when the wait was not measured.

    The wait, not the CPU time, is the evidence: a single-threaded stretch uses one core on an
    idle machine too, and spinning thread pools burn CPU while they wait for a descheduled peer.
    """
    if wait_s is None:
        return None
    return wait_s > limit * wall_s


# -- timing ---------------------------------------------------------------------------------------
def time_fns(fns: dict[str, Fn], repeats: int, warmup: int = 1
             ) -> tuple[dict[str, list[float]], dict[str, dict[str, float | None]]]:
    """Wall times (s) of ``repeats`` calls of each function, interleaved across libraries, and
    per library the process CPU time and the threads' CPU wait (:func:`thread_waits`; None
    where not measurable) over those calls, as ``{lib: {"cpu_s": ..., "wait_s": ...}}``."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {lib: [] for lib in fns}
    usage: dict[str, dict[str, float | None]] = {lib: {"cpu_s": 0.0, "wait_s": 0.0}
                                                 for lib in fns}
    for _ in range(repeats):
        for lib, fn in fns.items():
            gc.collect()
            w0, c0 = thread_waits(), time.process_time()
            t0 = time.perf_counter()
            fn()
            times[lib].append(time.perf_counter() - t0)
            c1, w = time.process_time(), waited(w0, thread_waits())
            u = usage[lib]
            u["cpu_s"] += c1 - c0
            u["wait_s"] = None if w is None or u["wait_s"] is None else u["wait_s"] + w
    return times, usage


def contention_record(times: dict[str, list[float]],
                      usage: dict[str, dict[str, float | None]]) -> dict[str, Any]:
    """Per library: CPU time and CPU wait per second of wall time, and the :func:`contended`
    verdict, for the JSON report."""
    rec: dict[str, Any] = {"wait_limit": WAIT_LIMIT, "contended": {}, "wait_per_wall": {},
                           "cpu_per_wall": {}}
    for lib, t in times.items():
        wall, wait = sum(t), usage[lib]["wait_s"]
        rec["contended"][lib] = contended(wall, wait)
        rec["wait_per_wall"][lib] = None if wait is None else wait / wall
        rec["cpu_per_wall"][lib] = usage[lib]["cpu_s"] / wall
    return rec


# -- memory ---------------------------------------------------------------------------------------
def traced_peak(fn: Fn) -> int:
    """The tracemalloc peak (bytes) of one call of ``fn`` above what was held before it."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    del result
    return peak - base
