"""Shared test set-up: hypothesis profiles and the backend every test runs under."""

import os

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
