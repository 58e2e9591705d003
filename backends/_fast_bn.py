"""Optional compiled (Numba) kernels for batch norm's hot case, used by the NumPy backend.

The case: 4-D ``x`` (N, C, H, W) with statistics over ``axis = (-4, -2, -1)`` (per channel),
float32 or float64, ``g`` without extra stack axes, and every array either C-contiguous or
channel-major (a transposed view of a C-contiguous (C, N, H, W) buffer, as the conv kernels
return it). For each channel, while its values are in cache, the forward makes a pass for the
mean, one for the variance of the centred values (never ``mean(x^2) - mean^2``, which cancels)
and one writing ``xhat`` and ``xhat w + b``; the gradient makes one pass for the channel sums of
``g`` and ``g xhat`` and one writing ``w inv (g - mean(g) - xhat mean(g xhat))``. Outputs take
``x``'s layout.

Every elementwise operation is the generic path's (:class:`._generic.Backend`'s batch-norm
hooks), in the same dtype and order, so the two differ only in how the sums are rounded: here
in eight interleaved partial sums per chunk of :data:`BLOCK` values, chunks added in groups of
:data:`GROUP` (an error bound of about ``(BLOCK / 8 + GROUP + n / (BLOCK GROUP)) u`` times the
sum of magnitudes, against NumPy's pairwise summation's ``O(log n) u``); tests/test_fast_bn.py
states and checks the resulting bounds against the generic hooks. The kernels are compiled
without threads: a call runs on the calling thread only, so a process uses no more threads than
its BLAS limit allows (a parallel loop over channels was erratic on a shared two-core machine).

Switch: the kernels are used when Numba imports (``pip install -e ".[fast]"``) and the
environment variable ``MINIRESNET_FAST`` is not ``"0"`` (read once, at import); everything else
runs the generic hooks. :func:`forced` switches them on or off for a block of code (tests);
:func:`enabled` says whether they are in use. Numba itself is imported, and the kernels compiled
(or loaded from Numba's on-disk cache), on the first call of a kernel, or by :func:`warm_up`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = ["BLOCK", "GROUP", "available", "enabled", "forced", "standardize_affine",
           "standardize_affine_grad", "batch_stats", "warm_up"]

#: The order of the sums: each run of values is cut into chunks of BLOCK values (fewer at a
#: run's end; a multiple of 8), each summed in 8 interleaved partial sums that are then added
#: pairwise; chunk sums are added in turn into a group sum, and every GROUP chunks the group sum
#: into the total (the < 8 values left at a run's end go into the group sum one by one).
BLOCK, GROUP = 128, 16
_AXIS = (-4, -2, -1)
_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

_LOCK = threading.Lock()
_AVAILABLE = importlib.util.find_spec("numba") is not None
_state: dict[str, Any] = {"on": _AVAILABLE and os.environ.get("MINIRESNET_FAST", "1") != "0",
                          "kernels": None}


def available() -> bool:
    """Whether Numba is installed (the kernels can be used)."""
    return _AVAILABLE


def enabled() -> bool:
    """Whether the NumPy backend uses these kernels now."""
    return _state["on"]


@contextlib.contextmanager
def forced(on: bool) -> Iterator[None]:
    """Use the compiled kernels (``on=True``) or the generic hooks (``False``) inside the block.

    Raises
    ------
    RuntimeError
        If ``on`` and Numba is not installed.
    """
    if on and not _AVAILABLE:
        raise RuntimeError("fast batch norm: numba is not installed (pip install -e '.[fast]')")
    before = _state["on"]
    _state["on"] = bool(on)
    try:
        yield
    finally:
        _state["on"] = before


# -- the kernels (plain Python here, compiled by _kernels) -------------------------------------
# Each array is passed as its flat buffer with the element strides of its batch and channel
# axes; its (H, W) planes are contiguous runs of L values. Where every array's batch rows follow
# each other (channel-major layout), the caller passes one run of N L values per channel. Loops
# index slices from 0 (so that the compiled loops vectorise); a sum's running state is (total,
# group sum, chunks in the group), see BLOCK.

def _chunk_done(total, part, chunks, s, zero):
    """Add a chunk's sum ``s`` to the group sum, and the group sum to the total every GROUP
    chunks."""
    part += s
    chunks += 1
    if chunks == GROUP:
        return total + part, zero, 0
    return total, part, chunks


def _sum(r, zero, total, part, chunks):
    """Add the values of the run ``r`` to the running sum."""
    n = r.shape[0]
    full = n - n % 8
    for start in range(0, full, BLOCK):
        c = r[start:min(start + BLOCK, full)]
        s0, s1, s2, s3, s4, s5, s6, s7 = c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]
        for i in range(1, c.shape[0] // 8):
            q = 8 * i
            s0 += c[q]
            s1 += c[q + 1]
            s2 += c[q + 2]
            s3 += c[q + 3]
            s4 += c[q + 4]
            s5 += c[q + 5]
            s6 += c[q + 6]
            s7 += c[q + 7]
        total, part, chunks = _chunk_done(
            total, part, chunks, ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7)), zero)
    for q in range(full, n):
        part += r[q]
    return total, part, chunks


def _sum_sq_dev(r, m, zero, total, part, chunks):
    """Add the ``(r - m)**2`` of the run ``r`` to the running sum."""
    n = r.shape[0]
    full = n - n % 8
    for start in range(0, full, BLOCK):
        c = r[start:min(start + BLOCK, full)]
        d0, d1, d2, d3 = c[0] - m, c[1] - m, c[2] - m, c[3] - m
        d4, d5, d6, d7 = c[4] - m, c[5] - m, c[6] - m, c[7] - m
        s0, s1, s2, s3 = d0 * d0, d1 * d1, d2 * d2, d3 * d3
        s4, s5, s6, s7 = d4 * d4, d5 * d5, d6 * d6, d7 * d7
        for i in range(1, c.shape[0] // 8):
            q = 8 * i
            d0, d1, d2, d3 = c[q] - m, c[q + 1] - m, c[q + 2] - m, c[q + 3] - m
            d4, d5, d6, d7 = c[q + 4] - m, c[q + 5] - m, c[q + 6] - m, c[q + 7] - m
            s0 += d0 * d0
            s1 += d1 * d1
            s2 += d2 * d2
            s3 += d3 * d3
            s4 += d4 * d4
            s5 += d5 * d5
            s6 += d6 * d6
            s7 += d7 * d7
        total, part, chunks = _chunk_done(
            total, part, chunks, ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7)), zero)
    for q in range(full, n):
        d = r[q] - m
        part += d * d
    return total, part, chunks


def _sum_dot(g, h, zero, state):
    """Add the values of the run ``g`` and of ``g * h`` to the two running sums ``state``."""
    t1, p1, t2, p2, chunks = state
    n = g.shape[0]
    full = n - n % 8
    for start in range(0, full, BLOCK):
        stop = min(start + BLOCK, full)
        c, e = g[start:stop], h[start:stop]
        a0, a1, a2, a3, a4, a5, a6, a7 = c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]
        b0, b1, b2, b3 = c[0] * e[0], c[1] * e[1], c[2] * e[2], c[3] * e[3]
        b4, b5, b6, b7 = c[4] * e[4], c[5] * e[5], c[6] * e[6], c[7] * e[7]
        for i in range(1, c.shape[0] // 8):
            q = 8 * i
            a0 += c[q]
            a1 += c[q + 1]
            a2 += c[q + 2]
            a3 += c[q + 3]
            a4 += c[q + 4]
            a5 += c[q + 5]
            a6 += c[q + 6]
            a7 += c[q + 7]
            b0 += c[q] * e[q]
            b1 += c[q + 1] * e[q + 1]
            b2 += c[q + 2] * e[q + 2]
            b3 += c[q + 3] * e[q + 3]
            b4 += c[q + 4] * e[q + 4]
            b5 += c[q + 5] * e[q + 5]
            b6 += c[q + 6] * e[q + 6]
            b7 += c[q + 7] * e[q + 7]
        p1 += ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
        p2 += ((b0 + b1) + (b2 + b3)) + ((b4 + b5) + (b6 + b7))
        chunks += 1
        if chunks == GROUP:
            t1, p1, t2, p2, chunks = t1 + p1, zero, t2 + p2, zero, 0
    for q in range(full, n):
        p1 += g[q]
        p2 += g[q] * h[q]
    return t1, p1, t2, p2, chunks


def _forward(x, sn, sc, rows, length, zero, one, eps, w, b, affine, mean, var, inv, xhat, out):
    """Per channel: mean, centred variance, inv = one / sqrt(var + eps), then ``xhat`` and (if
    ``affine``) ``out = xhat w + b``, written with x's strides. ``zero``, ``one`` and ``eps``
    are scalars of x's dtype (so that no operation is promoted to float64); a mean is the
    float64 quotient of the sum rounded to x's dtype, as NumPy's is."""
    count = rows * length
    for c in range(mean.shape[0]):
        state = (zero, zero, 0)
        for r in range(rows):
            p = c * sc + r * sn
            state = _sum(x[p:p + length], zero, *state)
        mean[c] = (state[0] + state[1]) / count
        m = mean[c]
        state = (zero, zero, 0)
        for r in range(rows):
            p = c * sc + r * sn
            state = _sum_sq_dev(x[p:p + length], m, zero, *state)
        var[c] = (state[0] + state[1]) / count
        inv[c] = one / np.sqrt(var[c] + eps)
        k = inv[c]
        wc, bc = w[c], b[c]
        for r in range(rows):
            p = c * sc + r * sn
            xr, hr, orow = x[p:p + length], xhat[p:p + length], out[p:p + length]
            if affine:
                for i in range(length):
                    v = (xr[i] - m) * k
                    hr[i] = v
                    orow[i] = v * wc + bc
            else:
                for i in range(length):
                    hr[i] = (xr[i] - m) * k


def _grad(g, gn, gc, h, hn, hc, rows, length, zero, k, m1, m2, out):
    """Per channel: ``m1 = mean(g)``, ``m2 = mean(g h)``, then ``out = g k - h (k m2) - k m1``
    with ``h = xhat``, ``k = w inv``; ``out`` has ``h``'s strides."""
    count = rows * length
    for c in range(k.shape[0]):
        state = (zero, zero, zero, zero, 0)
        for r in range(rows):
            p, o = c * gc + r * gn, c * hc + r * hn
            state = _sum_dot(g[p:p + length], h[o:o + length], zero, state)
        m1[c] = (state[0] + state[1]) / count
        m2[c] = (state[2] + state[3]) / count
        kc = k[c]
        km2, km1 = kc * m2[c], kc * m1[c]
        for r in range(rows):
            p, o = c * gc + r * gn, c * hc + r * hn
            gr, hr, orow = g[p:p + length], h[o:o + length], out[o:o + length]
            for i in range(length):
                v = gr[i] * kc
                v -= hr[i] * km2
                orow[i] = v - km1


