"""array-api-strict backend: the reference array API namespace, with the generic conv kernels.

array-api-strict wraps NumPy but allows only what the standard allows, which makes it the
backend that proves the engine uses nothing beyond the standard. It is slow; use it in tests.

The ``array_api_strict_device1`` backend creates its arrays on array-api-strict's second device,
``Device("device1")``: such arrays refuse conversion to NumPy (``np.asarray``, ``__array__``)
and refuse to meet arrays of another device in one operation, the mistakes that break on a GPU
(and on a second GPU). The test suite runs on it to prove that the engine keeps every array on
the device of its inputs and leaves a device only through the backend's ``to_numpy``.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from ._generic import Backend
from ._registry import BackendUnavailable

__all__ = ["StrictBackend", "check_available", "make_backend"]

_INSTALL_HINT = 'pip install array-api-strict (or pip install -e ".[test]")'

try:
    import array_api_strict as _strict
except Exception as exc:  # noqa: BLE001 - any import failure makes the backend unavailable
    _strict: ModuleType | None = None  # type: ignore[no-redef]
    _IMPORT_ERROR: Exception | None = exc
else:
    _IMPORT_ERROR = None


class StrictBackend(Backend):
    """``array_api_strict`` arrays on one device (default: its CPU device), with the
    array-API-only conv kernels."""

    def __init__(self, xp: ModuleType, device: str | None = None) -> None:
        self._cpu = xp.__array_namespace_info__().default_device()
        name = "array_api_strict" if device is None else f"array_api_strict_{device}"
        super().__init__(name, xp, type(xp.asarray(0)),
                         device=self._cpu if device is None else xp.Device(device))

    def _host(self, x: Any) -> np.ndarray:
        return np.asarray(x.to_device(self._cpu))


def check_available() -> tuple[bool, str]:
    """``(True, "")`` if array_api_strict imports, else ``(False, why and how to fix)``."""
    if _strict is None:
        return False, (
            f"array_api_strict cannot be imported ({type(_IMPORT_ERROR).__name__}: "
            f"{_IMPORT_ERROR}); install it with: {_INSTALL_HINT}"
        )
    return True, ""


def make_backend(device: str | None = None) -> StrictBackend:
    """Create the array_api_strict backend on ``device`` (a name array-api-strict knows, e.g.
    ``"device1"``; ``None``: its CPU device); raises BackendUnavailable if it cannot be used."""
    ok, why = check_available()
    if not ok:
        raise BackendUnavailable(f"backend 'array_api_strict' is unavailable: {why}")
    assert _strict is not None
    return StrictBackend(_strict, device)
