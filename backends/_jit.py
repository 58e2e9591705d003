"""Numba kernels compiled on first use, for the optional compiled kernels of this package.

Numba is slow to import, so no module imports it on ``import miniresnet``: a module writes its
kernels as plain Python functions decorated with :meth:`LazyKernels.kernel`, which records
Numba's settings, and calls :meth:`LazyKernels.compile` before it runs them. That imports
Numba once and replaces every recorded function in the module's namespace by its compiled
self, so that kernels calling each other (and ``prange``) resolve to compiled code when Numba
compiles them.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["AVAILABLE", "LazyKernels"]

#: whether Numba (the optional "fast" extra) is installed
AVAILABLE = importlib.util.find_spec("numba") is not None


class LazyKernels:
    """The kernels of the module whose namespace is ``namespace`` (its ``globals()``)."""

    def __init__(self, namespace: dict[str, Any]) -> None:
        self._namespace, self._settings = namespace, {}
        self._lock, self._compiled = threading.Lock(), False

    def kernel(self, fastmath: Any = frozenset({"contract"}), parallel: bool = False,
               inline: str = "never") -> Callable:
        """Decorator: record a kernel and its ``numba.njit`` settings (``cache=True``, no
        bounds checks)."""
        def record(fn: Callable) -> Callable:
            self._settings[fn.__name__] = dict(cache=True, boundscheck=False,
                                               fastmath=set(fastmath), parallel=parallel,
                                               inline=inline)
            return fn
        return record

    def compile(self) -> None:
        """Compile every recorded kernel (or load it from Numba's on-disk cache) on the first
        call; the module's ``_prange`` becomes ``numba.prange``.

        Raises
        ------
        ImportError
            If Numba is not installed.
        """
        if self._compiled:
            return
        with self._lock:
            if self._compiled:
                return
            import numba

            # _prange first: a kernel reads it (and calls the others) when it is compiled
            self._namespace["_prange"] = numba.prange
            self._namespace.update({name: numba.njit(**settings)(self._namespace[name])
                                    for name, settings in self._settings.items()})
            self._compiled = True
