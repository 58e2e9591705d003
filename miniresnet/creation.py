"""Creating tensors on the current backend, and moving their data (to the host, to a backend)."""

from __future__ import annotations

import numpy as np

from miniresnet.backend_choice import as_backend_array, current_backend, known_backend
from miniresnet.backends import backend_of, get_backend
from miniresnet.tracing import Tensor


def tensor(data, dtype=None, requires_grad: bool = False) -> Tensor:
    """A Tensor on the current backend from host data (scalars, lists, NumPy arrays) or a
    backend array (kept on its backend).

    Parameters
    ----------
    data : array_like
    dtype : str or backend dtype, optional
        Defaults to the data's own dtype (Python floats give float64).
    requires_grad : bool
        Record operations on the eager tape so that ``backward()`` fills ``.grad``.
    """
    return Tensor(data, requires_grad=requires_grad, dtype=dtype)


def zeros(shape, dtype: str = "float64", requires_grad: bool = False) -> Tensor:
    """A tensor of zeros on the current backend."""
    be = current_backend()
    raw = be.xp.zeros(tuple(shape), dtype=be.dtype(dtype), device=be.device)
    return Tensor(raw, requires_grad=requires_grad)


def ones(shape, dtype: str = "float64", requires_grad: bool = False) -> Tensor:
    """A tensor of ones on the current backend."""
    be = current_backend()
    raw = be.xp.ones(tuple(shape), dtype=be.dtype(dtype), device=be.device)
    return Tensor(raw, requires_grad=requires_grad)


def to_numpy(x) -> np.ndarray:
    """A host NumPy copy of a backend array or Tensor, whatever its backend."""
    raw = x.raw if isinstance(x, Tensor) else x
    return backend_of(raw).to_numpy(raw) if known_backend(raw) else np.asarray(raw)


def to_backend(x, name: str):
    """Transfer an array or Tensor's data to backend ``name`` (returns a backend array)."""
    raw = x.raw if isinstance(x, Tensor) else x
    return as_backend_array(raw, backend=get_backend(name))