def _kernels() -> dict[str, Any]:
    """The compiled kernels (compiled, or loaded from Numba's on-disk cache, on first use)."""
    kernels = _state["kernels"]
    if kernels is None:
        with _LOCK:
            kernels = _state["kernels"]
            if kernels is None:
                import numba  # optional, and slow to import: only once a kernel is needed

                # error_model="numpy": a division by zero gives inf as NumPy's does (eps = 0
                # on a constant channel), not an exception
                jit = numba.njit(cache=True, nogil=True, error_model="numpy")
                helpers = ("_chunk_done", "_sum", "_sum_sq_dev", "_sum_dot")
                globals().update({name: jit(globals()[name]) for name in helpers})
                kernels = {"forward": jit(_forward), "grad": jit(_grad)}
                _state["kernels"] = kernels
    return kernels


# -- the entry points: None where the case is not the hot one (the caller then runs the generic
# hooks) ----------------------------------------------------------------------------------------

def _flat(a: np.ndarray) -> tuple[np.ndarray, int, int] | None:
    """``a`` (N, C, H, W) as (its flat buffer, batch stride, channel stride), the strides in
    elements, if it is C-contiguous or channel-major; else None."""
    n, c, h, w = a.shape
    if a.flags.c_contiguous:
        return a.reshape(-1), c * h * w, h * w
    t = a.transpose(1, 0, 2, 3)
    if t.flags.c_contiguous:
        return t.reshape(-1), h * w, n * h * w
    return None


