"""Which backend new arrays are created on (``use_backend``, ``MINIRESNET_BACKEND``) and how host
data becomes an array of it; below the tracing core, so it knows nothing of Tensors."""

from __future__ import annotations

import os

import numpy as np

from miniresnet.backends import BACKEND_NAMES, Backend, backend_of, get_backend, is_available

_current: list[Backend | None] = [None]


def _backend_from_environment() -> str:
    """``MINIRESNET_BACKEND`` (default ``"numpy"``), checked when miniresnet is imported so that
    a typo fails at once rather than at the first array."""
    name = os.environ.get("MINIRESNET_BACKEND", "numpy")
    ok, why = is_available(name)
    if not ok:
        if name in BACKEND_NAMES:
            why += f"; the other valid names are {', '.join(n for n in BACKEND_NAMES if n != name)}"
        raise ImportError(f"miniresnet: the environment variable MINIRESNET_BACKEND={name!r} "
                          f"names no usable backend: {why}")
    return name


_ENVIRONMENT_BACKEND = _backend_from_environment()


def current_backend() -> Backend:
    """The backend new tensors are created on (``MINIRESNET_BACKEND``, default ``"numpy"``)."""
    if _current[0] is None:
        _current[0] = get_backend(_ENVIRONMENT_BACKEND)
    return _current[0]


class use_backend:
    """Select the backend for new tensors, globally or for a ``with`` block.

    Parameters
    ----------
    name : {"numpy", "array_api_strict", "cupy"}

    Examples
    --------
    >>> import miniresnet as mr
    >>> with mr.use_backend("numpy") as be:
    ...     x = mr.tensor([1.0, 2.0])
    >>> be.name
    'numpy'

    Calling ``mr.use_backend("numpy")`` without ``with`` switches globally. Asking for a backend
    that cannot run here raises :class:`~miniresnet.backends.BackendUnavailable` saying why.
    """

    def __init__(self, name: str):
        backend = get_backend(name)
        self._previous = _current[0]
        _current[0] = self.backend = backend

    def __enter__(self) -> Backend:
        return self.backend

    def __exit__(self, *exc) -> None:
        _current[0] = self._previous


def known_backend(x) -> Backend | None:
    try:
        return backend_of(x)
    except TypeError:
        return None


def as_backend_array(data, dtype=None, backend: Backend | None = None):
    """Convert host data (scalars, lists, NumPy arrays) to an array of ``backend`` (default: the
    current one). An array that already belongs to a backend is kept where it is, unless
    ``backend`` is given, in which case it is transferred."""
    source = known_backend(data)
    if source is not None:
        data = source.as_array(data)  # a NumPy scalar becomes a 0-d array
    if source is not None and (backend is None or source is backend):
        if dtype is not None and data.dtype != source.dtype(dtype):
            data = source.xp.astype(data, source.dtype(dtype))
        return data
    host = source.to_numpy(data) if source is not None else np.asarray(data)
    return (backend or current_backend()).asarray(host, dtype)  # Python floats: float64


def creation_backend(data) -> Backend:
    """Where a new tensor made from ``data`` lives: an array of a non-NumPy backend stays on its
    backend; host data (Python objects and NumPy arrays) goes to the current backend."""
    source = known_backend(data)
    return source if source is not None and not source.is_host else current_backend()
