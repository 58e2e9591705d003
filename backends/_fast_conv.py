"""Compiled (Numba) kernels for the hot convolution: 3x3 filters, stride 1, padding 1.

Optional: without Numba installed, :data:`AVAILABLE` is False and :func:`supported` says no to
everything. The kernels compute in the input dtype (float32 or float64) and agree with the
NumPy kernels to rounding; they are checked against a float64 oracle by tests/test_fast_conv.py.

The grid. The N images of one channel are laid end to end, each followed by one zero row, so that
every image has zero rows above and below it; grid point ``q = n (H + 1) W + y W + x``. The
input is kept as three copies of its grid, the "shifted images" ``xs[j]`` (j = 0, 1, 2): copy j is
offset so that tap (i, j) of grid point q is ``xs[j, c, q + i W]``, and has zeroed the one column
that the shift would otherwise carry into the neighbouring row (column W - 1 for j = 0, column 0
for j = 2). Every tap of a block of grid points is then one contiguous run, with no masks, and
a filter's output is nine vector multiply-adds per vector of grid points. Outputs on the zero
rows (y = H) are computed and dropped: a waste of 1 / H.

Forward (:func:`conv3x3`): each job (whole grid rows, about :data:`BLOCK` points, and four
filters) accumulates, channel by channel, into a tile whose four rows sit at fixed offsets, so
that the compiler keeps the 36 filter taps in registers and needs no aliasing checks; the order
of the sums over channels and taps is fixed. The input gradient (:func:`conv3x3_transpose`) is
the same kernel on the cotangent with flipped, transposed filters. The filter gradient
(:func:`conv3x3_weight_grad`) is a sum over grid points: per chunk of :data:`CHUNK` points and
pair of filters, 18 sums in registers; these are the one place where the compiler may reorder
additions (``reassoc``, to vectorise the sums), so their rounding depends on the vector width.
Chunks are summed in a fixed order, so no result depends on the number of threads.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ._jit import AVAILABLE, LazyKernels

__all__ = ["AVAILABLE", "conv3x3", "conv3x3_transpose", "conv3x3_weight_grad", "limit_threads",
           "shifted_images", "supported"]

#: whether the NumPy backend uses these kernels (when the compiled kernels are switched on):
#: only with ``MINIRESNET_FAST_CONV=1``. In a training step on two cores their threads and
#: BLAS's compete (ResNet-20 steps ran up to 2x slower, waiting for a CPU); on one thread they
#: only matched the NumPy kernels; they paid alone in the stacked-cotangent Jacobian.
IN_USE = os.environ.get("MINIRESNET_FAST_CONV", "0") == "1"
#: grid points (about) per forward job: its tile of 4 rows stays in the L1 cache
BLOCK = 1024
#: grid points per filter-gradient chunk (of sums kept apart, then added in order)
CHUNK = 2048
_V = 64  # grid points per vector block of the forward kernel (a multiple of every SIMD width)
_TILE = 4096  # stride of the forward kernel's per-filter sums: more than BLOCK + _V
_FB = 4  # filters per forward job
_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


_KERNELS = LazyKernels(globals())  # the kernels below, compiled on first use
_jit = _KERNELS.kernel
_prange = range  # numba.prange once compiled


def limit_threads(threads: int) -> int | None:
    """Let the kernels here run on at most ``threads`` threads (Numba's count, for the calling
    thread; Numba's default is every CPU, like BLAS's), so that a caller that limits BLAS can
    keep worker processes x threads within the cores. Returns the previous count (None without
    Numba)."""
    if not AVAILABLE:
        return None
    import numba

    previous = numba.get_num_threads()
    numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
    return previous


def supported(x: Any, w: Any, stride: tuple[int, int], padding: tuple[int, int]) -> bool:
    """Whether the kernels here compute ``conv(x, w, stride, padding)`` (and its adjoints): Numba
    is installed, the filters are 3x3, stride 1, padding 1, both arrays are float32 or both
    float64 (NumPy arrays), and the images are at most 4032 pixels wide."""
    return (AVAILABLE and stride == (1, 1) and padding == (1, 1) and w.ndim == 4
            and w.shape[2:] == (3, 3) and x.dtype == w.dtype and x.dtype in _DTYPES
            and x.shape[-1] <= _TILE - _V)


def _aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An empty C-contiguous array whose data start on a 64-byte (cache line) boundary."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(size + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start : start + size].view(dtype).reshape(shape)


def _grid_length(n: int, h: int, w: int) -> int:
    """Elements of one channel's shifted images: the grid, a vector block more (a forward job's
    last block may start anywhere), and the two rows its taps read beyond, rounded up to 16."""
    return -(-(n * (h + 1) * w + _V + 2 * w) // 16) * 16


# -- layout kernels ----------------------------------------------------------------------------

@_jit(parallel=True)
def _fill_shifted(xt, w, xs):  # pragma: no cover (compiled)
    """Write every element of ``xs`` (3, C, L): the shifted images of ``xt`` (C, N, H W), the
    channel-major images of width ``w``."""
    c, n, hw = xt.shape
    s = hw + w
    length = xs.shape[2]
    for ch in _prange(c):
        for j in range(3):
            row = xs[j, ch]
            base = w + 1 - j  # grid point 0 of copy j
            row[:base] = 0
            for m in range(n):
                dst = row[base + m * s : base + m * s + s]
                src = xt[ch, m]
                for i in range(hw):
                    dst[i] = src[i]
                dst[hw:] = 0
                if j == 0:  # the column that tap j = 0 of column 0 reads from the row above
                    for i in range(w - 1, hw, w):
                        dst[i] = 0
                elif j == 2:  # and tap j = 2 of column W - 1 from the row below
                    for i in range(0, hw, w):
                        dst[i] = 0
            row[base + n * s : length] = 0


@_jit(parallel=True)
def _fill_grid(gt, w, gg):  # pragma: no cover (compiled)
    """Write every element of ``gg`` (R', Q): rows r < R are the channel-major cotangents ``gt``
    (R, N, H W) of width ``w`` on the grid, zero on the zero rows and beyond; the rest are 0."""
    r, n, hw = gt.shape
    s = hw + w
    for k in _prange(gg.shape[0]):
        row = gg[k]
        if k >= r:
            row[:] = 0
            continue
        for m in range(n):
            dst = row[m * s : m * s + s]
            src = gt[k, m]
            for i in range(hw):
                dst[i] = src[i]
            dst[hw:] = 0
        row[n * s :] = 0


@_jit(inline="always")
def _taps(xs, ch, q0, w):  # pragma: no cover (compiled)
    """The runs of channel ``ch``'s nine taps from grid point ``q0``: tap (i, j) is run 3 i + j,
    ``xs[j, ch, q0 + i w:]``."""
    return (xs[0, ch, q0:], xs[1, ch, q0:], xs[2, ch, q0:],
            xs[0, ch, q0 + w :], xs[1, ch, q0 + w :], xs[2, ch, q0 + w :],
            xs[0, ch, q0 + 2 * w :], xs[1, ch, q0 + 2 * w :], xs[2, ch, q0 + 2 * w :])


# -- the forward kernel ------------------------------------------------------------------------

@_jit(parallel=True)
def _conv_grid(xs, wf, out, rows):  # pragma: no cover (compiled)
    """``out`` (F4, N, H, W) = conv of the images behind ``xs`` with filters ``wf`` (F4, C, 3, 3),
    F4 a multiple of 4; each job takes ``rows`` grid rows (``rows W <= _TILE - _V``), 4 filters."""
    c = xs.shape[1]
    f4, n, h, w = out.shape
    blocks, filter_blocks = (n * (h + 1) + rows - 1) // rows, f4 // 4
    for job in _prange(blocks * filter_blocks):
        r0 = (job // filter_blocks) * rows
        f0 = (job % filter_blocks) * 4
        r1 = min(n * (h + 1), r0 + rows)
        q0 = r0 * w
        nq = ((r1 - r0) * w + _V - 1) // _V
        # filter f0 + k's sums at grid point q0 + q are tile[k _TILE + q]: rows at fixed offsets
        tile = np.empty(4 * _TILE, xs.dtype)
        for k in range(4):
            tile[k * _TILE : k * _TILE + nq * _V] = 0
        for ch in range(c):
            a00, a01, a02, a10, a11, a12, a20, a21, a22 = _taps(xs, ch, q0, w)
            u, v, p, r = wf[f0, ch], wf[f0 + 1, ch], wf[f0 + 2, ch], wf[f0 + 3, ch]
            for qb in range(nq):
                for e in range(_V):  # one vector block: a fixed trip count, no remainder
                    q = qb * _V + e
                    x00, x01, x02 = a00[q], a01[q], a02[q]
                    x10, x11, x12 = a10[q], a11[q], a12[q]
                    x20, x21, x22 = a20[q], a21[q], a22[q]
                    tile[q] += (u[0, 0] * x00 + u[0, 1] * x01 + u[0, 2] * x02 + u[1, 0] * x10
                                + u[1, 1] * x11 + u[1, 2] * x12 + u[2, 0] * x20 + u[2, 1] * x21
                                + u[2, 2] * x22)
                    tile[_TILE + q] += (v[0, 0] * x00 + v[0, 1] * x01 + v[0, 2] * x02
                                        + v[1, 0] * x10 + v[1, 1] * x11 + v[1, 2] * x12
                                        + v[2, 0] * x20 + v[2, 1] * x21 + v[2, 2] * x22)
                    tile[2 * _TILE + q] += (p[0, 0] * x00 + p[0, 1] * x01 + p[0, 2] * x02
                                            + p[1, 0] * x10 + p[1, 1] * x11 + p[1, 2] * x12
                                            + p[2, 0] * x20 + p[2, 1] * x21 + p[2, 2] * x22)
                    tile[3 * _TILE + q] += (r[0, 0] * x00 + r[0, 1] * x01 + r[0, 2] * x02
                                            + r[1, 0] * x10 + r[1, 1] * x11 + r[1, 2] * x12
                                            + r[2, 0] * x20 + r[2, 1] * x21 + r[2, 2] * x22)
        # copy out each image's rows of the job (contiguous in the tile and in ``out``)
        row = r0
        while row < r1:
            m, y = row // (h + 1), row % (h + 1)
            run = min(h - y, r1 - row)
            if run > 0:
                src, dst = (row - r0) * w, (m * h + y) * w
                for k in range(4):
                    # views indexed from 0: offsets known >= 0, so the copy is vectorised
                    o, t = out[f0 + k].ravel()[dst:], tile[k * _TILE + src :]
                    for i in range(run * w):
                        o[i] = t[i]
            row += max(run, 1)


# -- the filter-gradient kernel ----------------------------------------------------------------

@_jit(fastmath={"contract", "reassoc"}, parallel=True)
def _weight_grad_grid(xs, gg, w, chunk, part):  # pragma: no cover (compiled)
    """``part[k, f, c, 3 i + j]`` = the sum over grid points ``q`` of chunk k (``chunk`` points
    each) of ``gg[f, q] xs[j, c, q + i w]``; ``gg`` has an even number of rows."""
    c = xs.shape[1]
    f2, length = gg.shape
    for k in _prange(part.shape[0]):
        q0 = k * chunk
        nq = min(length, q0 + chunk) - q0
        for f in range(0, f2, 2):
            g0, g1 = gg[f, q0:], gg[f + 1, q0:]
            for ch in range(c):
                a00, a01, a02, a10, a11, a12, a20, a21, a22 = _taps(xs, ch, q0, w)
                z = xs.dtype.type(0)
                s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = s8 = z
                t0 = t1 = t2 = t3 = t4 = t5 = t6 = t7 = t8 = z
                for q in range(nq):
                    x00, x01, x02 = a00[q], a01[q], a02[q]
                    x10, x11, x12 = a10[q], a11[q], a12[q]
                    x20, x21, x22 = a20[q], a21[q], a22[q]
                    gu, gv = g0[q], g1[q]
                    s0 += gu * x00
                    s1 += gu * x01
                    s2 += gu * x02
                    s3 += gu * x10
                    s4 += gu * x11
                    s5 += gu * x12
                    s6 += gu * x20
                    s7 += gu * x21
                    s8 += gu * x22
                    t0 += gv * x00
                    t1 += gv * x01
                    t2 += gv * x02
                    t3 += gv * x10
                    t4 += gv * x11
                    t5 += gv * x12
                    t6 += gv * x20
                    t7 += gv * x21
                    t8 += gv * x22
                d = part[k, f, ch]
                d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7], d[8] = (
                    s0, s1, s2, s3, s4, s5, s6, s7, s8)
                d = part[k, f + 1, ch]
                d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7], d[8] = (
                    t0, t1, t2, t3, t4, t5, t6, t7, t8)


# -- entry points ------------------------------------------------------------------------------

def shifted_images(x: np.ndarray) -> np.ndarray:
    """The shifted images (3, C, L) of (N, C, H, W) images ``x`` (see the module docstring); what
    :func:`conv3x3` returns for :func:`conv3x3_weight_grad` to reuse."""
    _KERNELS.compile()
    n, c, h, w = x.shape
    xs = _aligned_empty((3, c, _grid_length(n, h, w)), x.dtype)
    # channel-major (C, N, H W): a view of our activations, a copy of anything else
    xt = np.ascontiguousarray(x.transpose(1, 0, 2, 3)).reshape(c, n, h * w)
    _fill_shifted(xt, w, xs)
    return xs


def _conv(xs: np.ndarray, w: np.ndarray, shape: tuple[int, int, int, int]) -> np.ndarray:
    """conv3x3 from shifted images; ``shape`` is the input's (N, C, H, W)."""
    n, _, h, wd = shape
    f = w.shape[0]
    _KERNELS.compile()
    f4 = -(-f // _FB) * _FB
    if f4 != f:  # zero filters make whole jobs of four
        w = np.concatenate([w, np.zeros((f4 - f, *w.shape[1:]), w.dtype)])
    out = np.empty((f4, n, h, wd), dtype=xs.dtype)
    _conv_grid(xs, np.ascontiguousarray(w), out, max(1, min(BLOCK, _TILE - _V) // wd))
    return out[:f].transpose(1, 0, 2, 3)


def conv3x3(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cross-correlate (N, C, H, W) images with (F, C, 3, 3) filters, stride 1, padding 1.

    Returns ``(out, xs)``: the (N, F, H, W) result, a transposed view of an (F, N, H, W) buffer
    (channel-major), and the shifted images, which :func:`conv3x3_weight_grad` can reuse. Check
    :func:`supported` first.
    """
    xs = shifted_images(x)
    return _conv(xs, w, x.shape), xs


def conv3x3_transpose(g: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The adjoint of :func:`conv3x3` in its input: (N, F, H, W) cotangents -> (N, C, H, W), the
    convolution of ``g`` with the flipped, transposed filters (channel-major, like conv3x3)."""
    flipped = w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)
    return _conv(shifted_images(g), flipped, g.shape)


def conv3x3_weight_grad(x: np.ndarray, g: np.ndarray, xs: np.ndarray | None = None
                        ) -> np.ndarray:
    """The adjoint of :func:`conv3x3` in its filters.

    ``x`` is (N, C, H, W) and ``g`` is (*B, N, F, H, W) (``B``: any leading batch axes, a stack of
    cotangents, folded into the filter axis); returns (*B, F, C, 3, 3). ``xs`` (from conv3x3 on
    the same ``x``) skips rebuilding the shifted images.
    """
    n, c, h, wd = x.shape
    lead, f = g.shape[:-4], g.shape[-3]
    _KERNELS.compile()
    if xs is None:
        xs = shifted_images(x)
    rows = int(np.prod(lead, dtype=np.int64)) * f
    # (*B F, N, H W), channel-major: a view of our cotangents, a copy of anything else
    gt = np.ascontiguousarray(np.moveaxis(g, -3, -4)).reshape(rows, n, h * wd)
    size = -(-n * (h + 1) * wd // 16) * 16
    gg = _aligned_empty((rows + rows % 2, size), g.dtype)
    _fill_grid(gt, wd, gg)
    part = np.empty((-(-size // CHUNK), gg.shape[0], c, 9), dtype=g.dtype)
    _weight_grad_grid(xs, gg, wd, CHUNK, part)
    dw = part[0]
    for k in range(1, part.shape[0]):  # a fixed order, whatever the number of threads
        dw = dw + part[k]
    return dw[:rows].reshape(*lead, f, c, 3, 3)
