"""``python -m miniresnet.demo``: what skip connections and batch norm do to gradients, measured.

Runs the experiments of :mod:`miniresnet.experiments` (each a sweep of independent trials, see
:mod:`miniresnet.experiments.runner`), judges every claim against the paper's number by its
stated rule, and writes to ``--out`` (default ``results/``): the figures, ``results.json`` and
``REPORT.md``; a short table goes to the terminal. Finished trials are cached under
``OUT/.trials/``, so an interrupted or repeated run resumes without recomputing. The same seed
gives identical claims and data in-process, with ``--workers`` or on dask.

Exit status: 0 when everything ran (claims may still disagree with the papers: that is a
result), 1 when a trial or an experiment failed (all else is still written), 2 for bad
arguments (checked before any work), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from miniresnet import experiments
from miniresnet._cli import whole_number
from miniresnet.experiments import claims as claims_mod
from miniresnet.experiments import report, runner
from miniresnet.experiments.claims import SCALES
from miniresnet.files import write_atomic

PROG = "python -m miniresnet.demo"
VERSION = 1


def _parser() -> argparse.ArgumentParser:
    from miniresnet.backend_choice import current_backend
    from miniresnet.backends import BACKEND_NAMES

    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Measure what skip connections and batch norm do to gradients through\n"
                    "depth, beside each paper's own numbers; write the figures, results.json\n"
                    "and REPORT.md to --out. Without --quick or --full: the default scale.",
        epilog="experiments:\n  " + "\n  ".join(experiments.EXPERIMENTS)
               + f"\n({PROG} --list shows their questions and estimated times)\n\n"
               "Finished trials are cached in OUT/.trials/: rerunning resumes. Exit status: 0\n"
               "done, 1 a trial or experiment failed (the rest is written), 2 bad arguments,\n"
               "130 Ctrl-C.")
    which = p.add_argument_group("what to run")
    which.add_argument("--only", nargs="+", metavar="NAME", choices=experiments.EXPERIMENTS,
                       help="run only these experiments (listed below; default: all)")
    scale = which.add_mutually_exclusive_group()
    scale.add_argument("--quick", dest="scale", action="store_const", const="quick",
                       help="toy scale: every experiment together in about a minute (CI)")
    scale.add_argument("--full", dest="scale", action="store_const", const="full",
                       help="paper-like scale (see --list for the time)")
    which.add_argument("--seed", type=whole_number(0), default=0,
                       help="global seed, >= 0; each trial's seed derives from it and the "
                            "trial's config (default: %(default)s)")
    which.add_argument("--backend", choices=BACKEND_NAMES, default=current_backend().name,
                       help="array backend (default: %(default)s, from MINIRESNET_BACKEND)")
    which.add_argument("--data", metavar="PATH", default=None,
                       help="train on this .npz data set (keys x, y; see miniresnet.data."
                            "load_npz) instead of the bundled digits, in the experiments that "
                            "train (default: digits)")
    which.add_argument("--list", action="store_true",
                       help="list the experiments with their estimated times and exit")
    out = p.add_argument_group("output")
    out.add_argument("--out", metavar="DIR", default="results",
                     help="output folder, created if missing (default: %(default)s/)")
    out.add_argument("--replot", action="store_true",
                     help="redraw the figures and REPORT.md from OUT/results.json, measuring "
                          "nothing")
    out.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="progress bars on stderr (default: when it is a terminal)")
    where = p.add_argument_group("where trials run")
    where.add_argument("--workers", type=whole_number(1), default=None,
                       help="local worker processes (with --dask local: the cluster's worker "
                            "count; default: run in this process)")
    where.add_argument("--dask", metavar="ADDRESS", default=None,
                       help='a dask.distributed scheduler address, or "local" for a new '
                            'LocalCluster (pip install "miniresnet[distributed]")')
    where.add_argument("--threads", type=whole_number(1), default=1,
                       help="BLAS threads per trial; workers x threads must not exceed the "
                            "cores (default: %(default)s)")
    return p


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every check that can fail before any work."""
    from miniresnet.backends import is_available

    args.scale = args.scale or "default"
    if args.only:
        args.only = list(dict.fromkeys(args.only))  # each once, in the order given
    ok, why = is_available(args.backend)
    if not ok:
        parser.error(f"argument --backend: {why}")
    cores = os.cpu_count() or 1
    if (args.workers or 1) * args.threads > cores:
        parser.error(f"--workers {args.workers or 1} x --threads {args.threads} = "
                     f"{(args.workers or 1) * args.threads} BLAS threads, more than the "
                     f"{cores} cores here (oversubscribed BLAS threads slow everything down)")
    if args.dask is not None:
        if args.dask != "local" and args.workers is not None:
            parser.error("argument --workers: with --dask ADDRESS the cluster has its workers; "
                         "--workers applies to --dask local only")
        try:
            import distributed  # noqa: F401
        except ImportError:
            parser.error(f"argument --dask: {runner.DISTRIBUTED_MISSING}")
    if args.data is not None:
        from miniresnet.data import load_npz

        try:  # validated (and checked to load) before any work
            load_npz(args.data)
        except (OSError, ValueError, TypeError) as e:
            parser.error(f"argument --data: {e}")
        args.data = str(Path(args.data).absolute())
    out = Path(args.out)
    if out.exists():
        if not out.is_dir():
            parser.error(f"argument --out: {args.out!r} exists and is not a folder")
        if not os.access(out, os.W_OK | os.X_OK):
            parser.error(f"argument --out: the folder {args.out!r} is not writable")
    else:
        parent = out.absolute().parent
        if not parent.is_dir():
            parser.error(f"argument --out: the folder {str(parent)!r} that would hold "
                         f"{args.out!r} does not exist")
        if not os.access(parent, os.W_OK | os.X_OK):
            parser.error(f"argument --out: cannot create {args.out!r}: {str(parent)!r} is not "
                         "writable")
    if args.replot:
        given = [flag for flag, on in (("--quick/--full", args.scale != "default"),
                                       ("--workers", args.workers is not None),
                                       ("--dask", args.dask is not None)) if on]
        if given:
            parser.error(f"argument --replot: measures nothing, so {', '.join(given)} do not "
                         "apply (the scale is the one in results.json)")
        if not (out / "results.json").is_file():
            parser.error(f"argument --replot: no {str(out / 'results.json')!r} to redraw from")


