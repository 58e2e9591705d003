"""Winograd F(2x2, 3x3) convolution: 3x3 filters, stride 1, padding 1, with both adjoints.

Optional, like :mod:`._fast_conv`: the tile transforms are compiled (Numba) kernels; without
Numba :data:`AVAILABLE` is False and :func:`supported` says no to everything (the same transforms
written as NumPy passes were no faster than the patch GEMM they would replace). Everything is
computed in the input dtype (float32 or float64).

The algorithm. The zero-padded image is cut into 4x4 tiles ``d`` that overlap by 2 (tile
``(ty, tx)`` covers padded rows ``2 ty .. 2 ty + 3`` and columns ``2 tx .. 2 tx + 3``; the last
tile row or column reaches one zero pixel past an odd image) and each tile yields a 2x2 block
of the output::

    V = B^T d B,   U = G g G^T,   M = sum_c U * V (elementwise),   out = A^T M A

    B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
    G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]
    A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]

The sum over channels is, for each of the 16 transform positions ``p``, one product of an
(F, C) matrix with a (C, tiles) one: ``M[p] = U[p] @ V[p]``, a single batched ``np.matmul`` on
(16, F, C) @ (16, C, T), 9/4 fewer multiply-adds than the patch GEMM. Both adjoints are the
transposed formulas: the input gradient is ``dM = A dY A^T`` per tile, ``dV[p] = U[p]^T @
dM[p]``, and ``B dV B^T`` overlap-added into the image; the filter gradient is ``G^T (sum over
tiles dM[p] V[p]^T) G``, one batched (16, F, T) @ (16, T, C) product that reuses the forward's
``V``.

Layout and chunks. Images are read and results written channel-major, (C, N, H, W) buffers
that the (N, C, H, W) arguments and results view with transposes, as the NumPy backend's conv
kernels do. Tiles are numbered ``(n, ty, tx)``, so ``V`` is (16, C, N th tw). The batch is
processed in chunks of whole images, about :data:`CHUNK_BYTES` of transformed tiles each:
transform, product and inverse transform of a chunk run back to back while its tiles are in
cache. :func:`conv` keeps each chunk's ``V`` (:class:`Saved`) for :func:`weight_grad`;
:func:`grads` computes both adjoints from one ``dM`` per chunk (the cheapest backward).

Rounding. The transforms add and subtract (``G`` also halves, exactly), so every result is a
sum of products of ``x`` and ``g`` (or ``g`` and the cotangent) computed in a fixed order; but
the transformed values mix the nine filter taps and 16 pixels of a tile, so the error is of
order ``u`` times the sum of the transformed magnitudes (``|A^T| (|G||g||G^T| * |B^T||d||B|)
|A|`` summed over channels) rather than of the output's own terms: a few times the direct
product's error bound, as tests/test_winograd.py states and checks. A non-finite value
spoils every output of the tiles that read it (up to 4x4 outputs, not 3x3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ._jit import AVAILABLE, LazyKernels

__all__ = ["AVAILABLE", "CHUNK_BYTES", "MIN_SIZE", "Saved", "conv", "conv_transpose", "grads",
           "preferred", "supported", "weight_grad"]

#: bytes of transformed tiles (input and output side together) per chunk of images
CHUNK_BYTES = 1 << 20
#: the smallest image side (H and W) at which :func:`preferred` says yes: below it the tile
#: transforms' per-row work dominates and the NumPy backend's own kernels are faster
MIN_SIZE = 16
_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
_KRON = np.kron(_G, _G)  # (16, 9): U[4 i + j] = sum over (k, l) of G[i, k] G[j, l] g[3 k + l]


# The kernels below, compiled on first use. No threads: each runs on the calling thread, so it
# never competes with BLAS's; no fast-math, so every addition happens as written.
_KERNELS = LazyKernels(globals())
_jit = _KERNELS.kernel(fastmath=frozenset())


def supported(x: Any, w: Any, stride: tuple[int, int], padding: tuple[int, int]) -> bool:
    """Whether the functions here compute ``conv(x, w, stride, padding)`` and its adjoints:
    Numba is installed, ``x`` (N, C, H, W) and ``w`` (F, C, 3, 3) are NumPy arrays of one dtype,
    float32 or float64, and stride and padding are both (1, 1)."""
    return (AVAILABLE and isinstance(x, np.ndarray) and isinstance(w, np.ndarray)
            and x.ndim == 4 and w.ndim == 4 and w.shape[2:] == (3, 3)
            and x.shape[1] == w.shape[1] and x.dtype == w.dtype and x.dtype in _DTYPES
            and tuple(stride) == (1, 1) and tuple(padding) == (1, 1))


def preferred(x: Any, w: Any, stride: tuple[int, int], padding: tuple[int, int]) -> bool:
    """:func:`supported`, on images at least :data:`MIN_SIZE` pixels on each side (where the
    Winograd kernels measured faster than the NumPy backend's own)."""
    return supported(x, w, stride, padding) and min(x.shape[2:]) >= MIN_SIZE


def _tiles(h: int, w: int) -> tuple[int, int]:
    """Tile rows and columns of an H x W image."""
    return (h + 1) // 2, (w + 1) // 2


def _chunks(n: int, c: int, f: int, h: int, w: int, itemsize: int) -> list[tuple[int, int]]:
    """Batch ranges ``[a, b)`` with about :data:`CHUNK_BYTES` of transformed tiles (C input and
    F output channels) each."""
    th, tw = _tiles(h, w)
    step = max(1, CHUNK_BYTES // (16 * (c + f) * th * tw * itemsize))
    return [(a, min(n, a + step)) for a in range(0, n, step)]


def _filters(w: np.ndarray) -> np.ndarray:
    """``U = G g G^T`` of the (F, C, 3, 3) filters, as (16, F, C)."""
    f, c = w.shape[:2]
    u = w.reshape(f * c, 9) @ _KRON.T.astype(w.dtype)
    return np.ascontiguousarray(u.T).reshape(16, f, c)


def _filters_adjoint(du: np.ndarray) -> np.ndarray:
    """``G^T dU G`` of (16, R, C) transformed-filter gradients, as (R, C, 3, 3)."""
    _, r, c = du.shape
    dg = _KRON.T.astype(du.dtype) @ du.reshape(16, r * c)
    return np.ascontiguousarray(dg.T).reshape(r, c, 3, 3)


def _channel_major(a: np.ndarray) -> np.ndarray:
    """(N, C, H, W) ``a`` as a C-contiguous (C, N, H, W) array: a view of channel-major
    arrays, a copy of anything else."""
    return np.ascontiguousarray(a.transpose(1, 0, 2, 3))


# -- the tile transforms -------------------------------------------------------------------
# Each kernel handles the images n0 .. n0 + nc - 1 of a chunk, one (channel, image) plane at a
# time, a row of tiles at a time, with small scratch rows; out-of-image pixels are zeros.

@_jit
def _input_transform(xt, n0, v):  # pragma: no cover (compiled)
    """``v[4 i + j, c, m, ty, tx]`` = ``(B^T d B)[i, j]`` of tile (ty, tx) of image ``n0 + m``,
    channel ``c``, of the channel-major images ``xt`` (C, N, H, W)."""
    c, _, h, w = xt.shape
    nc, th, tw = v.shape[2], v.shape[3], v.shape[4]
    wp = 2 * tw + 2
    rows = np.zeros((4, wp), xt.dtype)  # the tile row's 4 padded rows (borders stay 0)
    t = np.empty((4, wp), xt.dtype)  # their combinations B^T d, per column
    for ch in range(c):
        for mm in range(nc):
            m = n0 + mm
            for ty in range(th):
                for i in range(4):
                    y = 2 * ty + i - 1
                    if 0 <= y < h:
                        for x in range(w):
                            rows[i, x + 1] = xt[ch, m, y, x]
                    else:
                        for x in range(w):
                            rows[i, x + 1] = 0
                for x in range(wp):
                    t[0, x] = rows[0, x] - rows[2, x]
                    t[1, x] = rows[1, x] + rows[2, x]
                    t[2, x] = rows[2, x] - rows[1, x]
                    t[3, x] = rows[1, x] - rows[3, x]
                for i in range(4):
                    for tx in range(tw):
                        e0, e1 = t[i, 2 * tx], t[i, 2 * tx + 1]
                        e2, e3 = t[i, 2 * tx + 2], t[i, 2 * tx + 3]
                        v[4 * i, ch, mm, ty, tx] = e0 - e2
                        v[4 * i + 1, ch, mm, ty, tx] = e1 + e2
                        v[4 * i + 2, ch, mm, ty, tx] = e2 - e1
                        v[4 * i + 3, ch, mm, ty, tx] = e1 - e3


@_jit
def _output_transform(mt, n0, out):  # pragma: no cover (compiled)
    """Write the 2x2 blocks ``A^T M A`` of the tiles ``mt`` (16, F, nc, th, tw) into images
    ``n0 ..`` of ``out`` (F, N, H, W), dropping what falls outside an odd image."""
    f, _, h, w = out.shape
    nc, th, tw = mt.shape[2], mt.shape[3], mt.shape[4]
    half = w // 2
    s = np.empty((8, tw), out.dtype)  # (A^T M)[a, j] of the tile row: row 4 a + j
    for ch in range(f):
        for mm in range(nc):
            m = n0 + mm
            for ty in range(th):
                for j in range(4):
                    for tx in range(tw):
                        a1, a2 = mt[4 + j, ch, mm, ty, tx], mt[8 + j, ch, mm, ty, tx]
                        s[j, tx] = mt[j, ch, mm, ty, tx] + a1 + a2
                        s[4 + j, tx] = a1 - a2 - mt[12 + j, ch, mm, ty, tx]
                for a in range(2):
                    y = 2 * ty + a
                    if y < h:
                        k = 4 * a
                        for tx in range(half):
                            b1, b2 = s[k + 1, tx], s[k + 2, tx]
                            out[ch, m, y, 2 * tx] = s[k, tx] + b1 + b2
                            out[ch, m, y, 2 * tx + 1] = b1 - b2 - s[k + 3, tx]
                        if half < tw:
                            out[ch, m, y, w - 1] = s[k, half] + s[k + 1, half] + s[k + 2, half]


@_jit
def _output_adjoint(gt, n0, dm):  # pragma: no cover (compiled)
    """``dm[4 i + j, f, m, ty, tx]`` = ``(A dY A^T)[i, j]`` of the 2x2 block (ty, tx) of
    image ``n0 + m`` of the channel-major cotangents ``gt`` (F, N, H, W) (zero beyond them)."""
    f, _, h, w = gt.shape
    nc, th, tw = dm.shape[2], dm.shape[3], dm.shape[4]
    r = np.zeros((2, 2 * tw), gt.dtype)  # the block row's 2 rows (column 2 tw - 1 stays 0)
    c = np.empty((2, 4, tw), gt.dtype)  # (dY A^T)[a, j]
    for ch in range(f):
        for mm in range(nc):
            m = n0 + mm
            for ty in range(th):
                for a in range(2):
                    y = 2 * ty + a
                    if y < h:
                        for x in range(w):
                            r[a, x] = gt[ch, m, y, x]
                    else:
                        for x in range(w):
                            r[a, x] = 0
                    for tx in range(tw):
                        y0, y1 = r[a, 2 * tx], r[a, 2 * tx + 1]
                        c[a, 0, tx] = y0
                        c[a, 1, tx] = y0 + y1
                        c[a, 2, tx] = y0 - y1
                        c[a, 3, tx] = -y1
                for j in range(4):
                    for tx in range(tw):
                        c0, c1 = c[0, j, tx], c[1, j, tx]
                        dm[j, ch, mm, ty, tx] = c0
                        dm[4 + j, ch, mm, ty, tx] = c0 + c1
                        dm[8 + j, ch, mm, ty, tx] = c0 - c1
                        dm[12 + j, ch, mm, ty, tx] = -c1


@_jit
def _input_adjoint(dv, n0, dx):  # pragma: no cover (compiled)
    """Overlap-add the tiles ``B dV B^T`` of ``dv`` (16, C, nc, th, tw) into images ``n0 ..``
    of ``dx`` (C, N, H, W), dropping the padding: the adjoint of :func:`_input_transform`."""
    c, _, h, w = dx.shape
    nc, th, tw = dv.shape[2], dv.shape[3], dv.shape[4]
    wp = 2 * tw + 2
    # (dV B^T)[i, padded column], overlap-added along the row; columns 0 and 2 tw + 1, outside
    # every image, stay 0
    q = np.zeros((4, wp), dx.dtype)
    acc = np.empty((4, wp), dx.dtype)  # padded rows 2 ty .. 2 ty + 3 being summed
    for ch in range(c):
        for mm in range(nc):
            m = n0 + mm
            for x in range(wp):
                acc[0, x] = 0
                acc[1, x] = 0
            for ty in range(th):
                for i in range(4):
                    p = 4 * i
                    # padded column 2 k <- a0[k] - a0[k-1] + a1[k-1] + a2[k-1],
                    # 2 k + 1 <- a1[k] - a2[k] + a3[k] - a3[k-1]  (a[-1] = a[tw] = 0)
                    q[i, 1] = (dv[p + 1, ch, mm, ty, 0] - dv[p + 2, ch, mm, ty, 0]
                               + dv[p + 3, ch, mm, ty, 0])
                    for tx in range(1, tw):
                        q[i, 2 * tx] = (dv[p, ch, mm, ty, tx] - dv[p, ch, mm, ty, tx - 1]
                                        + dv[p + 1, ch, mm, ty, tx - 1]
                                        + dv[p + 2, ch, mm, ty, tx - 1])
                        q[i, 2 * tx + 1] = (dv[p + 1, ch, mm, ty, tx] - dv[p + 2, ch, mm, ty, tx]
                                            + dv[p + 3, ch, mm, ty, tx]
                                            - dv[p + 3, ch, mm, ty, tx - 1])
                    e = tw - 1
                    q[i, 2 * tw] = (dv[p + 1, ch, mm, ty, e] + dv[p + 2, ch, mm, ty, e]
                                    - dv[p, ch, mm, ty, e])
                for x in range(wp):
                    acc[0, x] += q[0, x]
                    acc[1, x] += q[1, x] - q[2, x] + q[3, x]
                    acc[2, x] = q[1, x] + q[2, x] - q[0, x]
                    acc[3, x] = -q[3, x]
                for i in range(2):  # padded rows 2 ty and 2 ty + 1 are complete
                    y = 2 * ty + i - 1
                    if 0 <= y < h:
                        for x in range(w):
                            dx[ch, m, y, x] = acc[i, x + 1]
                for x in range(wp):
                    acc[0, x] = acc[2, x]
                    acc[1, x] = acc[3, x]
            if 2 * th - 1 < h:  # padded row 2 th (row 2 th + 1 is outside every image)
                for x in range(w):
                    dx[ch, m, 2 * th - 1, x] = acc[0, x + 1]


# -- entry points ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Saved:
    """What :func:`conv` keeps for :func:`weight_grad`: per chunk of images ``[a, b)``, its
    transformed input tiles ``V`` (16, C, (b - a) th tw)."""

    chunks: tuple[tuple[int, int, np.ndarray], ...]


def conv(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, Saved]:
    """Cross-correlate (N, C, H, W) images with (F, C, 3, 3) filters, stride 1, padding 1.

    Returns ``(out, saved)``: the (N, F, H, W) result, a transposed view of an (F, N, H, W)
    buffer (channel-major), and the transformed input tiles for :func:`weight_grad`. Check
    :func:`supported` first.
    """
    _KERNELS.compile()
    n, c, h, wd = x.shape
    f = w.shape[0]
    th, tw = _tiles(h, wd)
    xt = _channel_major(x)
    u = _filters(w)
    out = np.empty((f, n, h, wd), x.dtype)
    saved = []
    for a, b in _chunks(n, c, f, h, wd, x.dtype.itemsize):
        v = np.empty((16, c, b - a, th, tw), x.dtype)
        _input_transform(xt, a, v)
        v = v.reshape(16, c, -1)
        saved.append((a, b, v))
        _output_transform(np.matmul(u, v).reshape(16, f, b - a, th, tw), a, out)
    return out.transpose(1, 0, 2, 3), Saved(tuple(saved))


def conv_transpose(g: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The adjoint of :func:`conv` in its input: (N, F, H, W) cotangents and (F, C, 3, 3)
    filters -> the (N, C, H, W) input gradient, a transposed view of a (C, N, H, W) buffer."""
    return _adjoints(g, w)[0]


def grads(g: np.ndarray, w: np.ndarray, saved: Saved) -> tuple[np.ndarray, np.ndarray]:
    """Both adjoints at once, ``(conv_transpose(g, w), weight_grad(x, g, saved))`` for (N, F,
    H, W) ``g`` without batch axes (``saved`` from :func:`conv` on ``x``), with one transform
    of ``g`` per chunk serving both products (while it is in cache)."""
    dx, du = _adjoints(g, w, saved)
    assert du is not None
    return dx, _filters_adjoint(du)


def _adjoints(g: np.ndarray, w: np.ndarray, saved: Saved | None = None
              ) -> tuple[np.ndarray, np.ndarray | None]:
    """The input gradient and, given the forward's ``saved`` tiles, the transformed filter
    gradient (16, F, C) (else None)."""
    _KERNELS.compile()
    n, f, h, wd = g.shape
    c = w.shape[1]
    th, tw = _tiles(h, wd)
    gt = _channel_major(g)
    ut = _filters(w).transpose(0, 2, 1)
    dx = np.empty((c, n, h, wd), g.dtype)
    chunks = saved.chunks if saved is not None else [
        (a, b, None) for a, b in _chunks(n, c, f, h, wd, g.dtype.itemsize)]
    du = None
    for a, b, v in chunks:
        dm = np.empty((16, f, b - a, th, tw), g.dtype)
        _output_adjoint(gt, a, dm)
        dm = dm.reshape(16, f, -1)
        if v is not None:
            part = np.matmul(dm, v.transpose(0, 2, 1))
            du = part if du is None else du + part  # chunks summed in a fixed order
        dv = np.matmul(ut, dm)
        _input_adjoint(dv.reshape(16, c, b - a, th, tw), a, dx)
    return dx.transpose(1, 0, 2, 3), du


def weight_grad(x: np.ndarray, g: np.ndarray, saved: Saved | None = None) -> np.ndarray:
    """The adjoint of :func:`conv` in its filters.

    ``x`` is (N, C, H, W) and ``g`` is (*B, N, F, H, W) (``B``: any leading batch axes, a stack
    of cotangents, folded into the filter axis); returns (*B, F, C, 3, 3). ``saved`` (from
    :func:`conv` on the same ``x``) skips transforming ``x`` again; without it each chunk of
    ``x`` is transformed just before use.
    """
    _KERNELS.compile()
    n, c, h, wd = x.shape
    lead, f = g.shape[:-4], g.shape[-3]
    th, tw = _tiles(h, wd)
    rows = int(np.prod(lead, dtype=np.int64)) * f
    # (*B F, N, H, W), channel-major: a view of our cotangents, a copy of anything else
    gt = np.ascontiguousarray(np.moveaxis(g, -3, -4)).reshape(rows, n, h, wd)
    if saved is None:
        xt = _channel_major(x)
        ranges = _chunks(n, c, rows, h, wd, x.dtype.itemsize)
    else:
        ranges = [(a, b) for a, b, _ in saved.chunks]
    du = None
    for k, (a, b) in enumerate(ranges):
        if saved is None:
            v = np.empty((16, c, b - a, th, tw), x.dtype)
            _input_transform(xt, a, v)
            v = v.reshape(16, c, -1)
        else:
            v = saved.chunks[k][2]
        dm = np.empty((16, rows, b - a, th, tw), g.dtype)
        _output_adjoint(gt, a, dm)
        part = np.matmul(dm.reshape(16, rows, -1), v.transpose(0, 2, 1))
        du = part if du is None else du + part  # chunks summed in a fixed order
    assert du is not None
    return _filters_adjoint(du).reshape(*lead, f, c, 3, 3)
