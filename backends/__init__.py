"""Swappable array backends for miniresnet.

The engine computes with the array API standard namespace ``backend.xp`` only; everything that
depends on a particular library lives here: turning host data into arrays and back, random
numbers, the convolution kernels (conv2d and its two adjoints, im2col / col2im), availability
checks and device synchronisation.

Backends (see :data:`BACKEND_NAMES`):

``"numpy"``
    ``array_api_compat.numpy``; always available; fast conv kernels (see ``_numpy``).
``"array_api_strict"``
    ``array_api_strict``, the reference namespace (``pip install array-api-strict``).
``"cupy"``
    ``array_api_compat.cupy`` on an NVIDIA GPU (``pip install -e ".[cuda]"``).

Backends are created lazily on first use and cached; this package imports nothing from the rest
of miniresnet.

Examples
--------
>>> from miniresnet import backends
>>> be = backends.get_backend("numpy")
>>> x = be.rng(0).normal((2, 3, 5, 5))
>>> be.im2col(x, 3, 3, stride=(1, 1), padding=(1, 1)).shape
(2, 3, 3, 3, 5, 5)
>>> backends.backend_of(x) is be
True
"""

from __future__ import annotations

import importlib
import threading
from typing import Any

from ._generic import Backend, BackendUnavailable, Rng

__all__ = [
    "BACKEND_NAMES",
    "Backend",
    "BackendUnavailable",
    "Rng",
    "available_backends",
    "backend_of",
    "get_backend",
    "is_available",
]

BACKEND_NAMES: tuple[str, ...] = ("numpy", "array_api_strict", "cupy")

_MODULES = {"numpy": "._numpy", "array_api_strict": "._strict", "cupy": "._cupy"}
# top-level module of an array type -> the backend that owns it (for backend_of's slow path)
_OWNER_BY_MODULE = {"numpy": "numpy", "array_api_strict": "array_api_strict", "cupy": "cupy"}

_LOCK = threading.RLock()
_BACKENDS: dict[str, Backend] = {}
_BY_TYPE: dict[type, Backend] = {}


def _module(name: str) -> Any:
    return importlib.import_module(_MODULES[name], __name__)


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
            backend = module.make_backend()
            _BY_TYPE[backend.array_type] = backend
            if name == "numpy":
                import numpy as np

                _BY_TYPE[np.generic] = backend  # NumPy scalars, e.g. from full reductions
            _BACKENDS[name] = backend
    return _BACKENDS[name]


def backend_of(array: Any) -> Backend:
    """The backend whose array type ``array`` has (a dict lookup on ``type(array)``).

    NumPy scalars (``numpy.float64`` ...) belong to the NumPy backend; Python scalars, lists and
    anything else are not arrays here.

    Raises
    ------
    TypeError
        If ``array`` is not an array of a known backend.
    """
    try:
        return _BY_TYPE[type(array)]
    except KeyError:
        return _backend_of_type(type(array))


def _backend_of_type(cls: type) -> Backend:
    for _attempt in range(2):
        for base in cls.__mro__:  # subclasses of a registered type (np.float64 -> np.generic)
            backend = _BY_TYPE.get(base)
            if backend is not None:
                with _LOCK:
                    _BY_TYPE[cls] = backend
                return backend
        # not registered yet: load the backend that owns the type's library, if any
        owner = _OWNER_BY_MODULE.get(cls.__module__.partition(".")[0])
        if owner is None or owner in _BACKENDS or not is_available(owner)[0]:
            break
        get_backend(owner)
    raise TypeError(
        f"{cls.__module__}.{cls.__qualname__} is not an array of a known backend "
        f"(known: {', '.join(BACKEND_NAMES)}; Python scalars and lists are not arrays here; "
        f"convert with get_backend(name).asarray(...))"
    )
