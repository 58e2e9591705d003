"""NumPy backend: ``array_api_compat.numpy`` plus fast convolution kernels, and NumPy's quirks.

The kernels keep the patches channel-major, (C kh kw, N OH OW), so that each product is one GEMM
on 2-D arrays; im2col is a view of those patches. col2im is the shared one of
:class:`._generic.Backend`. The test module checks every path here against the array-API-only
kernels. With Numba installed, 3x3 stride-1 convolutions on images of 16 x 16 or more run the
Winograd kernels of :mod:`._winograd` instead (tests/test_winograd.py checks them), and batch
norm's training-mode passes those of :mod:`._fast_bn`.

NumPy's quirks stay here, behind :class:`._generic.Backend` hooks: its 0-d results are scalars
(``numpy.float64``, see :attr:`NumpyBackend.scalar_type`, :meth:`NumpyBackend.as_array` and
:meth:`NumpyBackend.python_scalar`), and its arrays are the host's own data format
(:attr:`NumpyBackend.is_host`).
"""

from __future__ import annotations

import functools
from typing import Any

import array_api_compat.numpy as xp_numpy
import numpy as np

from . import _fast_bn, _fast_conv, _malloc, _winograd
from ._generic import Backend, _check_image, to_host
from ._geometry import conv_geometry, conv_output_size

__all__ = ["NumpyBackend", "check_available", "make_backend"]


# -- conv kernels ------------------------------------------------------------------------------
# conv and its adjoints keep the patches channel-major, (C kh kw, N OH OW), so that each
# product is one GEMM on 2-D arrays: out = W (F, C kh kw) @ cols. The (N, F, OH, OW) results are
# transposed views of (F, N, OH, OW) buffers; fed to the next conv, that layout makes its input
# transpose free. Patches are built with kh * kw strided slice copies (contiguous runs of OW
# elements). Large batches are processed in chunks of about CHUNK patch elements, so that no
# temporary is large enough to be served (and page-faulted) by a fresh mmap on every call.
# With stride 1, the input gradient is itself a convolution (of the cotangent with the flipped,
# transposed filters), which is cheaper than scattering patches back with col2im.

CHUNK = 1 << 19


def _chunks(n: int, per_image: int) -> list[tuple[int, int]]:
    """Batch ranges ``[a, b)`` holding about :data:`CHUNK` patch elements each."""
    if n * per_image <= 4 * CHUNK:
        return [(0, n)]
    step = max(1, CHUNK // per_image)
    return [(a, min(n, a + step)) for a in range(0, n, step)]


def _patches(x: np.ndarray, kh: int, kw: int, stride: tuple[int, int],
             padding: tuple[int, int]) -> np.ndarray:
    """Channel-major patches (C, kh, kw, N, OH, OW) of (N, C, H, W) images (geometry checked
    by the caller)."""
    n, c, h, w = x.shape
    (sh, sw), (ph, pw) = stride, padding
    oh, ow = conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw)
    xt = x.transpose(1, 0, 2, 3)
    if (sh, sw) == (1, 1) and ow <= 8:  # short rows: see _patches_stride1
        return _patches_stride1(xt, kh, kw, oh, ow, ph, pw)
    if ph or pw:
        xpad = np.zeros((c, n, h + 2 * ph, w + 2 * pw), dtype=x.dtype)
        xpad[:, :, ph : ph + h, pw : pw + w] = xt
    else:
        xpad = xt
    cols = np.empty((c, kh, kw, n, oh, ow), dtype=x.dtype)
    h_span, w_span = sh * (oh - 1) + 1, sw * (ow - 1) + 1
    for i in range(kh):
        for j in range(kw):
            cols[:, i, j] = xpad[:, :, i : i + h_span : sh, j : j + w_span : sw]
    return cols