def _hot(x: Any, axis: tuple[int, ...]) -> bool:
    # read-only arrays would need kernels compiled for them: left to the generic hooks
    return (_state["on"] and type(x) is np.ndarray and x.ndim == 4 and axis == _AXIS
            and x.dtype in _DTYPES and x.size > 0 and x.flags.writeable)


def _like(x: np.ndarray, sn: int) -> np.ndarray:
    """An empty array shaped and laid out like ``x`` (of which sn is the batch stride)."""
    n, c, h, w = x.shape
    if sn == c * h * w:
        return np.empty(x.shape, dtype=x.dtype)
    return np.empty((c, n, h, w), dtype=x.dtype).transpose(1, 0, 2, 3)


def _forward_call(x: np.ndarray, eps: float, w: Any, b: Any) -> tuple[Any, dict] | None:
    flat = _flat(x)
    if flat is None:
        return None
    buf, sn, sc = flat
    n, c, h, wd = x.shape
    rows, length = (1, n * h * wd) if sn == h * wd else (n, h * wd)
    t = x.dtype.type
    mean, var, inv = (np.empty(c, dtype=x.dtype) for _ in range(3))
    xhat = _like(x, sn)
    affine = w is not None
    out = _like(x, sn) if affine else xhat
    if affine:
        w = np.ascontiguousarray(w, dtype=x.dtype)
        b = np.ascontiguousarray(b, dtype=x.dtype)
    else:
        w = b = mean
    _kernels()["forward"](buf, sn, sc, rows, length, t(0), t(1), t(eps), w, b, affine,
                          mean, var, inv, _flat(xhat)[0], _flat(out)[0])
    keep = (1, c, 1, 1)
    stats = {"mean": mean.reshape(keep), "var": var.reshape(keep), "inv": inv.reshape(keep),
             "xhat": xhat}
    return out, stats


