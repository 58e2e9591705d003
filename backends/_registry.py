"""The registry of backends: names, lazy creation, and which backend owns an array.

Backend modules are loaded by name on first use (:func:`get_backend`); the registry uses only
the attributes every :class:`~._generic.Backend` has (``array_type``, ``device``,
``scalar_type``), so it imports no other module of this package (``Backend`` in the annotations
below means a :class:`~._generic.Backend`) and every one of them may import it.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any

Backend = Any  # a _generic.Backend; not imported, which would make the two modules a cycle

__all__ = [
    "BACKEND_NAMES",
    "PYTHON_SCALARS",
    "BackendUnavailable",
    "available_backends",
    "backend_of",
    "get_backend",
    "is_available",
    "python_scalar",
]

BACKEND_NAMES: tuple[str, ...] = ("numpy", "array_api_strict", "cupy", "array_api_strict_device1")

# Python's scalar types, matched by exact type: they are no backend's arrays (a NumPy scalar is
# one of the NumPy backend's; a bool is not taken for an int)
PYTHON_SCALARS = (bool, int, float)


class BackendUnavailable(RuntimeError):
    """A backend was requested that cannot be used here; the message says why and how to fix."""


_MODULES = {"numpy": "._numpy", "array_api_strict": "._strict", "cupy": "._cupy",
            "array_api_strict_device1": "._strict"}
_OPTIONS = {"array_api_strict_device1": {"device": "device1"}}
# top-level module of an array type -> the backends that may own it (for backend_of's slow path)
_OWNERS_BY_MODULE = {"numpy": ("numpy",), "cupy": ("cupy",),
                     "array_api_strict": ("array_api_strict", "array_api_strict_device1")}

_LOCK = threading.RLock()
_BACKENDS: dict[str, Backend] = {}
_BY_TYPE: dict[type, Backend] = {}
# array types that several backends share, one per device (array_api_strict): {device: backend}
_BY_DEVICE: dict[type, dict[Any, Backend]] = {}


def _module(name: str) -> Any:
    return importlib.import_module(_MODULES[name], __package__)


def _unknown(name: object) -> str:
    return f"unknown backend {name!r}; valid names: {', '.join(BACKEND_NAMES)}"


def is_available(name: str) -> tuple[bool, str]:
    """Whether backend ``name`` can be used here.

    Returns
    -------
    (ok, reason) : tuple[bool, str]
        ``reason`` is ``""`` when ``ok``; otherwise it says why not and how to fix it.
        An unknown name gives ``(False, ...)`` listing the valid names.
    """
    if name not in _MODULES:
        return False, _unknown(name)
    if name in _BACKENDS:
        return True, ""
    return _module(name).check_available()


def available_backends() -> list[str]:
    """Names from :data:`BACKEND_NAMES` that can be used here, in that order."""
    return [name for name in BACKEND_NAMES if is_available(name)[0]]


def get_backend(name: str) -> Backend:
    """The (cached) backend called ``name``.

    Raises
    ------
    BackendUnavailable
        If ``name`` is unknown (the message lists the valid names) or the backend cannot be used
        here (the message says why and what to install).
    """
    try:
        return _BACKENDS[name]
    except (KeyError, TypeError):
        pass
    if name not in _MODULES:
        raise BackendUnavailable(_unknown(name))
    with _LOCK:
        if name not in _BACKENDS:
            module = _module(name)
            ok, why = module.check_available()
            if not ok:
                raise BackendUnavailable(f"backend {name!r} is unavailable: {why}")
            backend = module.make_backend(**_OPTIONS.get(name, {}))
            if backend.device is None:
                _BY_TYPE[backend.array_type] = backend
            else:  # one array type, a backend per device (array_api_strict)
                _BY_DEVICE.setdefault(backend.array_type, {})[backend.device] = backend
            if backend.scalar_type is not None:  # NumPy's scalars, e.g. from full reductions
                _BY_TYPE[backend.scalar_type] = backend
            _BACKENDS[name] = backend
    return _BACKENDS[name]


def backend_of(array: Any) -> Backend:
    """The backend that owns ``array``: the one for its type (a dict lookup on ``type(array)``)
    and, for array_api_strict, its device.

    A library's scalars (NumPy's ``numpy.float64`` ..., see :attr:`Backend.scalar_type`) belong
    to its backend; Python scalars, lists and anything else are not arrays here.

    Raises
    ------
    TypeError
        If ``array`` is not an array of a known backend (or is on a device none of them uses).
    """
    backend = _BY_TYPE.get(type(array))
    if backend is not None:
        return backend
    by_device = _BY_DEVICE.get(type(array))
    if by_device is not None:
        backend = by_device.get(array.device)
        if backend is not None:
            return backend
    return _backend_of_slow(array)


def _backend_of_slow(array: Any) -> Backend:
    cls = type(array)
    for _attempt in range(2):
        for base in cls.__mro__:  # subclasses of a registered type (np.float64 -> np.generic)
            backend = _BY_TYPE.get(base)
            if backend is not None:
                with _LOCK:
                    _BY_TYPE[cls] = backend
                return backend
        by_device = _BY_DEVICE.get(cls)
        if by_device is not None and array.device in by_device:
            return by_device[array.device]
        # not registered yet: load the backends that may own the type's library, if any
        owners = [name for name in _OWNERS_BY_MODULE.get(cls.__module__.partition(".")[0], ())
                  if name not in _BACKENDS and is_available(name)[0]]
        if not owners:
            break
        for name in owners:
            get_backend(name)
    where = f" on device {array.device!r}" if cls in _BY_DEVICE else ""
    raise TypeError(
        f"{cls.__module__}.{cls.__qualname__}{where} is not an array of a known backend "
        f"(known: {', '.join(BACKEND_NAMES)}; Python scalars and lists are not arrays here; "
        f"convert with get_backend(name).asarray(...))"
    )


def python_scalar(x: Any) -> bool | int | float | None:
    """The Python scalar that ``x`` is, or that a library's scalar stands for (NumPy's
    ``numpy.float64(2.0)`` -> ``2.0``, see :meth:`Backend.python_scalar`); else ``None``.

    The engine treats both alike as weakly typed operands that adopt the other operand's dtype.
    """
    if type(x) in PYTHON_SCALARS:
        return x
    try:
        backend = backend_of(x)
    except TypeError:  # lists and other host data
        return None
    return backend.python_scalar(x)
