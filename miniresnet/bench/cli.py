"""The command line, ``python -m miniresnet.bench``: arguments are checked before any work."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from miniresnet._cli import whole_number
from miniresnet.bench.cases import GROUPS, LIBS, TOLERANCE, build_cases
from miniresnet.bench.report import table, write_json
from miniresnet.bench.runner import THREADS, run

PROG = "python -m miniresnet.bench"


def _names(valid: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type: a non-empty comma-separated list of names among ``valid``."""
    def parse(text: str) -> list[str]:
        names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
        bad = [n for n in names if n not in valid]
        if bad or not names:
            what = f"unknown {', '.join(map(repr, bad))}" if bad else "empty list"
            raise argparse.ArgumentTypeError(f"{what} (choose from {', '.join(valid)})")
        return names
    return parse


def _json_target(text: str) -> str:
    """An argparse type: a file path whose folder exists and takes a new file (tried now, so
    that a long run does not end unable to save)."""
    if not text or os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder or empty; name a file")
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"the folder {folder!r} of {text!r} is not an "
                                         f"existing folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(
            f"cannot create a file in the folder {folder!r} ({exc.strerror})") from None
    return text


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The command line: see ``python -m miniresnet.bench --help``. Ctrl-C stops it with exit
    status 130 after one line (the report is written only at the end)."""
    p = argparse.ArgumentParser(
        prog=PROG, description="Time miniresnet side by side with PyTorch, HIPS autograd and "
        "JAX (eager, and jax-jit: compiled, its compile time reported apart), in one process, "
        "after checking that every library computes the same numbers; then show where our "
        "time goes (conv, batch norm, elementwise, other primitives, engine).",
        epilog="JAX gets --threads through PJRT_NPROC, set before XLA creates its CPU client "
               "(otherwise XLA uses every CPU the process may use). "
               "Times and ratios marked '?' were measured while this process's threads waited "
               "for a CPU (a contended machine) and are unreliable. Ctrl-C stops it (exit "
               "status 130); nothing is written.")
    p.add_argument("--cases", type=_names(GROUPS), default=",".join(GROUPS),
                   help=f"comma-separated case groups among {', '.join(GROUPS)} "
                        f"(default: %(default)s)")
    p.add_argument("--repeats", type=whole_number(1), default=None,
                   help="timed calls per library, at least 5 unless --quick (default: 5, or 2 "
                        "with --quick)")
    p.add_argument("--dtypes", type=_names(tuple(TOLERANCE)), default=",".join(TOLERANCE),
                   help=f"comma-separated, among {', '.join(TOLERANCE)} (default: "
                        f"%(default)s)")
    p.add_argument("--libs", type=_names(LIBS), default=",".join(LIBS),
                   help=f"comma-separated, among {', '.join(LIBS)}; must include ours "
                        f"(default: %(default)s)")
    p.add_argument("--threads", type=whole_number(1), default=THREADS,
                   help="threads of every library (BLAS pools, our compiled kernels, PyTorch, "
                        "XLA's CPU pool) "
                        "(default: %(default)s)")
    p.add_argument("--json", metavar="PATH", type=_json_target, default=None,
                   help="save the full report here as JSON (its folder must exist)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and 2 repeats (for tests)")
    a = p.parse_args(argv)
    repeats = a.repeats if a.repeats is not None else (2 if a.quick else 5)
    if repeats < 5 and not a.quick:
        p.error(f"argument --repeats: must be at least 5 without --quick, got {repeats}")
    if "ours" not in a.libs:
        p.error(f"argument --libs: must include ours, got {','.join(a.libs)}")
    cases = [c for c in build_cases(a.quick) if c.group in a.cases]
    try:
        report = run(cases, a.dtypes, repeats, a.libs, threads=a.threads)
        report["repeats"] = repeats
        print(table(report))
        if a.json:
            write_json(report, a.json)
            print(f"saved {a.json}")
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (Ctrl-C)" + ("; no report saved" if a.json else ""),
              file=sys.stderr)
        raise SystemExit(130) from None
    return report
