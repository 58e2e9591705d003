"""The benchmark's output: the header, the table with its notes, and the JSON file."""

from __future__ import annotations

import json
import os
from typing import Any

from miniresnet.bench.cases import LIBS
from miniresnet.bench.measure import WAIT_LIMIT
from miniresnet.bench.split import PARTS
from miniresnet.files import write_atomic


def header(report: dict[str, Any]) -> str:
    """The machine, BLAS and GEMM-rate lines printed before the cases run."""
    env = report["environment"]
    blas = "; ".join(f"{b['internal_api']} {b['version']} {b['architecture']} "
                     f"threads={b['num_threads']}" for b in env["blas"])
    gemm = ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in env["gemm_gflops"].items())
    jax = env.get("jax_threads")
    return (f"miniresnet bench | {env['platform']} | {env['cpu_count']} CPUs | numpy "
            f"{env['numpy']} | threads {env['threads']} | OPENBLAS_CORETYPE="
            f"{env['OPENBLAS_CORETYPE']} | load average {env['load_average_at_start']}\n"
            f"BLAS: {blas}\nGEMM (2048² matmul): {gemm}"
            + (" (contended: unreliable)" if env.get("gemm_contended") else "")
            + (f"\nJAX: XLA CPU pool of {jax['xla_pool_threads']} threads: {jax['method']}"
               if jax else ""))


def table(report: dict[str, Any]) -> str:
    """The results as a plain-text table (one row per case and dtype)."""
    others = LIBS[1:]
    cols = (["case", "dtype", "check (max rel err)"] + [f"{lib} ms" for lib in LIBS]
            + [f"ours/{lib}" for lib in others] + [f"GFLOP/s {'|'.join(LIBS)} (% GEMM)"])
    rows = []
    for r in report["results"]:
        errs = ", ".join(f"{k} {v:.1e}" for k, v in r["check"]["max_rel_error"].items())
        row = [r["case"], r["dtype"], f"{r['status']} ({errs or 'ours only'})"]
        if r["status"] != "ok":
            rows.append(row + ["—"] * (len(cols) - len(row)))
            continue
        med, verdict = r["median_s"], r["contention"]["contended"]
        row += [f"{med[lib] * 1e3:.1f}{'?' * bool(verdict[lib])}" if lib in med
                else "not run" if lib in r.get("not_run", {}) else "skipped" for lib in LIBS]
        row += [f"{r['ratios'][k]:.2f}{'?' * (r['ratio_reliable'][k] is False)}"
                if k in r["ratios"] else "—" for k in (f"ours/{lib}" for lib in others)]
        row.append(" | ".join(
            f"{r['gflops'][lib]:.2f} ({100 * r['fraction_of_gemm'][lib]:.1f}%)"
            if lib in med else "—" for lib in LIBS))
        rows.append(row)
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c)
              for i, c in enumerate(cols)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(cols, widths)),
             "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
    lines += contention_notes(report)
    lines += (thread_notes(report) + not_run_notes(report) + compile_notes(report)
              + split_lines(report))
    for r in report["results"]:
        if "memory" in r:
            lines.append(f"\nmemory, {r['case']} [{r['dtype']}] ({r['memory_method']}):")
            for m in r["memory"]:
                vals = ", ".join(f"{k[:-8]} {v:.1f} MB" for k, v in m.items()
                                 if k.endswith("_peak_MB"))
                lines.append(f"  n={m['n']:>4} ({m['layers']} layers): {vals}")
            g = r["graph_release"]
            lines.append(f"  graph released after backward: {g['activation_freed']} (held with "
                         f"loss alive {g['held_after_backward_MB']:.2f} MB; gradients "
                         f"{g['gradient_MB']:.2f} MB)")
    return "\n".join(lines)


def contention_notes(report: dict[str, Any]) -> list[str]:
    """The lines under the table that say whether its times were measured on a contended
    machine."""
    timed = [r["contention"] for r in report["results"] if "contention" in r]
    waits = [w for c in timed for lib, w in c["wait_per_wall"].items() if c["contended"][lib]]
    if waits:
        return [f"? contended: threads of this process waited for a CPU up to {max(waits):.2f} s "
                f"per second (limit {WAIT_LIMIT}) while timing the marked libraries: other "
                f"processes were running or more threads were busy than there are cores.",
                "  Those times and the ratios built on them are UNRELIABLE; rerun on an idle "
                "machine (or with fewer --threads)."]
    if any(None in c["contended"].values() for c in timed):
        return ["contention not measured (no /proc/self/task/*/schedstat here): the times "
                "assume an otherwise idle machine."]
    return []


def thread_notes(report: dict[str, Any]) -> list[str]:
    """A line under the table when JAX did not run with the benchmark's thread count."""
    env = report.get("environment", {})
    jax = env.get("jax_threads")
    if not jax or jax["matched"]:
        return []
    return [f"! jax and jax-jit ran with {jax['xla_pool_threads']} XLA threads, not "
            f"{env['threads']}: {jax['method']}; their times are not comparable."]


def not_run_notes(report: dict[str, Any]) -> list[str]:
    """Why a library was left out of a case, one line per library and case."""
    seen: dict[tuple[str, str], str] = {}
    for r in report["results"]:
        for lib, why in r.get("not_run", {}).items():
            seen.setdefault((lib, r["case"]), why)
    return [f"not run: {lib} on {case}: {why}" for (lib, case), why in seen.items()]


def compile_notes(report: dict[str, Any]) -> list[str]:
    """The compile times (first calls, in setup) of the jitted libraries, one line each."""
    times: dict[str, list[str]] = {}
    for r in report["results"]:
        for lib, t in r.get("compile_s", {}).items():
            times.setdefault(lib, []).append(f"{r['case']} [{r['dtype']}] {t:.2f} s")
    return [f"{lib} compile time (its first call, in setup; not in the medians): "
            + ", ".join(v) for lib, v in times.items()]


def split_lines(report: dict[str, Any]) -> list[str]:
    """Where our time goes, one line per timed case and dtype (see :mod:`.split`)."""
    rows = [r for r in report["results"] if "split" in r]
    if not rows:
        return []
    lines = ["where ours' time goes (separate calls, each primitive's forward impl timed; "
             "engine = the rest: tracing, tape, checks, Python, timers):"]
    for r in rows:
        sp = r["split"]
        parts = " | ".join(f"{k} {sp['parts_s'][k] * 1e3:.1f} ms {100 * sp['fractions'][k]:.0f}%"
                           for k in PARTS)
        lines.append(f"  {r['case']} [{r['dtype']}] {sp['wall_s'] * 1e3:.1f} ms: {parts} "
                     f"({sp['primitive_calls']} impl calls; timers ~"
                     f"{sp['timer_overhead_s'] * 1e3:.1f} ms)")
    return lines


def write_json(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``report`` to ``path`` atomically (:func:`miniresnet.files.write_atomic`)."""
    write_atomic(path, json.dumps(report, indent=1, default=float))
