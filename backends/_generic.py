"""Backend base class, host-side RNG and the array-API-only conv kernels.

Everything here uses only the array API standard through the backend's namespace ``xp``, so it
runs unchanged on NumPy, array-api-strict and CuPy. A backend module subclasses :class:`Backend`
and overrides the methods its library does faster (the one way to extend a backend).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

from ._geometry import conv_geometry, keepdims_shape
from ._registry import backend_of

__all__ = ["Backend", "Rng", "to_host"]

ShapeLike = int | Sequence[int]


def _check_image(x: Any) -> tuple[int, ...]:
    shape = tuple(x.shape)
    if len(shape) != 4:
        raise ValueError(f"x must have shape (N, C, H, W), got {shape}")
    return shape


def _check_cols(cols: Any) -> tuple[int, ...]:
    shape = tuple(cols.shape)
    if len(shape) != 6:
        raise ValueError(f"cols must have shape (N, C, kh, kw, OH, OW), got {shape}")
    return shape


def _inside(size: int, pad: int, offset: int, stride: int, n_out: int) -> tuple[int, int, int]:
    """Outputs ``o`` in ``[lo, hi)`` whose input index ``o*stride + offset - pad`` is in the image.

    Returns ``(lo, hi, first)`` with ``first`` the input index of output ``lo``; ``hi <= lo``
    means that this kernel offset only ever sees padding.
    """
    lo = max(0, -((offset - pad) // stride))  # ceil((pad - offset) / stride), clipped at 0
    hi = min(n_out, (size - 1 + pad - offset) // stride + 1)
    return lo, hi, lo * stride + offset - pad


# ----------------------------------------------------------------------------------------------
# host transfer helper
# ----------------------------------------------------------------------------------------------


def to_host(obj: Any) -> Any:
    """Host data for ``obj``: an array of a backend comes through that backend's
    :meth:`Backend.to_numpy` (the one way data leaves a device; no copy where none is needed),
    an array of a library without a backend here through DLPack; anything else passes."""
    if isinstance(obj, np.ndarray | np.generic) or not hasattr(obj, "__array_namespace__"):
        return obj
    try:
        backend = backend_of(obj)
    except TypeError:
        return np.from_dlpack(obj)
    return backend.to_numpy(obj, copy=False)


# ----------------------------------------------------------------------------------------------
# random numbers
# ----------------------------------------------------------------------------------------------


def _shape(shape: ShapeLike) -> tuple[int, ...]:
    if isinstance(shape, int | np.integer):
        return (int(shape),)
    return tuple(int(s) for s in shape)


class Rng:
    """Reproducible random numbers delivered as arrays of one backend.

    All numbers are drawn on the host by ``numpy.random.Generator(numpy.random.PCG64(seed))``
    and then transferred with :meth:`Backend.asarray`. Hence the same seed and the same sequence
    of calls give bit-identical numbers on every backend. Floating draws are made in float64 and
    rounded to the requested dtype, so a float32 draw equals the float64 draw rounded.

    Parameters
    ----------
    backend : Backend
        Backend whose arrays the methods return.
    seed : int or None
        Seed for PCG64; ``None`` takes fresh entropy from the OS.
    """

    def __init__(
        self,
        backend: Backend,
        seed: int | None = None,
        *,
        generator: np.random.Generator | None = None,
    ) -> None:
        self.backend = backend
        self.seed = seed
        self.generator = (
            generator if generator is not None else np.random.Generator(np.random.PCG64(seed))
        )

    def __repr__(self) -> str:
        return f"Rng(backend={self.backend.name!r}, seed={self.seed!r})"

    def _float(self, host: Any, dtype: Any) -> Any:
        name = self.backend.dtype_name(dtype)
        if name not in ("float32", "float64"):
            raise ValueError(f"expected a floating dtype (float32 or float64), got {dtype!r}")
        return self.backend.asarray(np.asarray(host, dtype=np.dtype(name)))

    def normal(
        self, shape: ShapeLike, dtype: Any = "float64", mean: float = 0.0, std: float = 1.0
    ) -> Any:
        """Samples from N(mean, std**2) of the given shape and floating dtype."""
        return self._float(self.generator.normal(mean, std, size=_shape(shape)), dtype)

    def uniform(
        self, shape: ShapeLike, dtype: Any = "float64", low: float = 0.0, high: float = 1.0
    ) -> Any:
        """Samples from U[low, high) of the given shape and floating dtype."""
        return self._float(self.generator.uniform(low, high, size=_shape(shape)), dtype)

    def integers(self, low: int, high: int, shape: ShapeLike) -> Any:
        """Uniform int64 integers in ``[low, high)``."""
        host = self.generator.integers(low, high, size=_shape(shape), dtype=np.int64)
        return self.backend.asarray(np.asarray(host, dtype=np.int64))

    def permutation(self, n: int) -> Any:
        """A random permutation of ``0 .. n-1`` as an int64 array."""
        return self.backend.asarray(self.generator.permutation(int(n)).astype(np.int64))

    def orthogonal(self, shape: ShapeLike, dtype: Any = "float64", gain: float = 1.0) -> Any:
        """A random (semi-)orthogonal matrix, flattened over trailing axes (Saxe et al.):
        rows (``shape[0]``) orthonormal if fewer than columns, else columns orthonormal."""
        shape = _shape(shape)
        rows, cols = shape[0], math.prod(shape[1:])
        a = self.generator.normal(size=(max(rows, cols), min(rows, cols)))
        q, r = np.linalg.qr(a)
        q = q * np.sign(np.diag(r))  # a uniform (Haar) draw, not QR's sign convention
        q = q if rows >= cols else q.T
        return self._float(gain * q.reshape(shape), dtype)

    def spawn(self, n: int) -> list[Rng]:
        """``n`` statistically independent child generators (``numpy`` ``Generator.spawn``)."""
        return [Rng(self.backend, None, generator=g) for g in self.generator.spawn(n)]


# ----------------------------------------------------------------------------------------------
# backend base class
# ----------------------------------------------------------------------------------------------


class Backend:
    """One array backend: its array-API namespace plus the few backend-specific operations.

    Instances are created lazily and cached by :func:`miniresnet.backends.get_backend`; do not
    construct them directly. This base class implements everything with the array API standard
    only; subclasses override what their library does faster.

    Attributes
    ----------
    name : str
        One of :data:`~miniresnet.backends.BACKEND_NAMES`.
    xp : module
        The array API namespace (``array_api_compat.numpy``, ``array_api_strict``,
        ``array_api_compat.cupy``).
    array_type : type
        The type of this backend's arrays.
    device : object or None
        The device this backend creates arrays on (``device=`` of the namespace's creation
        functions); ``None``: the library's default (CuPy: the current CUDA device).
    is_host : bool
        Whether this backend's arrays are the host's own data format (NumPy): a new tensor made
        from one goes to the current backend, as host data (a list) would.
    scalar_type : type or None
        The type of the library's scalars, which it returns for 0-d results (NumPy:
        ``numpy.generic``); :func:`~miniresnet.backends.backend_of` counts them as this
        backend's, :meth:`as_array` turns them into arrays and :meth:`python_scalar` into
        Python scalars. ``None``: the library has none (the array API has none).
    """

    name: str
    xp: ModuleType
    array_type: type
    device: Any
    is_host: bool = False
    scalar_type: type | None = None

    def __init__(self, name: str, xp: ModuleType, array_type: type, *, device: Any = None
                 ) -> None:
        self.name = name
        self.xp = xp
        self.array_type = array_type
        self.device = device
        self._dtypes: dict[str, Any] = dict(xp.__array_namespace_info__().dtypes())
        self._dtype_cache: dict[Any, Any] = {}

    def __repr__(self) -> str:
        return f"<Backend {self.name!r}>"

    # -- dtypes ---------------------------------------------------------------------------------

    def dtype(self, name: Any) -> Any:
        """The namespace's dtype for ``name``.

        ``name`` may be a string (``"float64"``, ``"float32"``, ``"int64"``, ``"bool"``, ... any
        dtype the namespace has), a dtype of this namespace, or anything ``numpy.dtype`` accepts
        (a NumPy dtype, ``float``, ...).

        Raises
        ------
        ValueError
            If the dtype is unknown to this backend.
        """
        # keyed by (type, value): never compares dtypes of different libraries for equality
        key = (type(name), name)
        try:
            return self._dtype_cache[key]
        except (KeyError, TypeError):  # TypeError: unhashable
            pass
        found = self._lookup_dtype(name)
        try:
            self._dtype_cache[key] = found
        except TypeError:
            pass
        return found

    def _lookup_dtype(self, name: Any) -> Any:
        if isinstance(name, str):
            key = name
        else:
            for value in self._dtypes.values():
                if type(value) is type(name) and value == name:
                    return value
            try:
                key = np.dtype(name).name
            except TypeError:
                key = None
        if key not in self._dtypes:
            raise ValueError(
                f"unknown dtype {name!r} for backend {self.name!r}; "
                f"valid names: {', '.join(self._dtypes)}"
            )
        return self._dtypes[key]

    def dtype_name(self, dtype: Any) -> str:
        """The standard name (``"float64"``, ...) of a dtype in any form :meth:`dtype` takes."""
        found = self.dtype(dtype)
        for key, value in self._dtypes.items():
            if value == found:
                return key
        raise AssertionError(f"dtype {found!r} has no name")  # pragma: no cover

    # -- host transfer --------------------------------------------------------------------------

    def asarray(self, obj: Any, dtype: Any = None, *, copy: bool | None = None) -> Any:
        """Make an array on this backend's device from host data (Python scalars / lists, NumPy
        arrays): the one way data enters a device.

        Python floats become float64, Python ints int64 and bools bool, unless ``dtype`` (a
        string such as ``"float32"`` or a dtype) says otherwise. Arrays of another backend are
        first brought to the host (through their backend's :meth:`to_numpy`); this backend's
        arrays on another device are moved to this one. ``copy`` follows the array API: ``None``
        copies only when needed, so on the host backends the result may share memory with a
        NumPy input.
        """
        if not isinstance(obj, self.array_type):
            obj = to_host(obj)
        if dtype is not None:
            dtype = self.dtype(dtype)
        return self.xp.asarray(obj, dtype=dtype, copy=copy, device=self.device)

    def to_numpy(self, x: Any, *, copy: bool = True) -> np.ndarray:
        """A NumPy array with the values of ``x``: the one way data leaves a device (a copy unless
        ``copy=False`` allows sharing)."""
        host = self._host(x) if isinstance(x, self.array_type) else to_host(x)
        return np.array(host, copy=True) if copy else np.asarray(host)

    def _host(self, x: Any) -> Any:
        """NumPy data of one of this backend's arrays (no copy where the memory is the host's)."""
        return np.from_dlpack(x)

    def as_array(self, x: Any) -> Any:
        """``x``, a result of this backend's namespace, as one of its arrays: a library scalar
        (see :attr:`scalar_type`) becomes a 0-d array; anything else is returned as it is."""
        return x

    def python_scalar(self, x: Any) -> bool | int | float | None:
        """The Python scalar that ``x`` stands for if it is a library scalar (see
        :attr:`scalar_type`), else ``None``."""
        return None

    # -- random numbers -------------------------------------------------------------------------

    def rng(self, seed: int | None = None) -> Rng:
        """A :class:`Rng` seeded with ``seed``, producing arrays of this backend."""
        return Rng(self, seed)

    # -- convolution kernels ------------------------------------------------------------------
    # Named like the ops they serve (miniresnet.ops.conv, conv_transpose, conv_weight_grad,
    # im2col, col2im), on fixed ranks: images (N, C, H, W), filters (F, C, kh, kw). Each checks
    # its geometry (:func:`~miniresnet.backends.conv_geometry`, named after the op). These use
    # the array API only; a backend with faster kernels overrides them. ``saved`` is whatever
    # :meth:`conv` returns beside its output (here the (N, C, kh, kw, OH, OW) patches): only the
    # same backend's adjoints read it, to skip recomputing what the forward computed.

    def im2col(self, x: Any, kh: int, kw: int, stride: Any = (1, 1), padding: Any = (0, 0)
               ) -> Any:
        """Unfold (N, C, H, W) images into a new (N, C, kh, kw, OH, OW) array of patches.

        ``cols[n, c, i, j, oh, ow] = xpad[n, c, oh*sh + i, ow*sw + j]`` with ``xpad`` the input
        zero-padded by ``padding = (ph, pw)`` on both sides; ``OH = (H + 2 ph - kh) // sh + 1``
        and likewise ``OW``. The result has the dtype of ``x``.
        """
        n, c, h, w = _check_image(x)
        (sh, sw), (ph, pw), (oh, ow) = conv_geometry("im2col", (h, w), (kh, kw), stride, padding)
        if ph or pw:
            xpad = self.xp.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=x.dtype,
                                 device=array_api_compat.device(x))
            xpad[:, :, ph : ph + h, pw : pw + w] = x
        else:
            xpad = x
        h_span, w_span = sh * (oh - 1) + 1, sw * (ow - 1) + 1
        patches = [xpad[:, :, i : i + h_span : sh, j : j + w_span : sw]
                   for i in range(kh) for j in range(kw)]
        return self.xp.reshape(self.xp.stack(patches, axis=2), (n, c, kh, kw, oh, ow))

    def col2im(self, cols: Any, height: int, width: int, stride: Any = (1, 1),
               padding: Any = (0, 0), *, out: Any = None) -> Any:
        """The adjoint of :meth:`im2col`: sum (N, C, kh, kw, OH, OW) patches into (N, C, height,
        width) images; ``<col2im(y), x> == <y, im2col(x)>`` up to rounding.

        Each kernel offset (i, j) is added with one in-place ``+=`` into the strided slice of
        image pixels it reads (within one offset no pixel repeats, so the sum is exact), clipped
        to the pixels inside the image. ``out``, if given, is the zero (N, C, height, width)
        array to add into (a backend may want a memory layout); by default a new one.
        """
        shape = _check_cols(cols)
        n, c, kh, kw = shape[:4]
        (sh, sw), (ph, pw), (oh, ow) = conv_geometry("col2im", (height, width), (kh, kw),
                                                     stride, padding, shape[4:])
        if out is None:
            out = self.xp.zeros((n, c, height, width), dtype=cols.dtype,
                                device=array_api_compat.device(cols))
        for i in range(kh):
            r_lo, r_hi, r0 = _inside(height, ph, i, sh, oh)
            if r_hi <= r_lo:
                continue
            rows = slice(r0, r0 + (r_hi - r_lo - 1) * sh + 1, sh)
            for j in range(kw):
                c_lo, c_hi, c0 = _inside(width, pw, j, sw, ow)
                if c_hi <= c_lo:
                    continue
                columns = slice(c0, c0 + (c_hi - c_lo - 1) * sw + 1, sw)
                out[:, :, rows, columns] += cols[:, :, i, j, r_lo:r_hi, c_lo:c_hi]
        return out

    def conv(self, x: Any, w: Any, stride: Any = (1, 1), padding: Any = (0, 0),
             keep: bool = True) -> tuple[Any, Any]:
        """Cross-correlate (N, C, H, W) images with (F, C, kh, kw) filters.

        Returns ``(out, saved)``: the (N, F, OH, OW) result and what :meth:`conv_transpose` and
        :meth:`conv_weight_grad` may reuse (``None`` with ``keep=False``, when no filter
        gradient will be asked for, which lets a backend use a kernel that makes no patches).
        """
        _, _, h, wd = _check_image(x)
        stride, padding, _ = conv_geometry("conv", (h, wd), w.shape[2:], stride, padding)
        cols = self.im2col(x, w.shape[2], w.shape[3], stride, padding)
        out = self.xp.tensordot(cols, w, axes=([1, 2, 3], [1, 2, 3]))  # N, OH, OW, F
        return self.xp.permute_dims(out, (0, 3, 1, 2)), cols if keep else None

    def conv_transpose(self, g: Any, w: Any, height: int, width: int, stride: Any = (1, 1),
                       padding: Any = (0, 0), saved: Any = None) -> Any:
        """The adjoint of :meth:`conv` in its input: (N, F, OH, OW) -> (N, C, height, width).

        ``saved`` (from :meth:`conv` with the same ``w``) may let a backend skip work.
        """
        stride, padding, _ = conv_geometry("conv_transpose", (height, width), w.shape[2:],
                                           stride, padding, g.shape[-2:])
        cols = self.xp.tensordot(g, w, axes=([1], [0]))  # N, OH, OW, C, kh, kw
        cols = self.xp.permute_dims(cols, (0, 3, 4, 5, 1, 2))
        return self.col2im(cols, height, width, stride, padding)

    def conv_weight_grad(self, x: Any, g: Any, kh: int, kw: int, stride: Any = (1, 1),
                         padding: Any = (0, 0), saved: Any = None) -> Any:
        """The adjoint of :meth:`conv` in its filters.

        ``x`` is (N, C, H, W) and ``g`` is (*B, N, F, OH, OW) (``B``: any leading batch axes,
        a stack of cotangents); returns (*B, F, C, kh, kw). ``saved`` (from :meth:`conv` on
        the same ``x``) skips recomputing the patches.
        """
        _, _, h, wd = _check_image(x)
        stride, padding, _ = conv_geometry("conv_weight_grad", (h, wd), (kh, kw), stride,
                                           padding, g.shape[-2:])
        cols = saved if saved is not None else self.im2col(x, kh, kw, stride, padding)
        nd = len(g.shape)
        return self.xp.tensordot(g, cols, axes=([nd - 4, nd - 2, nd - 1], [0, 4, 5]))

    # -- batch-norm kernels ---------------------------------------------------------------------
    # The forwards of miniresnet's batch-norm primitives (standardize, inv_std,
    # standardize_affine, standardize_affine_grad). ``axis`` holds the negative axes reduced
    # over (one statistic per remaining index, a "channel"); results keep those dimensions.
    # ``stats`` is the dict :meth:`batch_stats` returns. A backend with a faster kernel
    # overrides these for the cases it handles and defers to them for the rest.

    def batch_stats(self, x: Any, axis: tuple[int, ...], eps: float) -> dict[str, Any]:
        """Batch statistics of ``x`` over ``axis``: ``"mean"``, ``"var"`` (biased),
        ``"inv"`` ``= 1 / sqrt(var + eps)`` (each with kept dimensions) and ``"xhat"`` ``=
        (x - mean) inv``. The variance is the mean of the centred squares (two passes), never
        ``mean(x^2) - mean^2``, which cancels."""
        xp = self.xp
        mean = xp.mean(x, axis=axis, keepdims=True)
        centred = x - mean
        var = xp.mean(centred * centred, axis=axis, keepdims=True)
        inv = 1.0 / xp.sqrt(var + eps)
        centred *= inv
        return {"mean": mean, "var": var, "inv": inv, "xhat": centred}

    def standardize_affine(self, x: Any, w: Any, b: Any, axis: tuple[int, ...], eps: float,
                           stats: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        """``(xhat w + b, stats)``: batch norm in training mode, with per-channel ``w`` and
        ``b`` (``x``'s shape without the ``axis`` axes); ``stats`` (of this ``x``), if given,
        are used instead of computing them."""
        if stats is None:
            stats = self.batch_stats(x, axis, eps)
        keep = keepdims_shape(tuple(x.shape), axis)
        out = stats["xhat"] * self.xp.reshape(w, keep)
        out += self.xp.reshape(b, keep)
        return out, stats

    def standardize_affine_grad(self, g: Any, w: Any, stats: dict[str, Any],
                                axis: tuple[int, ...]) -> Any:
        """``w inv (g - mean(g) - xhat mean(g xhat))`` with ``inv`` and ``xhat`` from
        ``stats`` (of an ``x`` with ``g``'s trailing shape; ``g`` may have leading stack
        axes): the derivative of :meth:`standardize_affine` in ``x`` applied to ``g``."""
        xp = self.xp
        xhat = stats["xhat"]
        k = xp.reshape(w, keepdims_shape(tuple(xhat.shape), axis)) * stats["inv"]
        m1 = xp.mean(g, axis=axis, keepdims=True)
        m2 = xp.mean(g * xhat, axis=axis, keepdims=True)
        out = g * k
        out -= xhat * (k * m2)
        out -= k * m1
        return out

    def synchronize(self) -> None:
        """Wait for queued device work (only CuPy has any); use around timings."""
