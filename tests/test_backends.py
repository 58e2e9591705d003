"""Tests for miniresnet.backends: conv kernels and geometry, RNG, host transfer, registry, NumPy's
quirks and errors."""

from __future__ import annotations

import ast
import importlib.util
import pathlib
import re
import sys

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from miniresnet import backends
from miniresnet.backends import (
    BACKEND_NAMES,
    PYTHON_SCALARS,
    Backend,
    BackendUnavailable,
    Rng,
    _fast_bn,
    _fast_conv,
    _generic,
    _numpy,
    available_backends,
    backend_of,
    conv_geometry,
    conv_output_size,
    get_backend,
    int_pair,
    is_available,
    python_scalar,
)

pytestmark = pytest.mark.filterwarnings("error")

BACKEND_PARAMS = [
    pytest.param(name, marks=pytest.mark.cupy) if name == "cupy" else name for name in BACKEND_NAMES
]


@pytest.fixture(scope="module", params=BACKEND_PARAMS)
def backend(request: pytest.FixtureRequest) -> Backend:
    ok, why = is_available(request.param)
    if not ok:
        pytest.skip(why)
    return get_backend(request.param)


# ----------------------------------------------------------------------------------------------
# naive references in plain NumPy
# ----------------------------------------------------------------------------------------------


def out_size(h, w, kh, kw, stride, padding):
    return (h + 2 * padding[0] - kh) // stride[0] + 1, (w + 2 * padding[1] - kw) // stride[1] + 1