def batch_stats(x: Any, axis: tuple[int, ...], eps: float) -> dict | None:
    """The statistics of :meth:`._generic.Backend.batch_stats`, or None (not the hot case)."""
    if not _hot(x, axis):
        return None
    done = _forward_call(x, eps, None, None)
    return None if done is None else done[1]


def standardize_affine(x: Any, w: Any, b: Any, axis: tuple[int, ...], eps: float,
                       stats: dict | None) -> tuple[Any, dict] | None:
    """:meth:`._generic.Backend.standardize_affine`, or None (not the hot case, or ``stats``
    given: then only the cheap affine pass is left, which the generic hook does)."""
    if stats is not None or not _hot(x, axis):
        return None
    return _forward_call(x, eps, w, b)


def standardize_affine_grad(g: Any, w: Any, stats: dict, axis: tuple[int, ...]) -> Any:
    """:meth:`._generic.Backend.standardize_affine_grad`, or None (not the hot case)."""
    xhat, inv = stats["xhat"], stats["inv"]
    if not (_hot(xhat, axis) and type(g) is np.ndarray and g.shape == xhat.shape
            and g.dtype == xhat.dtype and g.flags.writeable and type(inv) is np.ndarray
            and inv.dtype == xhat.dtype):
        return None
    gflat, hflat = _flat(g), _flat(xhat)
    if gflat is None or hflat is None:
        return None
    (gbuf, gn, gc), (hbuf, hn, hc) = gflat, hflat
    n, c, h, wd = xhat.shape
    length = h * wd
    rows = n
    if gn == length and hn == length:  # both channel-major: one run per channel
        rows, length = 1, n * length
    k = np.asarray(w, dtype=xhat.dtype).reshape(c) * inv.reshape(c)
    out = _like(xhat, hn)
    m1, m2 = np.empty(c, dtype=xhat.dtype), np.empty(c, dtype=xhat.dtype)
    _kernels()["grad"](gbuf, gn, gc, hbuf, hn, hc, rows, length, xhat.dtype.type(0), k, m1, m2,
                       _flat(out)[0])
    return out


def warm_up() -> None:
    """Compile (or load from Numba's cache) the kernels for float32 and float64 now, so that
    no first call pays for it; a no-op where the kernels are not in use."""
    if not _state["on"]:
        return
    for dtype in _DTYPES:
        x = np.arange(2 * 3 * 2 * 2, dtype=dtype).reshape(2, 3, 2, 2)
        for a in (x, np.ascontiguousarray(x.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)):
            out, stats = standardize_affine(a, x[0, :, 0, 0], x[0, :, 0, 0], _AXIS, 1e-5, None)
            standardize_affine_grad(out, x[0, :, 0, 0], stats, _AXIS)
            batch_stats(a, _AXIS, 1e-5)