def _column_shifts(xt: np.ndarray, kh: int, kw: int, ph: int, pw: int) -> np.ndarray:
    """The zero-padded channel-major images ``xt`` (C, N, H, W) shifted by each column offset
    j, as one (C, kw, N (H + 2 ph) OW + (kh - 1) OW) buffer: ``[c, j, (n, y, o)] = xpad[c, n, y,
    o + j]`` with every row OW wide, plus a zero tail so that the flat axis can be shifted by up
    to ``(kh - 1) OW`` (row offsets)."""
    c, n, h, w = xt.shape
    hp, ow = h + 2 * ph, w + 2 * pw - kw + 1
    size = n * hp * ow
    buf = np.zeros((c, kw, size + (kh - 1) * ow), dtype=xt.dtype)
    shifted = buf[:, :, :size].reshape(c, kw, n, hp, ow)
    for j in range(kw):
        lo, hi = max(0, pw - j), min(ow, w + pw - j)  # output columns that read the image
        if hi > lo:
            shifted[:, j, :, ph : ph + h, lo:hi] = xt[:, :, :, lo + j - pw : hi + j - pw]
    return buf


def _patches_stride1(xt: np.ndarray, kh: int, kw: int, oh: int, ow: int, ph: int, pw: int
                     ) -> np.ndarray:
    """:func:`_patches` for stride 1, from channel-major images ``xt`` (C, N, H, W): every row
    offset i of the column-shifted images (:func:`_column_shifts`) is a contiguous (OH, OW)
    block per image, so the kh * kw patch copies move long runs instead of rows of OW."""
    c, n, h, _ = xt.shape
    hp = h + 2 * ph
    shifted = _column_shifts(xt, kh, kw, ph, pw)[:, :, : n * hp * ow].reshape(c, kw, n, hp, ow)
    cols = np.empty((c, kh, kw, n, oh, ow), dtype=xt.dtype)
    for i in range(kh):
        cols[:, i] = shifted[:, :, :, i : i + oh]
    return cols


def _conv_patches(x: np.ndarray, w: np.ndarray, stride: tuple[int, int],
                  padding: tuple[int, int], oh: int, ow: int, keep: bool = True
                  ) -> tuple[np.ndarray, list[np.ndarray]]:
    """conv by the patch GEMM: (output, patch chunks); with ``keep=False`` no chunk is kept, so
    that each one's memory is reused (still in cache) by the next."""
    f, c, kh, kw = w.shape
    n = x.shape[0]
    w2 = w.reshape(f, c * kh * kw)
    ranges = _chunks(n, c * kh * kw * oh * ow)
    saved = []
    out = None
    for a, b in ranges:
        cols = _patches(x[a:b], kh, kw, stride, padding).reshape(c * kh * kw, -1)
        if keep:
            saved.append(cols)
        part = w2 @ cols
        del cols
        if len(ranges) == 1:
            out = part
        else:
            if out is None:
                out = np.empty((f, n, oh * ow), dtype=part.dtype)
            out[:, a:b] = part.reshape(f, b - a, oh * ow)
    assert out is not None
    return out.reshape(f, n, oh, ow).transpose(1, 0, 2, 3), saved


def _conv_rows(x: np.ndarray, w: np.ndarray, ph: int, pw: int) -> np.ndarray:
    """Stride-1 conv2d that copies the input kw times instead of kh * kw times.

    Per chunk of images, the column-shifted images (:func:`_column_shifts`) are one (C kw,
    N Hp OW) matrix; shifting its flat axis by ``i * OW`` gives row offset i, so the output is
    the sum over i of kh GEMMs with strided views of one buffer; rows y >= OH of each image are
    computed and dropped. Used wherever no patches need to be kept for a filter gradient (the
    input gradient, and convolutions whose filters are not being differentiated).
    """
    f, c, kh, kw = w.shape
    n, _, h, wd = x.shape
    hp, oh, ow = h + 2 * ph, h + 2 * ph - kh + 1, wd + 2 * pw - kw + 1
    xt = x.transpose(1, 0, 2, 3)
    # one copy of all kh taps, (kh, F, C kw); w may be any strided view (flipped filters)
    taps = np.ascontiguousarray(w.transpose(2, 0, 1, 3)).reshape(kh, f, c * kw)
    ranges = _chunks(n, c * kw * hp * ow)
    out = np.empty((f, n, oh, ow), dtype=np.result_type(x, w)) if len(ranges) > 1 else None
    for a, b in ranges:
        size = (b - a) * hp * ow
        flat = _column_shifts(xt[:, a:b], kh, kw, ph, pw).reshape(c * kw, -1)
        acc = taps[0] @ flat[:, :size]
        for i in range(1, kh):
            acc += taps[i] @ flat[:, i * ow : i * ow + size]
        part = acc.reshape(f, b - a, hp, ow)[:, :, :oh]
        if out is None:
            return part.transpose(1, 0, 2, 3)
        out[:, a:b] = part
    assert out is not None
    return out.transpose(1, 0, 2, 3)


