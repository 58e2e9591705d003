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
``"array_api_strict_device1"``
    ``array_api_strict`` on its second device, a stand-in for a GPU in tests: its arrays refuse
    conversion to NumPy and refuse to meet arrays of another device.

Devices and the host boundary
-----------------------------
A backend creates arrays on its :attr:`Backend.device`; the engine creates every other array on
the device of its inputs (``device=x.device``, ``zeros_like``), so nothing moves between host
and device behind the user's back. Data crosses only here:

* into a device: :meth:`Backend.asarray` (host data, or another backend's array by way of the
  host) and :class:`Rng` (numbers drawn on the host, then ``asarray``);
* out of a device: :meth:`Backend.to_numpy`, the one way to the host. It is used by
  ``Tensor.numpy()``, ``item()``, ``float()`` and ``miniresnet.to_numpy``; by data loading
  (labels and features are checked, split and normalised on the host) and checkpoints (arrays
  are saved from host copies and loaded through ``asarray``); and where a Python value is
  really needed: a loss or accuracy for the log and the divergence check, the global gradient
  norm for clipping, the range of ``cross_entropy``'s targets, anomaly checks. On a GPU each is
  a synchronisation; ``np.asarray``, ``float()`` or ``bool()`` on a device array is not allowed
  in the engine (the ``array_api_strict_device1`` test run refuses them).

Between backends, :func:`miniresnet.to_backend` goes through the host.

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

BACKEND_NAMES: tuple[str, ...] = ("numpy", "array_api_strict", "cupy", "array_api_strict_device1")

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
            backend = module.make_backend(**_OPTIONS.get(name, {}))
            if backend.device is None:
                _BY_TYPE[backend.array_type] = backend
            else:  # one array type, a backend per device (array_api_strict)
                _BY_DEVICE.setdefault(backend.array_type, {})[backend.device] = backend
            if name == "numpy":
                import numpy as np

                _BY_TYPE[np.generic] = backend  # NumPy scalars, e.g. from full reductions
            _BACKENDS[name] = backend
    return _BACKENDS[name]


def backend_of(array: Any) -> Backend:
    """The backend that owns ``array``: the one for its type (a dict lookup on ``type(array)``)
    and, for array_api_strict, its device.

    NumPy scalars (``numpy.float64`` ...) belong to the NumPy backend; Python scalars, lists and
    anything else are not arrays here.

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
