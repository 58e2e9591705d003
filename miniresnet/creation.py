"""Creating tensors on the current backend."""

from __future__ import annotations

from miniresnet.config import current_backend
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