# A convolution is also one product with its dense (C H W, F OH OW) matrix, built from the
# filters and a cached 0/1 placement array. That does H W / (kh kw) times the arithmetic of the
# patch GEMM but copies no patches, and patch copies cost as much as a few dozen multiply-adds
# per element: on small images (and for large stacks of cotangents, which amortise building the
# matrix) it is the cheaper way. :func:`_dense_cheaper` picks with a rough cost model whose two
# constants are this kind of machine's seconds per copied patch element and per flop; where the
# alternative is the stride-1 kernel :func:`_conv_rows` (kw long copies, kh skinny GEMMs), its
# own two constants apply.
TOEPLITZ_MAX = 1 << 22  # largest dense matrix (elements) ever built
COPY_S, FLOP_S = 2.5e-9, 1e-11
ROWS_COPY_S, ROWS_FLOP_S = 1.5e-9, 2.5e-11  # _conv_rows: long copies, skinny GEMMs


# The compiled 3x3 kernels (:mod:`._fast_conv`): a call's fixed cost, and seconds per flop and
# per element of the shifted copies they build (fitted, like the constants above, with 2
# threads on a 2-core machine of this project's kind: the dense product wins only on 2x2 images).
COMPILED_CALL_S, COMPILED_FLOP_S, COMPILED_COPY_S = 5e-5, 1.05e-11, 2.5e-9


def _compiled(x: Any, w: Any, stride: tuple[int, int], padding: tuple[int, int]) -> bool:
    """Whether the compiled kernels of :mod:`._fast_conv` compute this conv (and its adjoints):
    installed, opted into (``_fast_conv.IN_USE``), switched on (the one switch of the compiled
    kernels, in :mod:`._fast_bn`), and a geometry they support."""
    return _fast_conv.IN_USE and _fast_bn.enabled() and _fast_conv.supported(x, w, stride, padding)


def _wino(x: Any, w: Any, stride: tuple[int, int], padding: tuple[int, int]) -> bool:
    """Whether the Winograd kernels of :mod:`._winograd` compute this conv (and its adjoints):
    installed, switched on (the one switch of the compiled kernels, in :mod:`._fast_bn`), and
    a geometry where they measured faster (3x3, stride 1, padding 1, images of 16 x 16 or
    more)."""
    return _fast_bn.enabled() and _winograd.preferred(x, w, stride, padding)


