"""The benchmark's output: the header, the table with its notes, and the JSON file."""

from __future__ import annotations

import json
import os
from typing import Any

from miniresnet.bench.cases import LIBS
from miniresnet.bench.measure import WAIT_LIMIT
from miniresnet.files import write_atomic


def header(report: dict[str, Any]) -> str:
    """The machine, BLAS and GEMM-rate lines printed before the cases run."""
    env = report["environment"]
    blas = "; ".join(f"{b['internal_api']} {b['version']} {b['architecture']} "
                     f"threads={b['num_threads']}" for b in env["blas"])
    gemm = ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in env["gemm_gflops"].items())
    return (f"miniresnet bench | {env['platform']} | {env['cpu_count']} CPUs | numpy "
            f"{env['numpy']} | threads {env['threads']} | OPENBLAS_CORETYPE="
            f"{env['OPENBLAS_CORETYPE']} | load average {env['load_average_at_start']}\n"
            f"BLAS: {blas}\nGEMM (2048² matmul): {gemm}"
            + (" (contended: unreliable)" if env.get("gemm_contended") else ""))


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
        row += [f"{med[lib] * 1e3:.1f}{'?' * bool(verdict[lib])}" if lib in med else "skipped"
                for lib in LIBS]
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


def write_json(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``report`` to ``path`` atomically (:func:`miniresnet.files.write_atomic`)."""
    write_atomic(path, json.dumps(report, indent=1, default=float))
