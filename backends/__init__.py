"""Swappable array backends for miniresnet.

The engine computes with the array API standard namespace ``backend.xp`` only; everything that
depends on a particular library lives here: turning host data into arrays and back, random
numbers, the convolution kernels (``conv`` and its two adjoints ``conv_transpose`` and
``conv_weight_grad``, ``im2col`` / ``col2im``, named like the ops they serve) and the one check of
a convolution's geometry (:func:`conv_geometry`), availability checks, device synchronisation,
and the quirks of particular libraries (NumPy's scalars, see :attr:`Backend.scalar_type`).

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

Compiled kernels: with Numba installed (``pip install -e ".[fast]"``), the NumPy backend runs
batch norm's training-mode passes (``_fast_bn``) and 3x3 stride-1 convolutions with their
adjoints (``_fast_conv``) as compiled kernels, checked against the NumPy ones by the tests.
``MINIRESNET_FAST=0`` in the environment, or :func:`compiled_kernels` for a block of code,
switches them off; :func:`limit_compiled_threads` caps their threads (as threadpoolctl caps
BLAS's).

Backends are created lazily on first use and cached (``_registry``); this package imports nothing
from the rest of miniresnet. A new backend is a module with ``check_available()`` and
``make_backend()`` returning a :class:`Backend` subclass that overrides what its library does
faster, registered by name in ``_registry``.

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

from ._fast_bn import forced as compiled_kernels
from ._fast_conv import limit_threads as limit_compiled_threads
from ._generic import Backend, Rng
from ._geometry import conv_geometry, conv_output_size, int_pair, keepdims_shape
from ._registry import (
    BACKEND_NAMES,
    PYTHON_SCALARS,
    BackendUnavailable,
    available_backends,
    backend_of,
    get_backend,
    is_available,
    python_scalar,
)

__all__ = [
    "BACKEND_NAMES",
    "PYTHON_SCALARS",
    "Backend",
    "BackendUnavailable",
    "Rng",
    "available_backends",
    "backend_of",
    "compiled_kernels",
    "conv_geometry",
    "conv_output_size",
    "get_backend",
    "int_pair",
    "is_available",
    "keepdims_shape",
    "limit_compiled_threads",
    "python_scalar",
]
