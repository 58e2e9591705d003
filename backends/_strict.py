"""array-api-strict backend: the reference array API namespace, with the generic conv helpers.

array-api-strict wraps NumPy but allows only what the standard allows, which makes it the
backend that proves the engine uses nothing beyond the standard. It is slow; use it in tests.
"""

from __future__ import annotations

from types import ModuleType

from ._generic import Backend, BackendUnavailable

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
    """``array_api_strict`` arrays; im2col / col2im use the array-API-only implementation."""

    def __init__(self, xp: ModuleType) -> None:
        super().__init__("array_api_strict", xp, type(xp.asarray(0)))


def check_available() -> tuple[bool, str]:
    """``(True, "")`` if array_api_strict imports, else ``(False, why and how to fix)``."""
    if _strict is None:
        return False, (
            f"array_api_strict cannot be imported ({type(_IMPORT_ERROR).__name__}: "
            f"{_IMPORT_ERROR}); install it with: {_INSTALL_HINT}"
        )
    return True, ""


def make_backend() -> StrictBackend:
    """Create the array_api_strict backend; raises BackendUnavailable if it cannot be used."""
    ok, why = check_available()
    if not ok:
        raise BackendUnavailable(f"backend 'array_api_strict' is unavailable: {why}")
    assert _strict is not None
    return StrictBackend(_strict)
