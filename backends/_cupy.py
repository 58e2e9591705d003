"""CuPy backend: ``array_api_compat.cupy`` on an NVIDIA GPU.

CuPy is imported inside a ``try`` and the backend counts as available only if the import works
and ``cupy.cuda.runtime.getDeviceCount()`` reports at least one device. Nothing here touches the
GPU before :func:`make_backend` is called on a machine where :func:`check_available` is true.

The conv kernels are the array-API-only ones of :class:`._generic.Backend`: im2col by kh * kw
strided slice copies and one stack, col2im by in-place strided ``+=``, conv and its adjoints
built on these two and ``tensordot``.
Random numbers are drawn on the host (see :class:`._generic.Rng`) and copied to the device, so
they match the other backends bit for bit.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from ._generic import Backend
from ._registry import BackendUnavailable

__all__ = ["CupyBackend", "check_available", "make_backend"]

_INSTALL_HINT = 'pip install -e ".[cuda]" (CuPy for CUDA 12; needs an NVIDIA GPU and driver)'

try:
    import cupy as _cupy
except Exception as exc:  # noqa: BLE001 - ImportError, or CUDA libraries failing to load
    _cupy: ModuleType | None = None  # type: ignore[no-redef]
    _IMPORT_ERROR: Exception | None = exc
else:
    _IMPORT_ERROR = None

_status: tuple[bool, str] | None = None


def _probe() -> str:
    """Why CuPy cannot be used here, or ``""`` if it can."""
    if _cupy is None:
        return (
            f"CuPy cannot be imported ({type(_IMPORT_ERROR).__name__}: {_IMPORT_ERROR}); "
            f"install it with: {_INSTALL_HINT}"
        )
    try:
        count = int(_cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:  # noqa: BLE001 - no driver, no device, ...
        return (
            f"CuPy is installed but no CUDA device can be queried ({type(exc).__name__}: {exc}); "
            f"this backend needs an NVIDIA GPU and driver; install CuPy with: {_INSTALL_HINT}"
        )
    if count < 1:
        return "CuPy is installed but found no CUDA device (getDeviceCount() == 0)"
    try:
        import array_api_compat.cupy  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return (
            f"array_api_compat.cupy cannot be imported ({type(exc).__name__}: {exc}); "
            "upgrade it with: pip install -U array-api-compat"
        )
    return ""


def check_available() -> tuple[bool, str]:
    """``(True, "")`` if CuPy imports and sees a CUDA device, else ``(False, why and fix)``.

    The probe runs once per process; its answer is cached.
    """
    global _status
    if _status is None:
        why = _probe()
        _status = (not why, why)
    return _status


class CupyBackend(Backend):
    """CuPy arrays through ``array_api_compat.cupy``."""

    def __init__(self, cupy: ModuleType, xp: ModuleType) -> None:
        super().__init__("cupy", xp, cupy.ndarray)
        self._cupy = cupy

    def _host(self, x: Any) -> Any:
        return x.get()  # device -> host copy

    def synchronize(self) -> None:
        """Block until all work queued on the current CUDA device has finished."""
        self._cupy.cuda.Device().synchronize()


def make_backend() -> CupyBackend:
    """Create the CuPy backend; raises BackendUnavailable (with the reason) if it cannot be used."""
    ok, why = check_available()
    if not ok:
        raise BackendUnavailable(f"backend 'cupy' is unavailable: {why}")
    import array_api_compat.cupy as xp_cupy

    assert _cupy is not None
    return CupyBackend(_cupy, xp_cupy)
