"""Shared test set-up: hypothesis profiles and the backend every test runs under.

Every test that takes the ``backend`` fixture runs once per backend of
:data:`~miniresnet.backends.BACKEND_NAMES`, including the GPU stand-in
``array_api_strict_device1`` (see :data:`DEVICE_BACKEND`), except the modules of
:data:`NOT_ON_DEVICE` (``pytest --all-on-device`` runs those there too). A test marked
``@pytest.mark.backends(name, ...)`` runs only under those backends.
"""

import os
import sys

import pytest
from hypothesis import HealthCheck, settings

import miniresnet as mr
from miniresnet import tracing
from miniresnet.backends import BACKEND_NAMES, is_available

_common = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                      HealthCheck.too_slow])
settings.register_profile("ci", max_examples=20, derandomize=True, print_blob=True, **_common)
settings.register_profile("dev", max_examples=10, **_common)
settings.register_profile("thorough", max_examples=300, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

#: the GPU stand-in: array_api_strict arrays on a second device; under it, arrays refuse to
#: become NumPy arrays or Python scalars and to meet arrays of another device, and every
#: primitive's result must be on its inputs' device
DEVICE_BACKEND = "array_api_strict_device1"
#: modules not run on it by default, to save CI time: the oracle tests (test_vs_autograd)
#: cover every primitive there, the rest cover transforms, nn, SGD, fit, data and checkpoints
NOT_ON_DEVICE = {"test_algebra", "test_deep_networks", "test_readme", "test_bench", "test_demo"}


def pytest_addoption(parser):
    parser.addoption("--all-on-device", action="store_true",
                     help=f"also run the modules {', '.join(sorted(NOT_ON_DEVICE))} on the "
                          f"{DEVICE_BACKEND} backend")


def pytest_configure(config):
    config.addinivalue_line("markers", "backends(*names): run only under these backends")
    if hasattr(config, "workerinput"):  # a pytest-xdist worker (pytest -n auto)
        _one_thread_per_worker()


def _one_thread_per_worker() -> None:
    """Under pytest-xdist each worker is one of as many processes as there are cores: BLAS and
    the compiled kernels get one thread each, in the worker and (BLAS) in the processes its
    tests start, so that workers x threads never exceed the cores (oversubscribed BLAS threads
    slow a 2-core machine down several times)."""
    from threadpoolctl import threadpool_limits

    from miniresnet.backends import limit_compiled_threads
    from miniresnet.experiments.runner import BLAS_VARIABLES

    for name in BLAS_VARIABLES:
        os.environ[name] = "1"
    threadpool_limits(limits=1)
    limit_compiled_threads(1)


def pytest_collection_modifyitems(config, items):
    """Drop the runs that :data:`NOT_ON_DEVICE` and ``backends`` marks rule out."""
    everything = config.getoption("--all-on-device")
    kept, dropped = [], []
    for item in items:
        name = item.callspec.params.get("backend") if hasattr(item, "callspec") else None
        only = item.get_closest_marker("backends")
        module = item.module.__name__.rpartition(".")[2] if item.module else ""
        drop = name is not None and (
            (only is not None and name not in only.args)
            or (name == DEVICE_BACKEND and module in NOT_ON_DEVICE and not everything))
        (dropped if drop else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def _refuse_implicit_host_values(monkeypatch, be) -> None:
    """Make ``float()``, ``int()``, ``bool()`` and ``operator.index`` of an array on ``be``'s
    device fail as ``np.asarray`` does: each is a device -> host transfer (a synchronisation on a
    GPU) that must go through ``Backend.to_numpy``, the documented host boundary."""
    for name in ("__bool__", "__int__", "__float__", "__index__", "__complex__"):
        original = getattr(be.array_type, name)

        def refuse(self, _original=original, _name=name):
            if self.device == be.device:
                raise RuntimeError(f"{_name}() of an array on {self.device}: an implicit "
                                   "device -> host transfer (use the backend's to_numpy)")
            return _original(self)

        monkeypatch.setattr(be.array_type, name, refuse)


def _check_placement(monkeypatch) -> None:
    """Make every primitive evaluation fail unless its result is on its array inputs' device
    (a result created on the default device would otherwise go unnoticed until it met another
    array)."""
    evaluate = tracing._evaluate

    def checked(prim, args, params, reuse=None):
        out, saved = evaluate(prim, args, params, reuse)
        raws = [a.raw if isinstance(a, mr.Tensor) else a for a in args]
        devices = {r.device for r in raws if isinstance(r, type(out.raw))}
        if out.raw.device not in devices:
            raise AssertionError(f"{prim.name} created its result on {out.raw.device}; its "
                                 f"inputs are on {', '.join(map(str, devices))}")
        return out, saved

    monkeypatch.setattr(tracing, "_evaluate", checked)


@pytest.fixture(autouse=True)
def one_blas_thread_for_trials(request):
    """Experiment and training-trial tests run as the runner runs trials, with one BLAS thread:
    oversubscribed BLAS threads slow a shared 2-core machine down several times."""
    name = request.module.__name__.rpartition(".")[2]
    if not (name.startswith("test_exp_") or name == "test_training_trials"):
        yield
        return
    from miniresnet.experiments.runner import blas_threads

    with blas_threads(1):
        yield


@pytest.fixture
def fits(monkeypatch):
    """The start epoch of every training run of the shared trained-network store, in order (a
    test of the store counts them to see what was trained and what was loaded)."""
    from miniresnet.experiments import training

    calls = []
    real = training.fit

    def counting(*args, **kw):
        calls.append(kw["start_epoch"])
        return real(*args, **kw)

    monkeypatch.setattr(training, "fit", counting)
    return calls


@pytest.fixture(params=BACKEND_NAMES, autouse=True)
def backend(request, monkeypatch):
    """Run every test under each backend; a backend that cannot run here is skipped, saying why."""
    ok, reason = is_available(request.param)
    if not ok:
        pytest.skip(f"backend {request.param!r} unavailable: {reason}")
    with mr.use_backend(request.param) as be:
        if request.param == DEVICE_BACKEND:
            _refuse_implicit_host_values(monkeypatch, be)
            _check_placement(monkeypatch)
        yield be


def pytest_terminal_summary(terminalreporter):
    """Print the largest relative error seen against HIPS autograd, per kind of comparison."""
    oracle = sys.modules.get("oracle")
    if oracle is None or not oracle.MAX_ERRORS_BY_KIND:
        return
    terminalreporter.section("largest relative error against HIPS autograd")
    for kind, errors in sorted(oracle.MAX_ERRORS_BY_KIND.items()):
        case, err = max(errors.items(), key=lambda item: item[1])
        terminalreporter.write_line(f"{kind:>14}: {err:.1e} ({case}; {len(errors)} cases)")