def _same_view(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether ``a`` and ``b`` view the same memory the same way (the same data, as long as
    neither is written to: the reverse pass never writes to a cotangent). ``a`` is held, so
    that no other array can take its place in memory meanwhile."""
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.shape == b.shape and a.strides == b.strides and a.dtype == b.dtype)


def _dense_cheaper(n: int, c: int, h: int, w: int, f: int, kh: int, kw: int, oh: int, ow: int,
                   build: bool = True, rows: tuple[int, int, int, int] | None = None,
                   compiled: bool = False) -> bool:
    """Whether the dense product beats the patch GEMM (or, given ``rows=(input channels,
    output channels, padded height, output width)`` of a :func:`_conv_rows` call, that kernel;
    or, with ``compiled``, the compiled 3x3 kernel of :mod:`._fast_conv`) for conv on (n, c, h,
    w) inputs with (f, c, kh, kw) filters."""
    size = c * h * w * f * oh * ow
    if size > TOEPLITZ_MAX:
        return False
    dense = 2 * n * size * FLOP_S + (size * COPY_S + 2 * size * kh * kw * FLOP_S if build else 0)
    if compiled:
        grid = n * (h + 1) * w
        other = COMPILED_CALL_S + grid * (2 * kh * kw * c * f * COMPILED_FLOP_S
                                          + (c + f) * COMPILED_COPY_S)
    elif rows is None:
        other = n * c * kh * kw * oh * ow * (COPY_S + 2 * f * FLOP_S)
    else:
        cin, cout, hp, width = rows
        other = n * cin * kw * hp * width * (ROWS_COPY_S + 2 * cout * kh * ROWS_FLOP_S)
    return dense < other


@functools.lru_cache(maxsize=64)
def _placement(h: int, w: int, kh: int, kw: int, stride: tuple[int, int],
               padding: tuple[int, int]) -> np.ndarray:
    """0/1 array (kh kw, H W OH OW): 1 where kernel offset (i, j) at output (oh, ow) reads
    input pixel (y, x) (the patches of the H W one-pixel images)."""
    cols = _patches(np.eye(h * w).reshape(h * w, 1, h, w), kh, kw, stride, padding)
    s = np.ascontiguousarray(cols.reshape(kh * kw, h * w, -1)).reshape(kh * kw, -1)
    s.setflags(write=False)
    return s


def _toeplitz(w: np.ndarray, h: int, wd: int, stride: tuple[int, int],
              padding: tuple[int, int], oh: int, ow: int) -> np.ndarray:
    """The (C H W, F OH OW) matrix of conv with filters ``w`` on H x W images."""
    f, c, kh, kw = w.shape
    s = _placement(h, wd, kh, kw, stride, padding).astype(w.dtype, copy=False)
    t = (w.reshape(f * c, kh * kw) @ s).reshape(f, c, h * wd, oh * ow)
    return t.transpose(1, 2, 0, 3).reshape(c * h * wd, f * oh * ow)


def _channel_major(a: np.ndarray) -> np.ndarray:
    """(N, C, H, W) ``a`` copied into channel-major memory, as the patch kernels return it:
    batch norm's per-channel reductions and broadcasts then run over long contiguous runs
    instead of H W-element ones."""
    return np.ascontiguousarray(a.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)


def _zeros_channel_major(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """Zeros of (N, C, H, W) ``shape`` in channel-major memory (see :func:`_channel_major`)."""
    n, c, h, w = shape
    return np.zeros((c, n, h, w), dtype=dtype).transpose(1, 0, 2, 3)


class NumpyBackend(Backend):
    """NumPy arrays through ``array_api_compat.numpy``, with the fast conv kernels above.

    NumPy scalars (``numpy.float64`` ... as returned by full reductions) count as this
    backend's arrays for :func:`miniresnet.backends.backend_of`.
    """

    is_host = True  # NumPy arrays are host data
    scalar_type = np.generic

    def __init__(self) -> None:
        super().__init__("numpy", xp_numpy, np.ndarray)

    def asarray(self, obj: Any, dtype: Any = None, *, copy: bool | None = None) -> np.ndarray:
        if dtype is not None:
            dtype = self.dtype(dtype)
        return np.asarray(to_host(obj), dtype=dtype, copy=copy)

    def _host(self, x: np.ndarray) -> np.ndarray:
        return x

    def as_array(self, x: Any) -> Any:
        return np.asarray(x) if isinstance(x, np.generic) else x  # NumPy's 0-d results

    def python_scalar(self, x: Any) -> bool | int | float | None:
        return x.item() if isinstance(x, np.generic) else None

    def im2col(self, x: Any, kh: int, kw: int, stride: Any = (1, 1), padding: Any = (0, 0)
               ) -> np.ndarray:
        """A view of the channel-major patches (:func:`_patches`) as (N, C, kh, kw, OH, OW)."""
        x = np.asarray(x)
        _, _, h, w = _check_image(x)
        stride, padding, _ = conv_geometry("im2col", (h, w), (kh, kw), stride, padding)
        return _patches(x, kh, kw, stride, padding).transpose(3, 0, 1, 2, 4, 5)

    def conv(self, x: Any, w: Any, stride: Any = (1, 1), padding: Any = (0, 0),
             keep: bool = True) -> tuple[np.ndarray, dict | None]:
        """``saved`` is a dict with the patch chunks or the dense matrix."""
        x, w = np.asarray(x), np.asarray(w)
        n, c, h, wd = _check_image(x)
        f, _, kh, kw = w.shape
        stride, padding, (oh, ow) = conv_geometry("conv", (h, wd), (kh, kw), stride, padding)
        if _wino(x, w, stride, padding):
            out, kept = _winograd.conv(x, w)
            return out, {"winograd": kept} if keep else None
        compiled = _compiled(x, w, stride, padding)
        rows = not keep and stride == (1, 1) and not compiled
        if _dense_cheaper(n, c, h, wd, f, kh, kw, oh, ow, compiled=compiled,
                          rows=(c, f, h + 2 * padding[0], ow) if rows else None):
            t = _toeplitz(w, h, wd, stride, padding, oh, ow)
            x2 = x.reshape(n, c * h * wd)
            out = _channel_major((x2 @ t).reshape(n, f, oh, ow))
            return out, {"toeplitz": t, "x2": x2} if keep else None
        if compiled:
            out, shifted = _fast_conv.conv3x3(x, w)
            return out, {"shifted": shifted} if keep else None
        if rows:
            return _conv_rows(x, w, *padding), None
        out, cols = _conv_patches(x, w, stride, padding, oh, ow, keep)
        return out, {"cols": cols} if keep else None

    def conv_transpose(self, g: Any, w: Any, height: int, width: int, stride: Any = (1, 1),
                       padding: Any = (0, 0), saved: Any = None) -> np.ndarray:
        g, w = np.asarray(g), np.asarray(w)
        n, f, oh, ow = g.shape
        c, kh, kw = w.shape[1:]
        stride, padding, _ = conv_geometry("conv_transpose", (height, width), (kh, kw), stride,
                                           padding, (oh, ow))
        (ph, pw) = padding
        t = saved.get("toeplitz") if saved else None
        if t is None and _wino(g, w.transpose(1, 0, 2, 3), stride, padding):  # g: F channels
            kept = saved.get("winograd") if saved else None
            if kept is None or kept.chunks[-1][1] != n:  # (a stack of cotangents: n > N)
                return _winograd.conv_transpose(g, w)
            # the filter gradient for this g comes almost free with the input gradient (one
            # transform of g serves both): kept, with g, for conv_weight_grad, which the
            # reverse pass calls next with the same g
            dx, dw = _winograd.grads(g, w, kept)
            saved["winograd_dw"] = (g, dw)
            return dx
        compiled = g.dtype == w.dtype and _compiled(g, w, stride, padding)
        rows = stride == (1, 1) and ph < kh and pw < kw and not compiled
        if t is not None or _dense_cheaper(n, c, height, width, f, kh, kw, oh, ow,
                                           compiled=compiled,
                                           rows=(f, c, height + kh - 1, width) if rows else None):
            if t is None:
                t = _toeplitz(w, height, width, stride, padding, oh, ow)
            return _channel_major((g.reshape(n, f * oh * ow) @ t.T).reshape(n, c, height, width))
        if compiled:  # stride 1, padding 1: the same kernel with flipped, transposed filters
            return _fast_conv.conv3x3_transpose(g, w)
        if rows:  # the input gradient is a conv of g with the flipped, transposed filters
            flipped = w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)  # a view: _conv_rows copies it
            return _conv_rows(g, flipped, kh - 1 - ph, kw - 1 - pw)
        gt = g.transpose(1, 0, 2, 3).reshape(f, n * oh * ow)
        cols = (w.reshape(f, c * kh * kw).T @ gt).reshape(c, kh, kw, n, oh, ow)
        return self.col2im(cols.transpose(3, 0, 1, 2, 4, 5), height, width, stride, padding,
                           out=_zeros_channel_major((n, c, height, width), cols.dtype))

    def conv_weight_grad(self, x: Any, g: Any, kh: int, kw: int, stride: Any = (1, 1),
                         padding: Any = (0, 0), saved: Any = None) -> np.ndarray:
        """One GEMM per chunk, over every batch axis of ``g`` at once."""
        x, g = np.asarray(x), np.asarray(g)
        n, c, h, wd = _check_image(x)
        lead, f, oh, ow = g.shape[:-4], g.shape[-3], g.shape[-2], g.shape[-1]
        stride, padding, _ = conv_geometry("conv_weight_grad", (h, wd), (kh, kw), stride,
                                           padding, (oh, ow))
        filters = np.empty((0, c, kh, kw), x.dtype)  # the filters' shape and dtype, no data
        compiled = g.dtype == x.dtype and _compiled(x, filters, stride, padding)
        if saved and "winograd" in saved:
            done = saved.pop("winograd_dw", None)
            if done is not None and _same_view(done[0], g):
                return done[1]
            return _winograd.weight_grad(x, g, saved["winograd"])
        if not saved and g.dtype == x.dtype and _wino(x, filters, stride, padding):
            return _winograd.weight_grad(x, g, None)
        if saved:
            dense = "x2" in saved
        else:
            dense = _dense_cheaper(n, c, h, wd, f, kh, kw, oh, ow, False, compiled=compiled)
        if not dense and compiled and (not saved or "shifted" in saved):
            return _fast_conv.conv3x3_weight_grad(x, g, saved["shifted"] if saved else None)
        if dense:
            x2 = saved["x2"] if saved else x.reshape(n, c * h * wd)
            dt = np.matmul(x2.T, g.reshape(*lead, n, f * oh * ow))  # (*B, C H W, F OH OW)
            dt = np.moveaxis(dt.reshape(*lead, c, h * wd, f, oh * ow), -2, -4)  # (*B, F, C, HW, L)
            s = _placement(h, wd, kh, kw, stride, padding).astype(g.dtype, copy=False)
            return (dt.reshape(-1, h * wd * oh * ow) @ s.T).reshape(*lead, f, c, kh, kw)
        ranges = _chunks(n, c * kh * kw * oh * ow)
        cols_list = saved.get("cols") if saved else None
        if cols_list is None or len(cols_list) != len(ranges):
            cols_list = [_patches(x[a:b], kh, kw, stride, padding).reshape(c * kh * kw, -1)
                         for a, b in ranges]
        gt = np.moveaxis(g, -3, -4)  # (*B, F, N, OH, OW)
        dw = None
        for (a, b), cols in zip(ranges, cols_list, strict=True):
            part = gt[..., a:b, :, :].reshape(-1, (b - a) * oh * ow) @ cols.T
            dw = part if dw is None else dw + part
        assert dw is not None
        return dw.reshape(*lead, f, c, kh, kw)

    # -- batch norm: the compiled kernels of :mod:`._fast_bn` for its hot case, when enabled
    # there; the generic hooks for everything else

    def batch_stats(self, x: Any, axis: tuple[int, ...], eps: float) -> dict[str, Any]:
        stats = _fast_bn.batch_stats(x, axis, eps)
        return stats if stats is not None else super().batch_stats(x, axis, eps)

    def standardize_affine(self, x: Any, w: Any, b: Any, axis: tuple[int, ...], eps: float,
                           stats: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        done = _fast_bn.standardize_affine(x, w, b, axis, eps, stats)
        return done if done is not None else super().standardize_affine(x, w, b, axis, eps,
                                                                         stats)

    def standardize_affine_grad(self, g: Any, w: Any, stats: dict[str, Any],
                                axis: tuple[int, ...]) -> Any:
        out = _fast_bn.standardize_affine_grad(g, w, stats, axis)
        return out if out is not None else super().standardize_affine_grad(g, w, stats, axis)


def check_available() -> tuple[bool, str]:
    """NumPy is a hard dependency, so always ``(True, "")``."""
    return True, ""


def make_backend() -> NumpyBackend:
    """Create the NumPy backend (called once, by the registry); tunes glibc's allocator (see
    :mod:`._malloc`, opt out with ``MINIRESNET_TUNE_MALLOC=0``)."""
    _malloc.tune()
    return NumpyBackend()
