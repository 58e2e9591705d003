"""Running the benchmark: import the libraries, check each case, time it, build the report."""

from __future__ import annotations

import importlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

import miniresnet
from miniresnet.backends import limit_compiled_threads
from miniresnet.bench import jax_twin
from miniresnet.bench.cases import LIBS, MODULES, TOLERANCE, Case
from miniresnet.bench.measure import (
    contended,
    contention_record,
    gemm_rate,
    thread_waits,
    time_fns,
    waited,
)
from miniresnet.bench.report import header
from miniresnet.bench.split import time_split

# the default thread count of every library (BLAS pools, our compiled kernels, PyTorch intra-op,
# XLA's CPU pool)
THREADS = 2
SPLIT_CALLS = 3  # calls of ours, after the timed ones, for the split of its time


def import_libs(wanted: Sequence[str] = LIBS, threads: int = THREADS
                ) -> tuple[dict[str, Any], dict[str, str]]:
    """Import the comparison libraries that are installed.

    Returns
    -------
    modules, missing : dict, dict
        ``{lib: module}`` for the libraries found (``"ours"`` maps to ``miniresnet``, both
        ``"jax"`` and ``"jax-jit"`` to ``jax``) and ``{lib: reason}`` for those skipped.

    JAX is imported by :func:`~miniresnet.bench.jax_twin.import_jax`, which sizes XLA's CPU
    pool to ``threads`` if its client does not exist yet.
    """
    modules: dict[str, Any] = {}
    missing: dict[str, str] = {}
    for lib in wanted:
        if lib == "ours":
            modules[lib] = miniresnet
            continue
        name = MODULES.get(lib, lib)
        try:
            modules[lib] = (jax_twin.import_jax(threads) if name == "jax"
                            else importlib.import_module(name))
        except ImportError as exc:
            missing[lib] = f"{name} not installed ({exc}); pip install 'miniresnet[bench]'"
    if "torch" in modules:
        modules["torch"].set_num_threads(threads)
    return modules, missing


def run_case(case: Case, dtype: str, libs: dict[str, Any], repeats: int,
             gemm: dict[str, float]) -> dict[str, Any]:
    """Set up, check and (if the check passes) time one case; returns its JSON record."""
    not_run = {lib: case.not_run[lib] for lib in libs if lib in case.not_run}
    libs = {lib: m for lib, m in libs.items() if lib not in not_run}
    rec: dict[str, Any] = {"case": case.name, "group": case.group, "dtype": dtype,
                           "libs": sorted(libs, key=LIBS.index), "tolerance": TOLERANCE[dtype]}
    if not_run:
        rec["not_run"] = not_run
    fns = case.setup(dtype, libs)
    compile_s = {lib: fn.compile_s for lib, fn in fns.items()
                 if getattr(fn, "compile_s", None) is not None}
    if compile_s:
        rec["compile_s"] = compile_s  # measured in setup: never in the timed medians
    results = {lib: case.outputs(lib, fn()) for lib, fn in fns.items()}
    ok, errors = case.check(results, dtype)
    del results
    rec["check"] = {"ok": ok, "max_rel_error": errors}
    if not ok:  # not timed; measurements of ours alone (memory) are still reported
        rec["status"] = "FAILED CHECK"
        del fns
        rec.update(case.extra(dtype, libs))
        return rec
    rec["status"] = "ok"
    times, usage = time_fns(fns, repeats)
    flops = case.flops()
    rec["flops"] = flops
    rec["times_s"] = times
    rec["median_s"] = {lib: statistics.median(t) for lib, t in times.items()}
    rec["gflops"] = {lib: flops / t / 1e9 for lib, t in rec["median_s"].items()}
    rec["fraction_of_gemm"] = {lib: g / gemm[dtype] for lib, g in rec["gflops"].items()}
    med = rec["median_s"]
    rec["ratios"] = {f"ours/{lib}": med["ours"] / med[lib] for lib in med if lib != "ours"}
    rec["contention"] = contention_record(times, usage)
    verdict = rec["contention"]["contended"]
    # a ratio is reliable when neither of its two libraries' times was contended
    rec["ratio_reliable"] = {
        f"ours/{lib}": None if None in (verdict["ours"], verdict[lib])
        else not (verdict["ours"] or verdict[lib]) for lib in med if lib != "ours"}
    rec["split"] = time_split(fns["ours"], SPLIT_CALLS)  # after the timed calls, apart from them
    del fns
    rec.update(case.extra(dtype, libs))
    return rec


def environment(gemm: dict[str, float], threads: int) -> dict[str, Any]:
    """Machine, versions, BLAS and thread settings, and the measured GEMM rates."""
    info = {"python": sys.version.split()[0], "platform": platform.platform(),
            "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "numpy": np.__version__, "threads": threads,
            "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
            "blas": [{k: d.get(k) for k in ("internal_api", "version", "architecture",
                                             "num_threads", "threading_layer", "filepath")}
                     for d in threadpool_info()],
            "gemm_gflops": gemm}
    for mod in dict.fromkeys(MODULES.get(lib, lib) for lib in LIBS[1:]):
        m = sys.modules.get(mod)
        if m is not None:
            info[mod] = getattr(m, "__version__", "?")
    if "jax" in sys.modules:
        info["jaxlib"] = getattr(sys.modules.get("jaxlib"), "__version__", "?")
        info["jax_threads"] = jax_twin.xla_threads(threads)
    return info


def run(cases: Sequence[Case], dtypes: Sequence[str], repeats: int,
        libs: Sequence[str] = LIBS, echo: Callable[[str], None] = print,
        threads: int = THREADS) -> dict[str, Any]:
    """Run ``cases`` for each dtype under a ``threads`` limit; return the full report."""
    for name, value in (("repeats", repeats), ("threads", threads)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"run: {name} must be an int >= 1, got {value!r}")
    if not dtypes or set(dtypes) - set(TOLERANCE):
        raise ValueError(f"run: dtypes must be among {sorted(TOLERANCE)}, got {list(dtypes)}")
    if "ours" not in libs or set(libs) - set(LIBS):
        raise ValueError(f"run: libs must include 'ours' and be among {LIBS}, got {list(libs)}")
    modules, missing = import_libs(libs, threads)
    for msg in missing.values():
        echo(f"skipped: {msg}")
    previous = limit_compiled_threads(threads)  # None: no compiled kernels (Numba) here
    try:
        with threadpool_limits(limits=threads), miniresnet.use_backend("numpy"):
            w0, t0 = thread_waits(), time.perf_counter()
            gemm = {dt: gemm_rate(dt) for dt in dtypes}
            gemm_contended = contended(time.perf_counter() - t0, waited(w0, thread_waits()))
            env = {**environment(gemm, threads), "gemm_contended": gemm_contended,
                   "compiled_kernel_threads": None if previous is None else threads}
            report: dict[str, Any] = {"environment": env, "skipped": missing, "results": []}
            echo(header(report))
            for case in cases:
                for dt in dtypes:
                    echo(f"running {case.name} [{dt}] ...")
                    rec = run_case(case, dt, modules, repeats, gemm)
                    report["results"].append(rec)
    finally:
        if previous is not None:
            limit_compiled_threads(previous)
    verdicts = [v for r in report["results"] if "contention" in r
                for v in r["contention"]["contended"].values()]
    # True: some timing was contended; None: contention could not be measured here
    report["contended"] = True if True in verdicts else None if None in verdicts else False
    return report
