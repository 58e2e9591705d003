"""Run an experiment's trials on an executor, caching each finished trial on disk.

A :class:`Trial` is one call ``run_trial(config, seed)`` of an experiment module. Its seed is
derived from the run's global seed, the experiment's name and the canonical JSON of its config
by SHA-256 (:func:`trial_seed`; never Python's ``hash()``, which varies between processes), so
a trial computes the same numbers wherever it runs. Executors (:func:`executor`):

* in-process (the default);
* a local process pool (``workers=N``, :class:`concurrent.futures.ProcessPoolExecutor`);
* a ``dask.distributed`` cluster (``dask=ADDRESS``, or ``"local"`` for a ``LocalCluster`` of
  ``workers`` single-threaded processes; ``pip install "miniresnet[distributed]"``).

Every trial runs with ``threads`` BLAS threads (default 1, through ``threadpoolctl`` when it is
installed; pool workers also set ``OPENBLAS_NUM_THREADS`` and friends), so results do not
depend on the executor and ``workers × threads`` cores are enough.

Each finished trial is written atomically (:func:`miniresnet.files.write_atomic`) to
``OUT/.trials/<experiment>/<sha256 of config, seed, scale, version>.json`` (:func:`trial_key`;
the version is the package's, plus a digest of the experiment module's source so that editing
an experiment invalidates its cache). :func:`run_experiment` loads those first and recomputes
nothing cached; a trial that raises is recorded as failed (not cached, so a rerun retries it)
and the sweep goes on.

Trained networks shared between experiments (:mod:`miniresnet.experiments.training`) are stored
in ``OUT/.trials/_train/``: :func:`run_experiment` passes that folder to :func:`execute`, which
sets it (:func:`~miniresnet.experiments.training.store_at`) around the trial in whichever
process runs it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from miniresnet.backends import limit_compiled_threads
from miniresnet.experiments.keys import canonical, code_version, sha256
from miniresnet.files import write_atomic  # also imported from here by callers

BLAS_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
TRAINED = "_train"  # OUT/.trials/_train/: the shared trained networks (not an experiment)
DISTRIBUTED_MISSING = ('dask.distributed is not installed; install it with '
                       'pip install "miniresnet[distributed]"')


@dataclass(frozen=True, eq=True)
class Trial:
    """One trial: ``module.run_trial(config, seed)`` of experiment ``experiment`` at ``scale``."""

    experiment: str
    config: dict = field(hash=False)
    seed: int
    scale: str


@dataclass
class Outcome:
    """What :func:`run_experiment` returns.

    ``results`` are the ``(config, data)`` pairs of the trials that succeeded, in the order of
    the trials; ``failed`` one ``{"config", "seed", "error": {"type", "message"}}`` per trial
    that raised; ``computed`` and ``cached`` count the trials run now and loaded from disk.
    """

    results: list[tuple[dict, dict]]
    failed: list[dict]
    computed: int
    cached: int


# ---------------------------------------------------------------------------- JSON and keys

def to_json(obj: Any) -> Any:
    """``obj`` with NumPy arrays and scalars made lists and Python numbers, tuples lists."""
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_json(v) for v in obj]
    tolist = getattr(obj, "tolist", None)  # NumPy arrays and scalars (np.float64 is a float)
    if callable(tolist):
        return to_json(tolist())
    if isinstance(obj, bool | int | float | str) or obj is None:
        return obj
    raise TypeError(f"not JSON-ready: {type(obj).__name__} {obj!r:.80}")


def json_roundtrip(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (so fresh and cached results are identical)."""
    return json.loads(json.dumps(to_json(obj)))


def trial_seed(seed: int, experiment: str, config: dict) -> int:
    """The seed of the trial ``config`` of ``experiment`` in a run seeded ``seed`` (< 2**32)."""
    digest = hashlib.sha256(canonical([int(seed), experiment, config]).encode()).digest()
    return int.from_bytes(digest[:4], "big")


def trial_key(trial: Trial, version: str) -> str:
    """SHA-256 of the trial's config, seed, scale and the code ``version`` (the cache key)."""
    return sha256(canonical({"config": trial.config, "seed": trial.seed, "scale": trial.scale,
                              "version": version}))