# ---------------------------------------------------------------------------- provenance

def _git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def _blas() -> Any:
    """The BLAS libraries loaded (threadpoolctl), or NumPy's build-time BLAS, or None."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        import numpy as np

        try:
            blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        except Exception:
            return None
        return [{k: blas.get(k) for k in ("name", "version")}]
    return [{k: d.get(k) for k in ("internal_api", "version", "threading_layer")}
            for d in threadpool_info()]


def provenance(args: argparse.Namespace, ex: runner.InProcess) -> dict:
    """Where and with what the numbers were measured (never compared between runs)."""
    import numpy as np

    from miniresnet import __version__

    return {"miniresnet": __version__, "git_commit": _git_commit(),
            "python": platform.python_version(), "numpy": np.__version__, "blas": _blas(),
            "backend": args.backend, "data": args.data or "digits", "threads": args.threads,
            "executor": ex.kind,
            "workers": ex.workers, "cpu_count": os.cpu_count()}


# ---------------------------------------------------------------------------- running

def _plot(module: ModuleType, data: dict, out: Path) -> list[str]:
    """Draw ``module``'s figures into a temporary folder, then move each into ``out``."""
    tmp = Path(tempfile.mkdtemp(prefix=".plot-", dir=out))
    try:
        names = [str(n) for n in module.plot(json.loads(json.dumps(data)), tmp)]
        for name in names:
            target = out / name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / name, target)
        return names
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _error(e: BaseException, stage: str) -> dict:
    return {"type": type(e).__name__, "message": f"{stage}: {e}"}


def run_one(name: str, module: ModuleType, args: argparse.Namespace, out: Path,
            ex: runner.InProcess, after_trial=None) -> dict:
    """Measure, summarise, judge, plot and answer experiment ``name``: its results.json
    record."""
    start = time.perf_counter()
    record: dict = {"title": getattr(module, "TITLE", name), "setup": getattr(module, "SETUP", ""),
                    "seconds": 0.0, "figures": [], "claims": [], "data": {}, "failed": []}
    try:
        trials = runner.make_trials(name, module, args.scale, args.seed, data=args.data)
    except Exception as e:
        return {**record, "error": _error(e, "trials"), "seconds": time.perf_counter() - start}
    outcome = runner.run_experiment(name, module, trials, out, ex, backend=args.backend,
                                    progress=args.progress, after_trial=after_trial)
    record["failed"] = outcome.failed
    try:
        summary = module.summarise(outcome.results, args.scale)
        record["claims"] = [claims_mod.judge(c, args.scale) for c in summary["claims"]]
        record["data"] = runner.json_roundtrip(summary["data"])
    except Exception as e:
        record["error"] = _error(e, "summarise")
    else:
        try:
            record["figures"] = _plot(module, record["data"], out)
        except Exception as e:
            record["error"] = _error(e, "plot")
        _answer(module, record)
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record