def ref_im2col(x, kh, kw, stride, padding):
    n, c, h, w = x.shape
    oh, ow = out_size(h, w, kh, kw, stride, padding)
    cols = np.zeros((n, c, kh, kw, oh, ow), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            for a in range(oh):
                for b in range(ow):
                    r = a * stride[0] + i - padding[0]
                    q = b * stride[1] + j - padding[1]
                    if 0 <= r < h and 0 <= q < w:
                        cols[:, :, i, j, a, b] = x[:, :, r, q]
    return cols


def ref_col2im(cols, h, w, stride, padding):
    n, c, kh, kw, oh, ow = cols.shape
    out = np.zeros((n, c, h, w), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            for a in range(oh):
                for b in range(ow):
                    r = a * stride[0] + i - padding[0]
                    q = b * stride[1] + j - padding[1]
                    if 0 <= r < h and 0 <= q < w:
                        out[:, :, r, q] += cols[:, :, i, j, a, b]
    return out


@st.composite
def geometries(draw):
    """(N, C, H, W, kh, kw, stride, padding) with a non-empty output."""
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    h, w = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    oh, ow = out_size(h, w, kh, kw, stride, padding)
    assume(oh >= 1 and ow >= 1)
    return n, c, h, w, kh, kw, stride, padding


def host_normal(seed, shape, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# the strict backend is slow enough on the first examples to trip the default deadline
relaxed = settings(deadline=None)

# ----------------------------------------------------------------------------------------------
# im2col / col2im
# ----------------------------------------------------------------------------------------------


@relaxed
@given(geom=geometries(), seed=st.integers(0, 2**32 - 1))
def test_im2col_matches_reference(backend, geom, seed):
    n, c, h, w, kh, kw, stride, padding = geom
    x = host_normal(seed, (n, c, h, w))
    cols = backend.im2col(backend.asarray(x), kh, kw, stride, padding)
    assert isinstance(cols, backend.array_type)
    np.testing.assert_array_equal(backend.to_numpy(cols), ref_im2col(x, kh, kw, stride, padding))


@relaxed
@given(geom=geometries(), seed=st.integers(0, 2**32 - 1))
def test_col2im_matches_reference(backend, geom, seed):
    n, c, h, w, kh, kw, stride, padding = geom
    oh, ow = out_size(h, w, kh, kw, stride, padding)
    y = host_normal(seed, (n, c, kh, kw, oh, ow))
    out = backend.col2im(backend.asarray(y), h, w, stride, padding)
    assert isinstance(out, backend.array_type)
    np.testing.assert_allclose(
        backend.to_numpy(out), ref_col2im(y, h, w, stride, padding), rtol=1e-13, atol=1e-13
    )


@relaxed
@given(geom=geometries(), seed=st.integers(0, 2**32 - 1))
def test_col2im_is_adjoint_of_im2col(backend, geom, seed):
    n, c, h, w, kh, kw, stride, padding = geom
    oh, ow = out_size(h, w, kh, kw, stride, padding)
    x = host_normal(seed, (n, c, h, w))
    y = host_normal(seed + 1, (n, c, kh, kw, oh, ow))
    cols = backend.to_numpy(backend.im2col(backend.asarray(x), kh, kw, stride, padding))
    back = backend.to_numpy(backend.col2im(backend.asarray(y), h, w, stride, padding))
    lhs, rhs = float(np.vdot(back, x)), float(np.vdot(y, cols))
    scale = float(np.vdot(np.abs(y), np.abs(cols))) + float(np.vdot(np.abs(back), np.abs(x)))
    assert abs(lhs - rhs) <= 1e-12 * max(scale, 1e-300)


def generic_numpy() -> Backend:
    """The NumPy namespace with only the array-API-only kernels of the base class."""
    return _generic.Backend("numpy", get_backend("numpy").xp, np.ndarray)


@relaxed
@given(geom=geometries(), seed=st.integers(0, 2**32 - 1))
def test_numpy_fast_path_equals_generic(geom, seed):
    # col2im has one implementation, the base class's, shared by every backend (checked against
    # the reference on each by test_col2im_matches_reference)
    n, c, h, w, kh, kw, stride, padding = geom
    x = host_normal(seed, (n, c, h, w))
    fast = get_backend("numpy").im2col(x, kh, kw, stride, padding)
    np.testing.assert_array_equal(fast, generic_numpy().im2col(x, kh, kw, stride, padding))
    assert type(get_backend("numpy")).col2im is Backend.col2im


# ----------------------------------------------------------------------------------------------
# conv2d kernels: every backend against a reference, and every NumPy fast path (patches in
# chunks or not, dense matrix, flipped-filter input gradient, col2im) against the generic ones
# ----------------------------------------------------------------------------------------------


def ref_conv(x, w, stride, padding):
    cols = ref_im2col(x, w.shape[2], w.shape[3], stride, padding)
    return np.einsum("ncijhw,fcij->nfhw", cols, w)


@st.composite
def conv_problems(draw):
    n, c, h, w, kh, kw, stride, padding = draw(geometries())
    f = draw(st.integers(1, 3))
    lead = draw(st.sampled_from([(), (2,), (2, 3)]))  # stacked cotangents for the weight grad
    return n, c, h, w, f, kh, kw, stride, padding, lead


def _conv_all(be, x, w, g, gs, geom):
    n, c, h, wd, f, kh, kw, stride, padding, lead = geom
    out, saved = be.conv(x, w, stride, padding)
    unsaved, nothing = be.conv(x, w, stride, padding, keep=False)
    assert nothing is None
    return [out, unsaved, be.conv_transpose(g, w, h, wd, stride, padding),
            be.conv_transpose(g, w, h, wd, stride, padding, saved),
            be.conv_weight_grad(x, g, kh, kw, stride, padding),
            be.conv_weight_grad(x, g, kh, kw, stride, padding, saved),
            be.conv_weight_grad(x, gs, kh, kw, stride, padding, saved)]


def _conv_inputs(seed, geom):
    n, c, h, wd, f, kh, kw, stride, padding, lead = geom
    oh, ow = out_size(h, wd, kh, kw, stride, padding)
    x, w = host_normal(seed, (n, c, h, wd)), host_normal(seed + 1, (f, c, kh, kw))
    g, gs = host_normal(seed + 2, (n, f, oh, ow)), host_normal(seed + 3, lead + (n, f, oh, ow))
    return x, w, g, gs


@relaxed
@given(geom=conv_problems(), seed=st.integers(0, 2**31))
def test_conv_kernels_match_reference(backend, geom, seed):
    x, w, g, gs = _conv_inputs(seed, geom)
    n, c, h, wd, f, kh, kw, stride, padding, lead = geom
    got = [backend.to_numpy(a) for a in _conv_all(backend, *map(backend.asarray, (x, w, g, gs)),
                                                   geom)]
    cols = ref_im2col(x, kh, kw, stride, padding)
    want = [*[ref_conv(x, w, stride, padding)] * 2,
            *[ref_col2im(np.einsum("nfhw,fcij->ncijhw", g, w), h, wd, stride, padding)] * 2,
            *[np.einsum("nfhw,ncijhw->fcij", g, cols)] * 2,
            np.einsum("...nfhw,ncijhw->...fcij", gs, cols)]
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["nchw", "channel_major"])
@pytest.mark.parametrize("chunk", [None, 7])  # 7: every image its own chunk
@pytest.mark.parametrize("dense", [True, False])
@relaxed
@given(geom=conv_problems(), seed=st.integers(0, 2**31))
def test_numpy_conv_paths_equal_generic(monkeypatch, layout, chunk, dense, geom, seed):
    x, w, g, gs = _conv_inputs(seed, geom)
    if layout == "channel_major":  # the memory layout conv2d's own outputs have
        x = np.ascontiguousarray(x.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)
        g = np.ascontiguousarray(g.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)
    with monkeypatch.context() as m:
        if chunk is not None:
            m.setattr(_numpy, "CHUNK", chunk)
        m.setattr(_numpy, "_dense_cheaper", lambda *args, **kw: dense)
        m.setattr(_numpy, "_wino", lambda *args: False)  # tests/test_winograd.py checks it
        fast = _conv_all(get_backend("numpy"), x, w, g, gs, geom)
    generic = generic_numpy()
    for a, b in zip(fast, _conv_all(generic, x, w, g, gs, geom), strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_numpy_conv_paths_are_taken(monkeypatch):
    """The branches the equality test above compares are really the ones that run."""
    be = get_backend("numpy")
    monkeypatch.setattr(_numpy, "_compiled", lambda *args: False)  # see the test below
    monkeypatch.setattr(_numpy, "_wino", lambda *args: False)  # see tests/test_winograd.py
    x, w = host_normal(0, (8, 2, 4, 4)), host_normal(1, (3, 2, 3, 3))
    out, saved = be.conv(x, w, (1, 1), (1, 1))
    assert "toeplitz" in saved  # small images: dense
    assert out.transpose(1, 0, 2, 3).flags.c_contiguous  # channel-major, like the patch paths
    strided = be.conv_transpose(host_normal(2, (8, 3, 8, 8)), w, 16, 16, (2, 2), (1, 1))
    assert strided.transpose(1, 0, 2, 3).flags.c_contiguous  # col2im into channel-major zeros
    assert "cols" in be.conv(host_normal(0, (8, 2, 16, 16)), w, (1, 1), (1, 1))[1]
    assert _numpy._dense_cheaper(1024, 16, 8, 8, 16, 3, 3, 8, 8)  # a stack of cotangents
    # ... unless the cheaper stride-1 kernel from column-shifted copies can do it
    assert not _numpy._dense_cheaper(1024, 16, 8, 8, 16, 3, 3, 8, 8, rows=(16, 16, 10, 8))
    assert _numpy._dense_cheaper(128, 64, 2, 2, 64, 3, 3, 2, 2, rows=(64, 64, 4, 2))
    assert not _numpy._dense_cheaper(128, 16, 8, 8, 16, 3, 3, 8, 8)
    monkeypatch.setattr(_numpy, "TOEPLITZ_MAX", 0)
    assert len(be.conv(x, w, (1, 1), (1, 1))[1]["cols"]) == 1
    monkeypatch.setattr(_numpy, "CHUNK", 7)
    assert len(be.conv(x, w, (1, 1), (1, 1))[1]["cols"]) == 8


@pytest.mark.skipif(not _fast_bn.available(), reason="numba not installed (the fast extra)")
@pytest.mark.parametrize("layout", ["nchw", "channel_major"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numpy_compiled_conv_paths(monkeypatch, layout, dtype):
    """With the compiled kernels on, a 3x3 stride-1 conv and its adjoints run them (unless the
    dense product is cheaper) and agree with the NumPy kernels; off, they never run."""
    geom = (3, 2, 6, 5, 4, 3, 3, (1, 1), (1, 1), (2,))
    x, w, g, gs = (a.astype(dtype) for a in _conv_inputs(11, geom))
    if layout == "channel_major":
        x, g = _numpy._channel_major(x), _numpy._channel_major(g)
    be = get_backend("numpy")
    calls = []
    for name in ("conv3x3", "conv3x3_transpose", "conv3x3_weight_grad"):
        real = getattr(_fast_conv, name)
        monkeypatch.setattr(_fast_conv, name,
                            lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    monkeypatch.setattr(_numpy, "_dense_cheaper", lambda *args, **kw: False)
    monkeypatch.setattr(_fast_conv, "IN_USE", True)  # MINIRESNET_FAST_CONV=1
    with _fast_bn.forced(False):
        plain = _conv_all(be, x, w, g, gs, geom)
        assert "cols" in be.conv(x, w, (1, 1), (1, 1))[1]  # the switch is read at each call
    assert not calls
    calls.clear()
    with _fast_bn.forced(True):
        compiled = _conv_all(be, x, w, g, gs, geom)
        assert "shifted" in be.conv(x, w, (1, 1), (1, 1))[1]
    assert set(calls) == {"conv3x3", "conv3x3_transpose", "conv3x3_weight_grad"}
    tol = 1e-5 if dtype == "float32" else 1e-12
    for a, b in zip(compiled, plain, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("geom", [
    (2, 3, 5, 12, 4, 3, 3, (1, 1), (1, 1), (2,)),  # stride 1, rows longer than 8: row copies
    (2, 3, 5, 7, 4, 3, 2, (1, 1), (2, 0), (2,)),  # stride 1, short rows: shifted-image copies
    (2, 3, 9, 10, 4, 3, 3, (2, 1), (1, 1), ()),  # strided
])
def test_numpy_patch_paths_equal_generic(monkeypatch, geom):
    x, w, g, gs = _conv_inputs(7, geom)
    monkeypatch.setattr(_numpy, "_dense_cheaper", lambda *args, **kw: False)
    generic = generic_numpy()
    for a, b in zip(_conv_all(get_backend("numpy"), x, w, g, gs, geom),
                    _conv_all(generic, x, w, g, gs, geom), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_malloc_tuning_opt_out(monkeypatch):
    from miniresnet.backends import _malloc

    monkeypatch.setattr(_malloc, "_state", {})
    monkeypatch.setenv("MINIRESNET_TUNE_MALLOC", "0")
    assert _malloc.tune() is False
    monkeypatch.setattr(_malloc, "_state", {})
    monkeypatch.delenv("MINIRESNET_TUNE_MALLOC")
    import platform

    assert _malloc.tune() is (platform.libc_ver()[0] == "glibc")


@pytest.mark.parametrize("dtype", ["float32", "float64", "int64", "bool"])
def test_im2col_preserves_dtype(backend, dtype):
    x = backend.asarray((np.arange(2 * 3 * 5 * 4).reshape(2, 3, 5, 4) % 3).astype(dtype))
    cols = backend.im2col(x, 3, 2, (2, 1), (1, 0))
    assert cols.dtype == backend.dtype(dtype)
    assert cols.shape == (2, 3, 3, 2, 3, 3)
    host = backend.to_numpy(x)
    np.testing.assert_array_equal(backend.to_numpy(cols), ref_im2col(host, 3, 2, (2, 1), (1, 0)))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_col2im_preserves_dtype(backend, dtype):
    y = backend.asarray(host_normal(0, (2, 3, 3, 2, 3, 3)), dtype=dtype)
    out = backend.col2im(y, 5, 4, (2, 1), (1, 0))
    assert out.dtype == backend.dtype(dtype)
    assert out.shape == (2, 3, 5, 4)


def test_im2col_returns_a_fresh_array(backend):
    host = host_normal(0, (1, 2, 4, 4))
    x = backend.asarray(host)
    cols = backend.im2col(x, 1, 1, (1, 1), (0, 0))  # the case where a view would be possible
    as_host = backend.to_numpy(cols, copy=False)
    assert not np.shares_memory(as_host, backend.to_numpy(x, copy=False))
    np.testing.assert_array_equal(backend.to_numpy(x), host)


def test_numpy_im2col_accepts_non_contiguous_input():
    x = host_normal(3, (3, 2, 6, 5)).transpose(1, 0, 2, 3)  # (2, 3, 6, 5), not C-contiguous
    np.testing.assert_array_equal(
        get_backend("numpy").im2col(x, 2, 3, (2, 1), (1, 2)), ref_im2col(x, 2, 3, (2, 1), (1, 2))
    )


def test_conv_geometry_errors(backend):
    x = backend.asarray(host_normal(0, (1, 1, 3, 3)))
    with pytest.raises(ValueError, match=r"im2col: a 5x5 kernel with stride \(1, 1\) and padding "
                                         r"\(0, 0\) does not fit input of spatial size \(3, 3\)"):
        backend.im2col(x, 5, 5, (1, 1), (0, 0))
    with pytest.raises(ValueError, match=re.escape(
            "im2col: stride must be an int >= 1 or a pair of them, got (0, 1)")):
        backend.im2col(x, 1, 1, (0, 1), (0, 0))
    with pytest.raises(ValueError, match=re.escape(
            "im2col: padding must be an int >= 0 or a pair of them, got (-1, 0)")):
        backend.im2col(x, 1, 1, (1, 1), (-1, 0))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        backend.im2col(backend.asarray(host_normal(0, (3, 3))), 1, 1, (1, 1), (0, 0))
    cols = backend.im2col(x, 2, 2, (1, 1), (0, 0))
    with pytest.raises(ValueError, match=r"col2im: a cotangent of spatial size \(2, 2\) does not "
                                         r"match an image of size \(4, 4\)"):
        backend.col2im(cols, 4, 4, (1, 1), (0, 0))


def test_conv_kernel_errors_name_their_op(backend):
    x, w = (backend.asarray(host_normal(i, s)) for i, s in enumerate([(1, 1, 3, 3), (1, 1, 4, 4)]))
    g = backend.asarray(host_normal(2, (1, 1, 2, 2)))
    with pytest.raises(ValueError, match="conv: a 4x4 kernel .* does not fit input of spatial "
                                         r"size \(3, 3\)"):
        backend.conv(x, w)
    with pytest.raises(ValueError, match=r"conv_transpose: a cotangent of spatial size \(2, 2\) "
                                         r"does not match an image of size \(4, 4\)"):
        backend.conv_transpose(g, w[:, :, :2, :2], 4, 4)
    with pytest.raises(ValueError, match=r"conv_weight_grad: a cotangent of spatial size "
                                         r"\(2, 2\) does not match an image of size \(3, 3\)"):
        backend.conv_weight_grad(x, g, 1, 1)


# ----------------------------------------------------------------------------------------------
# conv geometry: the one check every op and kernel uses
# ----------------------------------------------------------------------------------------------


def test_conv_output_size():
    assert conv_output_size(32, 3, 1, 1) == 32
    assert conv_output_size(32, 3, 2, 1) == 16
    assert conv_output_size(5, 2, 2, 0) == 2
    assert conv_output_size(2, 3, 1, 0) == 0  # unchecked: the kernel does not fit


def test_conv_geometry_returns_int_pairs():
    assert conv_geometry("op", (7, 6), (3, 2), 2, (1, 0)) == ((2, 2), (1, 0), (4, 3))
    assert conv_geometry("op", (7, 6), (3, 2), np.int64(2), [1, 0], (4, 3)) == \
        ((2, 2), (1, 0), (4, 3))
    stride, padding, size = conv_geometry("op", (7, 6), (3, 2), (np.int64(1), 1), 0)
    assert all(type(v) is int for v in stride + padding + size)
    with pytest.raises(ValueError, match=r"op: a 0x2 kernel"):
        conv_geometry("op", (7, 6), (0, 2), 1, 0)


@pytest.mark.parametrize(("stride", "error"), [
    (True, TypeError), (1.0, ValueError), ((1.0, 1), ValueError), ((True, 1), TypeError)])
def test_conv_geometry_remembers_only_what_it_checked(stride, error):
    """A checked geometry is remembered, but a bool or float equal to a remembered int (the
    same dict key) is still checked and rejected."""
    first = conv_geometry("op", (9, 9), (3, 3), 1, 1)
    assert conv_geometry("op", (9, 9), (3, 3), 1, 1) == first == ((1, 1), (1, 1), (9, 9))
    assert conv_geometry("op", (9, 9), (3, 3), (1, 1), 1) == first
    with pytest.raises(error, match=r"op: stride must be"):
        conv_geometry("op", (9, 9), (3, 3), stride, 1)
    with pytest.raises(ValueError, match=r"cotangent of spatial size \(8, 9\)"):
        conv_geometry("op", (9, 9), (3, 3), 1, 1, (8, 9))


@pytest.mark.parametrize(("value", "error"), [
    (0, ValueError), (-1, ValueError), (1.5, ValueError), (2.0, ValueError),
    ((1, 0), ValueError), ((1, 2, 3), ValueError), (np.float64(2.0), ValueError),
    ("2", TypeError), (True, TypeError), (None, TypeError), ((1, "1"), TypeError),
])
def test_int_pair_rejects(value, error):
    with pytest.raises(error, match=re.escape(
            f"op: stride must be an int >= 1 or a pair of them, got {value!r}")):
        int_pair("op", value, "stride")


def test_int_pair_accepts():
    assert int_pair("op", 3, "kernel_size") == (3, 3)
    assert int_pair("op", [2, np.int32(1)], "stride") == (2, 1)
    assert int_pair("op", 0, "padding") == (0, 0)
    with pytest.raises(ValueError, match=re.escape("op: padding must be an int >= 0")):
        int_pair("op", -1, "padding")


# ----------------------------------------------------------------------------------------------
# random numbers
# ----------------------------------------------------------------------------------------------


def draw_all(rng: Rng, dtype: str) -> list[np.ndarray]:
    be = rng.backend
    return [
        be.to_numpy(rng.normal((3, 4), dtype=dtype, mean=1.0, std=2.0)),
        be.to_numpy(rng.uniform((5,), dtype=dtype, low=-1.0, high=3.0)),
        be.to_numpy(rng.integers(0, 10, (2, 3))),
        be.to_numpy(rng.permutation(7)),
        be.to_numpy(rng.normal((), dtype=dtype)),
    ]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_rng_same_seed_same_numbers_on_every_backend(backend, dtype):
    reference = draw_all(get_backend("numpy").rng(1234), dtype)
    for draws in (draw_all(backend.rng(1234), dtype), draw_all(backend.rng(1234), dtype)):
        for got, want in zip(draws, reference, strict=True):
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)
    assert [a.dtype for a in reference[2:4]] == [np.int64, np.int64]
    assert reference[0].dtype == np.dtype(dtype)
    assert sorted(reference[3].tolist()) == list(range(7))


def test_rng_values_and_types(backend):
    rng = backend.rng(7)
    a, b = rng.normal((50,)), rng.normal((50,))
    assert isinstance(a, backend.array_type)
    assert a.dtype == backend.dtype("float64")
    assert not np.array_equal(backend.to_numpy(a), backend.to_numpy(b))  # the stream advances
    u = backend.to_numpy(backend.rng(7).uniform((1000,), low=2.0, high=3.0))
    assert u.min() >= 2.0 and u.max() < 3.0
    k = backend.to_numpy(backend.rng(7).integers(-2, 3, (1000,)))
    assert set(k.tolist()) == {-2, -1, 0, 1, 2}
    expected = np.random.Generator(np.random.PCG64(7)).normal(0.0, 1.0, size=(50,))
    np.testing.assert_array_equal(backend.to_numpy(a), expected)


def test_rng_float32_is_float64_rounded():
    be = get_backend("numpy")
    np.testing.assert_array_equal(
        be.rng(5).normal((20,), dtype="float32"),
        be.rng(5).normal((20,), dtype="float64").astype(np.float32),
    )


def test_rng_rejects_integer_float_dtype():
    with pytest.raises(ValueError, match="floating"):
        get_backend("numpy").rng(0).normal((2,), dtype="int64")


def test_rng_spawn_and_seed_attribute():
    be = get_backend("numpy")
    rng = be.rng(11)
    assert rng.seed == 11
    kids1 = [k.normal((4,)) for k in be.rng(11).spawn(3)]
    kids2 = [k.normal((4,)) for k in be.rng(11).spawn(3)]
    for a, b in zip(kids1, kids2, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(kids1[0], kids1[1])
    assert be.rng(None).normal((2,)).shape == (2,)


# ----------------------------------------------------------------------------------------------
# host transfer and dtypes
# ----------------------------------------------------------------------------------------------


def test_asarray_defaults_and_dtype_names(backend):
    assert backend.asarray(1.5).dtype == backend.dtype("float64")
    assert backend.asarray([1.0, 2.0]).dtype == backend.xp.float64
    assert backend.asarray([1, 2]).dtype == backend.xp.int64
    assert backend.asarray([True]).dtype == backend.xp.bool
    assert backend.asarray([1, 2], dtype="float32").dtype == backend.xp.float32
    assert backend.asarray([1, 2], dtype=backend.xp.float64).dtype == backend.xp.float64
    for name in ("float64", "float32", "int64", "bool"):
        assert backend.dtype(name) == getattr(backend.xp, name)
        assert backend.dtype(np.dtype(name)) == getattr(backend.xp, name)
        assert backend.dtype_name(backend.dtype(name)) == name
    with pytest.raises(ValueError, match="unknown dtype"):
        backend.dtype("float128x")


def test_to_numpy_is_a_host_copy(backend):
    host = host_normal(0, (2, 3))
    x = backend.asarray(host)
    out = backend.to_numpy(x)
    assert type(out) is np.ndarray
    np.testing.assert_array_equal(out, host)
    out[0, 0] = 123.0
    assert backend.to_numpy(x)[0, 0] == host[0, 0]
    assert backend.to_numpy(backend.asarray(2.5)).shape == ()


def test_asarray_copy_flag(backend):
    host = host_normal(0, (3,))
    x = backend.asarray(host, copy=True)
    host[0] = 99.0
    assert backend.to_numpy(x)[0] != 99.0


def test_cross_backend_asarray():
    np_be, strict_be = get_backend("numpy"), get_backend("array_api_strict")
    a = strict_be.asarray([[1.0, 2.0], [3.0, 4.0]])
    b = np_be.asarray(a)
    assert type(b) is np.ndarray
    np.testing.assert_array_equal(b, [[1.0, 2.0], [3.0, 4.0]])
    c = strict_be.asarray(b, dtype="float32")
    assert backend_of(c) is strict_be and c.dtype == strict_be.xp.float32


def test_strict_backends_differ_by_device_only():
    cpu, dev = get_backend("array_api_strict"), get_backend("array_api_strict_device1")
    assert cpu.array_type is dev.array_type and cpu.device != dev.device
    x = dev.asarray(np.arange(3.0))
    assert x.device == dev.device and backend_of(x) is dev and backend_of(dev.xp.sum(x)) is dev
    y = cpu.asarray(x)  # a move between devices
    assert y.device == cpu.device and backend_of(y) is cpu
    assert backend_of(dev.asarray(y)) is dev
    np.testing.assert_array_equal(get_backend("numpy").asarray(x), [0.0, 1.0, 2.0])
    with pytest.raises(RuntimeError, match="to a NumPy array"):
        np.asarray(x)  # only the backend's to_numpy leaves the device
    draw = dev.rng(3).normal(4)
    assert draw.device == dev.device
    np.testing.assert_array_equal(dev.to_numpy(draw), cpu.to_numpy(cpu.rng(3).normal(4)))
    xp = dev.xp
    with pytest.raises(TypeError, match=r"on device .*device2.* not an array of a known backend"):
        backend_of(xp.asarray(1.0, device=xp.Device("device2")))


def test_backend_of_loads_the_backend_of_a_device(monkeypatch):
    import array_api_strict as xp

    for registry in ("_BACKENDS", "_BY_TYPE", "_BY_DEVICE"):
        monkeypatch.setattr(backends._registry, registry, {})
    assert backend_of(xp.asarray(1.0, device=xp.Device("device1"))).name == \
        "array_api_strict_device1"
    assert backend_of(xp.asarray(1.0)).name == "array_api_strict"


def test_synchronize_is_callable(backend):
    assert backend.synchronize() is None


# ----------------------------------------------------------------------------------------------
# registry and errors
# ----------------------------------------------------------------------------------------------


def test_get_backend_is_cached_and_typed(backend):
    assert get_backend(backend.name) is backend
    assert backend.name in BACKEND_NAMES
    assert isinstance(backend.asarray([1.0]), backend.array_type)
    assert backend.name in available_backends()
    assert is_available(backend.name) == (True, "")


def test_backend_of(backend):
    x = backend.asarray([1.0, 2.0])
    assert backend_of(x) is backend
    assert backend_of(backend.xp.sum(x)) is backend  # a full reduction (NumPy: a scalar)
    assert backend_of(backend.im2col(backend.asarray(np.ones((1, 1, 2, 2))), 1, 1)) is backend


def test_backend_of_numpy_scalars_and_subclasses():
    np_be = get_backend("numpy")
    assert backend_of(np.float64(1.0)) is np_be
    assert backend_of(np.int64(3)) is np_be
    assert backend_of(np.bool_(True)) is np_be

    class Sub(np.ndarray):
        pass

    assert backend_of(np.zeros(2).view(Sub)) is np_be


def test_library_scalars_are_the_numpy_backends_quirk(backend):
    """0-d results: NumPy's are scalars, which ``as_array`` makes arrays; no other library has
    scalars, and ``as_array`` and ``python_scalar`` do nothing there."""
    total = backend.xp.sum(backend.asarray([1.0, 2.0]))
    array = backend.as_array(total)
    assert type(array) is backend.array_type and array.shape == ()
    assert backend.to_numpy(array) == 3.0
    assert backend.python_scalar(array) is None
    assert backend.is_host is (backend.name == "numpy")
    assert (backend.scalar_type is None) is (backend.name != "numpy")
    x = backend.asarray([1.0])
    assert backend.as_array(x) is x


def test_numpy_scalars_stand_for_python_scalars():
    np_be = get_backend("numpy")
    assert type(np_be.as_array(np.float32(1.5))) is np.ndarray
    assert np_be.as_array(np.float32(1.5)).dtype == np.float32
    for scalar, value in [(np.float64(2.5), 2.5), (np.int64(3), 3), (np.bool_(True), True)]:
        assert type(python_scalar(scalar)) is type(value) and python_scalar(scalar) == value
        assert python_scalar(value) is value
    for not_scalar in (np.zeros(()), np.zeros(2), [1.0], "x", None,
                       get_backend("array_api_strict").asarray(1.0)):
        assert python_scalar(not_scalar) is None
    assert PYTHON_SCALARS == (bool, int, float)


@pytest.mark.parametrize("obj", [1.0, 3, True, [1.0, 2.0], "x", None])
def test_backend_of_rejects_non_arrays(obj):
    with pytest.raises(TypeError, match=type(obj).__qualname__) as info:
        backend_of(obj)
    assert "numpy" in str(info.value) and "array_api_strict" in str(info.value)


def test_unknown_backend_lists_valid_names():
    with pytest.raises(BackendUnavailable) as info:
        get_backend("jax")
    for name in BACKEND_NAMES:
        assert name in str(info.value)
    ok, why = is_available("jax")
    assert not ok and "numpy" in why
    assert issubclass(BackendUnavailable, RuntimeError)


def test_numpy_always_available():
    assert available_backends()[0] == "numpy"
    assert set(available_backends()) <= set(BACKEND_NAMES)


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is importable here")
def test_cupy_unavailable_message_says_how_to_fix():
    ok, why = is_available("cupy")
    assert not ok and 'pip install -e ".[cuda]"' in why
    assert "cupy" not in available_backends()
    with pytest.raises(BackendUnavailable, match=r'pip install -e "\.\[cuda\]"'):
        get_backend("cupy")


def test_strict_unavailable_message_mentions_install(monkeypatch):
    from miniresnet.backends import _strict

    monkeypatch.setattr(_strict, "_strict", None)
    monkeypatch.setattr(_strict, "_IMPORT_ERROR", ImportError("No module named 'x'"))
    ok, why = _strict.check_available()
    assert not ok and "pip install array-api-strict" in why
    with pytest.raises(BackendUnavailable, match="pip install array-api-strict"):
        _strict.make_backend()


def test_backends_package_imports_nothing_else_from_miniresnet():
    allowed = {"numpy", "array_api_compat", "array_api_extra", "array_api_strict", "cupy",
               "numba"}  # numba: the optional compiled kernels (the fast extra)
    allowed |= sys.stdlib_module_names
    folder = pathlib.Path(backends.__file__).parent
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [alias.name.partition(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    continue  # sibling module inside backends/
                assert node.level == 0, f"{path.name}: relative import outside backends/"
                roots = [(node.module or "").partition(".")[0]]
            else:
                continue
            for root in roots:
                assert root in allowed, f"{path.name} imports {root}"


def test_backend_modules_extend_only_the_base_class():
    """One way to extend a backend: a module subclasses Backend and overrides methods; no backend
    module imports another one, and the base class takes no kernels in its constructor."""
    folder = pathlib.Path(backends.__file__).parent
    shared = {"_generic", "_geometry", "_registry", "_malloc", "_jit", "_fast_bn", "_fast_conv",
              "_winograd"}
    for path in sorted(folder.glob("_*.py")):
        if path.stem in shared:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module] if node.module else [a.name for a in node.names]
                assert set(names) <= shared, f"{path.name} imports {names}"
    assert "col2im" not in _numpy.NumpyBackend.__dict__  # the base class's, shared
    with pytest.raises(TypeError):
        _generic.Backend("numpy", get_backend("numpy").xp, np.ndarray, im2col_impl=None)


class _FakeRuntime:
    def __init__(self, count):
        self.count = count

    def getDeviceCount(self):  # noqa: N802 - CuPy's name
        if isinstance(self.count, Exception):
            raise self.count
        return self.count


def _fake_cupy(count):
    """NumPy dressed up as CuPy: enough to exercise the CuPy backend's glue without a GPU."""
    synced = []

    class Device:
        def synchronize(self):
            synced.append(True)

    cuda = type("cuda", (), {"runtime": _FakeRuntime(count), "Device": Device})
    fake = type("cupy", (), {"cuda": cuda, "ndarray": np.ndarray})
    return fake, synced


@pytest.mark.parametrize(
    ("count", "expect"),
    [(RuntimeError("no CUDA driver"), "no CUDA driver"), (0, "found no CUDA device")],
)
def test_cupy_probe_without_device(monkeypatch, count, expect):
    from miniresnet.backends import _cupy

    fake, _ = _fake_cupy(count)
    monkeypatch.setattr(_cupy, "_cupy", fake)
    monkeypatch.setattr(_cupy, "_status", None)
    ok, why = _cupy.check_available()
    assert not ok and expect in why
    with pytest.raises(BackendUnavailable, match=expect):
        _cupy.make_backend()


def test_cupy_backend_glue_with_numpy_standing_in():
    from miniresnet.backends import _cupy

    fake, synced = _fake_cupy(1)
    be = _cupy.CupyBackend(fake, get_backend("numpy").xp)
    x = host_normal(0, (2, 3, 5, 4))
    np.testing.assert_array_equal(
        be.im2col(x, 3, 2, (2, 1), (1, 1)), ref_im2col(x, 3, 2, (2, 1), (1, 1))
    )
    y = host_normal(1, (2, 3, 3, 2, 3, 5))
    np.testing.assert_allclose(
        be.col2im(y, 5, 4, (2, 1), (1, 1)), ref_col2im(y, 5, 4, (2, 1), (1, 1)), rtol=1e-13
    )
    # the generic conv kernels, as CuPy runs them (through its im2col / col2im)
    geom = (2, 3, 5, 4, 2, 3, 2, (2, 1), (1, 1), (2,))
    x, w, g, gs = _conv_inputs(3, geom)
    generic = generic_numpy()
    for a, b in zip(_conv_all(be, x, w, g, gs, geom), _conv_all(generic, x, w, g, gs, geom),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)
    be.synchronize()
    assert synced == [True]