def make_trials(name: str, module: ModuleType, scale: str, seed: int,
                data: str | None = None) -> list[Trial]:
    """The trials of experiment ``name`` at ``scale``; configs checked JSON-ready and distinct.
    ``data`` (an .npz path) goes to the experiments that train, whose ``trials`` take it."""
    takes_data = "data" in inspect.signature(module.trials).parameters
    options = {"data": data} if data is not None and takes_data else {}
    trials, seen = [], set()
    for config in module.trials(scale, seed, **options):
        if not isinstance(config, dict):
            raise TypeError(f"{name}.trials: a config must be a dict, got {type(config).__name__}")
        try:
            text = canonical(config)
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name}.trials: config {config!r:.200} is not JSON-ready: {e}") \
                from None
        if text in seen:
            raise ValueError(f"{name}.trials: config {text:.200} appears twice")
        seen.add(text)
        config = json.loads(text)
        trials.append(Trial(name, config, trial_seed(seed, name, config), scale))
    return trials


# ---------------------------------------------------------------------------- one trial

@contextlib.contextmanager
def blas_threads(threads: int) -> Iterator[None]:
    """Limit BLAS (through threadpoolctl, when installed) and the compiled kernels to
    ``threads`` threads inside the block."""
    previous = limit_compiled_threads(threads)
    try:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            yield
            return
        with threadpool_limits(limits=threads):
            yield
    finally:
        if previous is not None:
            limit_compiled_threads(previous)


def execute(module_name: str, config: dict, seed: int, threads: int, backend: str,
            store: str | None = None) -> dict:
    """Run one trial where this function is called (any process); never raises for the trial.

    ``store`` is the folder of the shared trained networks for the trial (None: none).

    Returns ``{"ok": True, "result": data, "seconds": s}`` with ``data`` JSON round-tripped,
    or ``{"ok": False, "error": {"type", "message", "traceback"}, "seconds": s}``.
    """
    import miniresnet as mr
    from miniresnet.experiments.training import store_at

    start = time.perf_counter()
    try:
        module = importlib.import_module(module_name)
        with blas_threads(threads), mr.use_backend(backend), store_at(store):
            result = json_roundtrip(module.run_trial(config, seed))
        if not isinstance(result, dict):
            raise TypeError(f"run_trial returned {type(result).__name__}, not a dict")
        return {"ok": True, "result": result, "seconds": time.perf_counter() - start}
    except Exception as e:  # a failed trial is data; KeyboardInterrupt still stops the run
        return {"ok": False, "seconds": time.perf_counter() - start,
                "error": {"type": type(e).__name__, "message": str(e),
                          "traceback": traceback.format_exc(limit=-3)}}


def _init_worker(threads: int) -> None:
    """Pool worker start-up: BLAS threads limited, Ctrl-C left to the parent process."""
    for var in BLAS_VARIABLES:
        os.environ[var] = str(threads)
    limit_compiled_threads(threads)
    with contextlib.suppress(ImportError):
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ---------------------------------------------------------------------------- executors

class InProcess:
    """Runs trials one after another in this process."""

    kind = "in-process"
    workers = 1

    def __init__(self, threads: int = 1):
        self.threads = threads

    def map(self, calls: Iterable[tuple]) -> Iterator[tuple[int, dict]]:
        """``(index, execute(*args))`` for each ``args`` of ``calls``, as they finish."""
        for i, args in enumerate(calls):
            yield i, execute(*args)

    def close(self) -> None:
        pass


class ProcessPool(InProcess):
    """A local pool of ``workers`` processes (spawned, so nothing inherited by accident)."""

    kind = "processes"

    def __init__(self, workers: int, threads: int = 1):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        super().__init__(threads)
        self.workers = workers
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_init_worker, initargs=(threads,))

    def map(self, calls: Iterable[tuple]) -> Iterator[tuple[int, dict]]:
        from concurrent.futures import as_completed

        futures = {self.pool.submit(execute, *args): i for i, args in enumerate(calls)}
        try:
            for future in as_completed(futures):
                yield futures[future], future.result()
        finally:
            for future in futures:
                future.cancel()

    def close(self) -> None:
        processes = list((getattr(self.pool, "_processes", None) or {}).values())
        self.pool.shutdown(wait=False, cancel_futures=True)
        for p in processes:  # a trial still running is abandoned (its result was not needed)
            with contextlib.suppress(Exception):
                p.terminate()