def _answer(module: ModuleType, record: dict) -> None:
    """Set ``record["answer"]``, the module's one-sentence answer formatted from the record's
    data and judged claims; a failure is recorded like the other stages' (the claims and
    figures stay), unless an earlier stage's error is already there."""
    if not hasattr(module, "answer"):
        record.pop("answer", None)
        return
    try:
        record["answer"] = str(module.answer(json.loads(json.dumps(record["data"])),
                                             json.loads(json.dumps(record["claims"]))))
    except Exception as e:
        record.pop("answer", None)
        record.setdefault("error", _error(e, "answer"))


def write_outputs(results: dict, out: Path) -> None:
    """results.json and REPORT.md, each written atomically."""
    write_atomic(out / "results.json", json.dumps(results, indent=1) + "\n")
    write_atomic(out / "REPORT.md", report.render(results))


def _list() -> None:
    """Each experiment's estimated wall time per scale (on 2 cores, one process) and question."""
    print(f"{'experiment':<22} {'quick':>7} {'default':>8} {'full':>8}  question")
    total = dict.fromkeys(SCALES, 0.0)
    for name in experiments.EXPERIMENTS:
        try:
            module = experiments.load(name)
        except Exception as e:
            print(f"{name:<22} (cannot load: {type(e).__name__}: {e})")
            continue
        est = getattr(module, "ESTIMATE", {})
        for s in SCALES:
            total[s] += est.get(s, 0)
        times = [f"{est[s]:.0f} s" if s in est else "?" for s in SCALES]
        print(f"{name:<22} {times[0]:>7} {times[1]:>8} {times[2]:>8}  {module.TITLE}")
    times = [f"{total[s]:.0f} s" for s in SCALES]
    print(f"{'all':<22} {times[0]:>7} {times[1]:>8} {times[2]:>8}")


def _replot(args: argparse.Namespace, out: Path) -> dict:
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    if results.get("version") != VERSION:
        raise SystemExit(f"{PROG}: {out / 'results.json'} has version "
                         f"{results.get('version')!r}; this demo reads version {VERSION}")
    for name, record in results["experiments"].items():
        if args.only and name not in args.only:
            continue
        if record.get("error", {}).get("message", "").startswith("answer:"):
            del record["error"]  # only the answer failed, its data are whole: retried here
        if "error" in record:
            continue
        module = experiments.load(name)
        record["figures"] = _plot(module, record["data"], out)
        _answer(module, record)  # formatting of the data, like the figures: redone
    write_outputs(results, out)
    return results


def _run(args: argparse.Namespace, out: Path, after_trial=None) -> dict:
    modules, broken = {}, {}
    for name in args.only or experiments.EXPERIMENTS:
        try:
            modules[name] = experiments.load(name)
        except Exception as e:  # recorded; the other experiments still run
            broken[name] = {"title": name, "setup": "", "seconds": 0.0, "figures": [],
                            "claims": [], "data": {}, "failed": [], "error": _error(e, "import")}
    with runner.executor(args.workers, args.dask, args.threads) as ex:
        results = {"version": VERSION, "seed": args.seed, "scale": args.scale,
                   "provenance": provenance(args, ex), "experiments": {}}
        for name in args.only or experiments.EXPERIMENTS:
            results["experiments"][name] = broken.get(name) or run_one(
                name, modules[name], args, out, ex, after_trial)
    write_outputs(results, out)
    return results


def main(argv: list[str] | None = None, *, after_trial=None) -> dict | None:
    """``python -m miniresnet.demo``: see ``--help``. Returns the results (None for --list).

    ``after_trial`` is passed to :func:`runner.run_experiment` (a test hook)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.list:
        _list()
        return None
    _check(parser, args)
    out = Path(args.out)
    start = time.perf_counter()
    from miniresnet.backend_choice import use_backend

    try:
        out.mkdir(exist_ok=True)
        with use_backend(args.backend):
            results = _replot(args, out) if args.replot else _run(args, out, after_trial)
    except KeyboardInterrupt:
        print(f"interrupted: finished trials are kept in {out / '.trials'}; the same command "
              "resumes from them", file=sys.stderr)
        raise SystemExit(130) from None
    print(report.terminal_table(results))
    failures = [f"{name}: {r['error']['type']}: {r['error']['message']}"
                for name, r in results["experiments"].items() if "error" in r]
    failures += [f"{name}: {len(r['failed'])} failed trial(s)"
                 for name, r in results["experiments"].items() if r.get("failed")]
    print(f"\n{'redrew' if args.replot else 'wrote'} {out / 'REPORT.md'}, "
          f"{out / 'results.json'} and the figures in {time.perf_counter() - start:.1f} s")
    if failures:
        print("failed (see REPORT.md):\n  " + "\n  ".join(failures), file=sys.stderr)
        raise SystemExit(1)
    return results


if __name__ == "__main__":
    main()
