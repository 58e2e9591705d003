"""Shared test set-up: hypothesis profiles and the backend every test runs under."""

import os
import sys

import pytest
from hypothesis import HealthCheck, settings

import miniresnet as mr
from miniresnet.backends import BACKEND_NAMES, is_available

_common = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                      HealthCheck.too_slow])
settings.register_profile("ci", max_examples=20, derandomize=True, print_blob=True, **_common)
settings.register_profile("dev", max_examples=10, **_common)
settings.register_profile("thorough", max_examples=300, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(params=BACKEND_NAMES, autouse=True)
def backend(request):
    """Run every test under each backend; a backend that cannot run here is skipped, saying why."""
    ok, reason = is_available(request.param)
    if not ok:
        pytest.skip(f"backend {request.param!r} unavailable: {reason}")
    with mr.use_backend(request.param) as be:
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