class Dask(InProcess):
    """A ``dask.distributed`` client: to ``address``, or to a new ``LocalCluster`` ("local")."""

    kind = "dask"

    def __init__(self, address: str, workers: int | None = None, threads: int = 1):
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            raise ImportError(DISTRIBUTED_MISSING) from None
        import logging

        super().__init__(threads)
        self.cluster = None
        if address == "local":
            with _sigint_ignored():  # inherited by the worker processes: Ctrl-C is ours
                self.cluster = LocalCluster(n_workers=workers or 1, threads_per_worker=1,
                                            processes=True, dashboard_address=None,
                                            silence_logs=logging.ERROR)
            self.client = Client(self.cluster)
        else:
            self.client = Client(address)
        self.workers = len(self.client.scheduler_info().get("workers", {})) or workers or 1
        self.client.run(_init_worker_dask, threads)

    def map(self, calls: Iterable[tuple]) -> Iterator[tuple[int, dict]]:
        from distributed import as_completed

        futures = {}
        for i, args in enumerate(calls):
            key = f"miniresnet-trial-{i}-{sha256(canonical(list(args[:3])))[:16]}"
            futures[self.client.submit(execute, *args, key=key, pure=False)] = i
        try:
            for future in as_completed(list(futures)):
                yield futures[future], future.result()
        finally:
            for future in futures:
                future.cancel()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()
        if self.cluster is not None:
            with contextlib.suppress(Exception):
                self.cluster.close()


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored in the block (in the main thread only), e.g. while starting processes."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _init_worker_dask(threads: int) -> None:
    for var in BLAS_VARIABLES:
        os.environ[var] = str(threads)
    limit_compiled_threads(threads)
    with contextlib.suppress(ImportError):
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=threads)


@contextlib.contextmanager
def executor(workers: int | None = None, dask: str | None = None,
             threads: int = 1) -> Iterator[InProcess]:
    """The executor for these options (closed on leaving the block): see the module docs."""
    if dask is not None:
        ex = Dask(dask, workers, threads)
    elif workers is not None and workers > 1:
        ex = ProcessPool(workers, threads)
    else:
        ex = InProcess(threads)
    try:
        yield ex
    finally:
        ex.close()


# ---------------------------------------------------------------------------- a sweep

def _read_cached(path: Path, trial: Trial) -> dict | None:
    """The cached result of ``trial`` at ``path``, or None (missing, unreadable, or foreign)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("config") != trial.config \
            or record.get("seed") != trial.seed or not isinstance(record.get("result"), dict):
        return None
    return record["result"]


def run_experiment(name: str, module: ModuleType, trials: list[Trial], out: str | os.PathLike,
                   ex: InProcess | None = None, *, backend: str | None = None,
                   progress: bool | None = None,
                   after_trial: Callable[[Trial, dict], None] | None = None) -> Outcome:
    """Run ``trials`` of experiment ``name`` (module ``module``) on executor ``ex``.

    Trials cached under ``out/.trials/name/`` are loaded, the others run on ``ex`` (default
    in-process, one BLAS thread) under backend ``backend`` (default: the current one) and
    cached as they finish. ``progress`` shows a bar on stderr (default: when it is a terminal).
    ``after_trial(trial, record)`` is called after each computed trial is cached (a test hook:
    raising there stops the sweep as a kill would).
    """
    from tqdm.auto import tqdm

    from miniresnet.backend_choice import current_backend

    backend = backend or current_backend().name
    ex = ex or InProcess()
    folder = Path(out) / ".trials" / name
    folder.mkdir(parents=True, exist_ok=True)
    version = code_version(module)
    paths = [folder / f"{trial_key(t, version)}.json" for t in trials]
    records: dict[int, dict] = {}
    for i, (t, path) in enumerate(zip(trials, paths)):
        result = _read_cached(path, t)
        if result is not None:
            records[i] = {"ok": True, "result": result}
    cached = len(records)
    todo = [i for i in range(len(trials)) if i not in records]
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=len(trials), initial=cached, desc=name, file=sys.stderr, disable=not show,
               unit="trial", leave=True, dynamic_ncols=True)
    try:
        store = str((Path(out) / ".trials" / TRAINED).resolve())
        calls = [(module.__name__, trials[i].config, trials[i].seed, ex.threads, backend, store)
                 for i in todo]
        for j, record in ex.map(calls):
            i = todo[j]
            records[i] = record
            if record["ok"]:
                write_atomic(paths[i], json.dumps(
                    {"experiment": name, "config": trials[i].config, "seed": trials[i].seed,
                     "scale": trials[i].scale, "version": version,
                     "seconds": record["seconds"], "result": record["result"]}, indent=1))
            bar.update(1)
            if after_trial is not None:
                after_trial(trials[i], record)
    finally:
        bar.close()
    results, failed = [], []
    for i, t in enumerate(trials):
        r = records[i]
        if r["ok"]:
            results.append((t.config, r["result"]))
        else:
            failed.append({"config": t.config, "seed": t.seed,
                           "error": {k: r["error"][k] for k in ("type", "message")}})
    return Outcome(results, failed, len(todo), cached)

