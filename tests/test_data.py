"""miniresnet.data: the shipped digits, stratified splits, grid_1d, load_npz checks, batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import miniresnet as mr
from miniresnet.backends import backend_of
from miniresnet.data import (
    Dataset,
    _digits_arrays,
    batches,
    grid_1d,
    load_digits,
    load_npz,
    stratified_split,
)


def host(x):
    return mr.to_numpy(x)


# -- digits -----------------------------------------------------------------------------------


def test_shipped_file_is_pickle_free_and_as_documented():
    images, labels = _digits_arrays()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    assert labels.shape == (1797,) and labels.dtype == np.int64
    assert images.min() == 0 and images.max() == 16
    assert np.array_equal(np.bincount(labels), [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_digits_shapes_dtypes_and_backend(backend, dtype):
    ds = load_digits(dtype=dtype)
    assert isinstance(ds, Dataset)
    assert ds.name == "digits" and ds.num_classes == 10
    assert ds.x_train.shape == (ds.n_train, 1, 8, 8) and ds.x_test.shape == (ds.n_test, 1, 8, 8)
    assert ds.y_train.shape == (ds.n_train,) and ds.y_test.shape == (ds.n_test,)
    assert ds.n_train + ds.n_test == 1797
    for x in (ds.x_train, ds.x_test):
        assert backend_of(x) is backend and backend.dtype_name(x.dtype) == dtype
    for y in (ds.y_train, ds.y_test):
        assert backend_of(y) is backend and backend.dtype_name(y.dtype) == "int64"
    assert ds.backend is backend
    text = repr(ds)
    assert f"x ({ds.n_train}, 1, 8, 8) {dtype}" in text and f"y ({ds.n_test},) int64" in text
    assert f"backend={backend.name!r}" in text


def test_digits_split_is_stratified_disjoint_and_matches_the_dataset(backend):
    images, labels = _digits_arrays()
    train_idx, test_idx = stratified_split(labels, 0.2, seed=0)
    assert train_idx.dtype == test_idx.dtype == np.int64
    assert np.intersect1d(train_idx, test_idx).size == 0
    assert np.array_equal(np.sort(np.concatenate([train_idx, test_idx])), np.arange(1797))
    for c, m in enumerate(np.bincount(labels)):
        assert np.sum(labels[test_idx] == c) == math.floor(0.2 * m + 0.5)

    ds = load_digits(test_fraction=0.2, seed=0)
    assert np.array_equal(host(ds.y_train), labels[train_idx])
    assert np.array_equal(host(ds.y_test), labels[test_idx])
    expect = (images[test_idx, None].astype(np.float64) - ds.mean) / ds.std
    np.testing.assert_array_equal(host(ds.x_test), expect.astype(np.float32))


def test_digits_split_is_deterministic_and_seeded(backend):
    a, b, c = load_digits(seed=0), load_digits(seed=0), load_digits(seed=1)
    assert np.array_equal(host(a.y_test), host(b.y_test))
    np.testing.assert_array_equal(host(a.x_train), host(b.x_train))
    assert not np.array_equal(host(a.x_test), host(c.x_test))
    _, labels = _digits_arrays()
    split0, split1 = stratified_split(labels, 0.2, 0), stratified_split(labels, 0.2, 1)
    assert np.array_equal(split0[1], stratified_split(labels, 0.2, 0)[1])
    assert not np.array_equal(split0[1], split1[1])
    # the same numbers on every backend: compare with the NumPy backend
    ref = load_digits(seed=0, backend="numpy")
    np.testing.assert_array_equal(host(a.x_train), ref.x_train)
    np.testing.assert_array_equal(host(a.y_test), ref.y_test)


def test_digits_train_normalisation(backend):
    ds = load_digits(dtype="float64")
    x = host(ds.x_train)
    assert abs(x.mean()) < 1e-12 and abs(x.std() - 1.0) < 1e-12
    images, labels = _digits_arrays()
    train_idx, _ = stratified_split(labels, 0.2, 0)
    assert ds.mean == pytest.approx(images[train_idx].mean(), rel=1e-12)
    assert ds.std == pytest.approx(images[train_idx].std(), rel=1e-12)
    assert abs(host(ds.x_test).mean()) > 1e-6  # test statistics are not used


def test_digits_fractions_nest_and_zero_fraction_gives_empty_test(backend):
    _, labels = _digits_arrays()
    small, large = stratified_split(labels, 0.1, 3)[1], stratified_split(labels, 0.3, 3)[1]
    assert np.isin(small, large).all()
    ds = load_digits(test_fraction=0.0)
    assert ds.n_train == 1797 and ds.x_test.shape == (0, 1, 8, 8)


@pytest.mark.parametrize("kwargs, match", [
    ({"dtype": "int32"}, "dtype must be 'float32' or 'float64', got 'int32'"),
    ({"test_fraction": 1.0}, r"0 <= test_fraction < 1, got 1.0"),
    ({"test_fraction": -0.1}, r"0 <= test_fraction < 1, got -0.1"),
    ({"seed": -1}, "seed must be an integer >= 0, got -1"),
])
def test_digits_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_digits(**kwargs)
    with pytest.raises(mr.BackendUnavailable, match="unknown backend 'nope'; valid names"):
        load_digits(backend="nope")


@given(labels=st.lists(st.integers(0, 4), min_size=1, max_size=60),
       fraction=st.floats(0.0, 0.95), seed=st.integers(0, 2**32))
def test_stratified_split_properties(labels, fraction, seed):
    y = np.array(labels, dtype=np.int64)
    train, test = stratified_split(y, fraction, seed)
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(y.size))
    for c in np.unique(y):
        m = int(np.sum(y == c))
        assert np.sum(y[test] == c) == min(math.floor(fraction * m + 0.5), m - 1)
        assert np.sum(y[train] == c) >= 1


def test_stratified_split_rejects_bad_labels():
    with pytest.raises(ValueError, match=r"labels must be a 1-D integer array, got shape \(2, 2\)"):
        stratified_split(np.zeros((2, 2), dtype=np.int64), 0.5)
    with pytest.raises(ValueError, match="1-D integer array, got shape .* and dtype float64"):
        stratified_split(np.zeros(3), 0.5)


# -- grid_1d -----------------------------------------------------------------------------------


def test_grid_1d(backend):
    g = grid_1d()
    assert backend_of(g) is backend and g.shape == (256, 1)
    assert backend.dtype_name(g.dtype) == "float64"
    h = host(g)[:, 0]
    assert h[0] == -2.0 and h[-1] == 2.0
    np.testing.assert_allclose(np.diff(h), 4.0 / 255, rtol=1e-12)
    g32 = host(grid_1d(5, -1.0, 1.0, dtype="float32"))
    assert g32.dtype == np.float32 and np.array_equal(g32[:, 0], [-1.0, -0.5, 0.0, 0.5, 1.0])


@pytest.mark.parametrize("kwargs, match", [
    ({"n": 1}, "n must be an integer >= 2, got 1"),
    ({"low": 1.0, "high": 1.0}, "need finite low < high, got low=1.0, high=1.0"),
    ({"high": math.inf}, "need finite low < high"),
    ({"dtype": "float16"}, "dtype must be 'float32' or 'float64'"),
])
def test_grid_1d_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        grid_1d(**kwargs)


# -- load_npz ----------------------------------------------------------------------------------


def write(tmp_path, name="data.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def images(n=20, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 2, 3, 3))


def test_load_npz_images_with_stratified_split(backend, tmp_path):
    x, y = images(40), np.repeat(np.arange(4), 10)
    ds = load_npz(write(tmp_path, "mine.npz", x=x, y=y), test_fraction=0.25, seed=2)
    assert ds.name == "mine" and ds.num_classes == 4
    assert ds.x_train.shape == (28, 2, 3, 3) and ds.x_test.shape == (12, 2, 3, 3)
    assert backend_of(ds.x_train) is backend and backend.dtype_name(ds.x_train.dtype) == "float32"
    assert np.array_equal(np.bincount(host(ds.y_test)), [3, 3, 3, 3])
    train_idx, _ = stratified_split(y, 0.25, 2)
    assert ds.mean == pytest.approx(x[train_idx].mean()) and ds.std == pytest.approx(
        x[train_idx].std())
    assert abs(host(ds.x_train).mean()) < 1e-6


def test_load_npz_vectors_own_test_set_float_labels_and_options(backend, tmp_path):
    x, xt = np.arange(12.0).reshape(6, 2), np.arange(4.0).reshape(2, 2)
    path = write(tmp_path, x=x, y=np.array([0.0, 1, 2, 0, 1, 2]), x_test=xt, y_test=[1, 5])
    ds = load_npz(path, dtype="float64", normalize=False)
    assert ds.num_classes == 6 and ds.mean == 0.0 and ds.std == 1.0
    assert backend.dtype_name(ds.y_train.dtype) == "int64"
    np.testing.assert_array_equal(host(ds.x_train), x)
    np.testing.assert_array_equal(host(ds.y_test), [1, 5])
    assert load_npz(path, num_classes=9).num_classes == 9
    no_split = load_npz(write(tmp_path, "b.npz", x=x, y=[0, 1, 0, 1, 0, 1]))
    assert no_split.n_train == 6 and no_split.x_test.shape == (0, 2)


def test_load_npz_ints_and_uint8_images(tmp_path):
    x = np.arange(2 * 1 * 2 * 2, dtype=np.uint8).reshape(2, 1, 2, 2)
    ds = load_npz(write(tmp_path, x=x, y=np.array([0, 1], dtype=np.uint8)))
    assert ds.x_train.shape == (2, 1, 2, 2) and ds.num_classes == 2


x4, y4 = images(4), np.array([0, 1, 0, 1])
obj = np.empty(4, dtype=object)
obj[:] = [0, 1, 0, 1]
nan_x, inf_x = images(4), images(4)
nan_x[2, 1, 0, 0], inf_x[0, 0, 0, 0] = np.nan, -np.inf

NPZ_ERRORS = {
    "wrong keys": ({"X": x4, "Y": y4}, {}, r"missing keys \['x', 'y'\] and unexpected keys "
                   r"\['X', 'Y'\]; found keys \['X', 'Y'\]; expected an .npz archive with arrays "
                   r"'x' and 'y'"),
    "missing y": ({"x": x4}, {}, r"missing keys \['y'\]; found keys \['x'\]"),
    "extra key": ({"x": x4, "y": y4, "x_tst": x4}, {}, r"unexpected keys \['x_tst'\]"),
    "half a test set": ({"x": x4, "y": y4, "x_test": x4}, {}, "has 'x_test' but no 'y_test'"),
    "rank 3": ({"x": x4[:, 0], "y": y4}, {}, r"'x' must have shape \(N, C, H, W\) or \(N, D\), "
               r"got \(4, 3, 3\) \(rank 3\); for \(N, H, W\) images add a channel axis"),
    "rank 1": ({"x": y4.astype(float), "y": y4}, {}, r"got \(4,\) \(rank 1\)$"),
    "complex x": ({"x": x4 * 1j, "y": y4}, {}, "'x' must hold real numbers, got dtype complex"),
    "y 2-D": ({"x": x4, "y": y4[:, None]}, {}, r"'y' must be 1-D .*got shape \(4, 1\)"),
    "length": ({"x": x4, "y": y4[:3]}, {}, "'y' has 3 labels but 'x' has 4 examples"),
    "fractional": ({"x": x4, "y": [0.0, 1.5, 0, 1]}, {}, r"y\[1\] = .*1.5 is not an integer"),
    "nan label": ({"x": x4, "y": [0.0, np.nan, 0, 1]}, {}, r"y\[1\] = .*nan is not an integer"),
    "bool labels": ({"x": x4, "y": y4.astype(bool)}, {}, "integer class labels, got dtype bool"),
    "str labels": ({"x": x4, "y": np.array(list("abab"))}, {}, "got dtype <U1"),
    "object labels": ({"x": x4, "y": obj}, {}, "cannot read array 'y'.*pickle"),
    "negative": ({"x": x4, "y": [0, -3, 0, 1]}, {}, r"negative label y\[1\] = .*-3"),
    "too large": ({"x": x4, "y": [0, 1, 0, 7]}, {"num_classes": 3},
                  r"'.*data.npz': label y\[3\] = 7 is out of range for num_classes=3; labels "
                  r"must be 0 .. 2"),
    "nan": ({"x": nan_x, "y": y4}, {}, r"'x' has 1 non-finite value\(s\) \(NaN or inf\), first "
            r"at index \(2, 1, 0, 0\): .*nan"),
    "inf": ({"x": inf_x, "y": y4}, {}, r"non-finite value.*index \(0, 0, 0, 0\): .*-inf"),
    "empty": ({"x": np.zeros((0, 3)), "y": np.zeros(0, dtype=int)}, {},
              r"'x' is empty \(shape \(0, 3\)\)"),
    "zero features": ({"x": np.zeros((4, 0)), "y": y4}, {}, r"'x' is empty \(shape \(4, 0\)\)"),
    "test shape": ({"x": x4, "y": y4, "x_test": x4[:, :1], "y_test": y4}, {},
                   r"'x_test' examples have shape \(1, 3, 3\) but 'x' examples have \(2, 3, 3\)"),
    "test labels": ({"x": x4, "y": y4, "x_test": x4, "y_test": [0, 1]}, {},
                    "'y_test' has 2 labels but 'x_test' has 4 examples"),
    "split and test set": ({"x": x4, "y": y4, "x_test": x4, "y_test": y4},
                           {"test_fraction": 0.5}, "already holds a test set"),
    "constant x": ({"x": np.ones((4, 2)), "y": y4}, {},
                   "standard deviation is 0 .*normalize=False"),
    "num_classes": ({"x": x4, "y": y4}, {"num_classes": 0}, "num_classes must be an integer >= 1"),
    "dtype": ({"x": x4, "y": y4}, {"dtype": "int64"}, "dtype must be 'float32' or 'float64'"),
}


@pytest.mark.parametrize("case", list(NPZ_ERRORS))
def test_load_npz_errors(tmp_path, case):
    arrays, kwargs, match = NPZ_ERRORS[case]
    path = write(tmp_path, **arrays)
    with pytest.raises(ValueError, match=match):
        load_npz(path, **kwargs)


def test_load_npz_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no such file: '.*nothere.npz'"):
        load_npz(tmp_path / "nothere.npz")
    with pytest.raises(ValueError, match="is not a file"):
        load_npz(tmp_path)
    text = tmp_path / "notes.npz"
    text.write_text("hello")
    with pytest.raises(ValueError, match="cannot read .*notes.npz.*expected an .npz archive"):
        load_npz(text)
    np.save(tmp_path / "one.npy", x4)
    with pytest.raises(ValueError, match="holds a single array, not an archive"):
        load_npz(tmp_path / "one.npy")


# -- batches -----------------------------------------------------------------------------------


def epoch(n, batch_size, seed=None, **kwargs):
    return [host(idx) for idx in batches(n, batch_size, seed, **kwargs)]


@given(n=st.integers(0, 70), batch_size=st.integers(1, 20), seed=st.integers(0, 2**32))
def test_batches_cover_every_index_once(n, batch_size, seed):
    parts = epoch(n, batch_size, seed)
    assert all(p.dtype == np.int64 for p in parts)
    assert [p.size for p in parts[:-1]] == [batch_size] * (len(parts) - 1)
    order = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    assert np.array_equal(np.sort(order), np.arange(n))
    dropped = epoch(n, batch_size, seed, drop_last=True)
    assert len(dropped) == n // batch_size and all(p.size == batch_size for p in dropped)
    assert np.array_equal(np.concatenate(dropped or [order[:0]]), order[: n - n % batch_size])


def test_batches_reproducible(backend):
    a, b = epoch(50, 8, 7), epoch(50, 8, 7)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not np.array_equal(np.concatenate(a), np.concatenate(epoch(50, 8, 8)))
    assert all(backend_of(i) is backend for i in batches(10, 3, 0))
    # a generator advances: a new order each epoch, the same sequence of epochs for its seed
    r1, r2 = backend.rng(5), backend.rng(5)
    e1, e2 = np.concatenate(epoch(30, 7, r1)), np.concatenate(epoch(30, 7, r1))
    assert not np.array_equal(e1, e2)
    assert np.array_equal(np.concatenate(epoch(30, 7, r2)), e1)
    assert np.array_equal(np.concatenate(epoch(30, 7, r2)), e2)
    g = np.random.default_rng(1)
    assert np.array_equal(np.concatenate(epoch(9, 4, g)),
                          np.random.default_rng(1).permutation(9))


def test_batches_in_order_and_selecting(backend):
    assert [p.tolist() for p in epoch(7, 3, shuffle=False)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert epoch(2, 3, shuffle=False, drop_last=True) == []
    x = backend.asarray(np.arange(10.0), "float64")
    picked = [host(backend.xp.take(x, idx, axis=0)) for idx in batches(10, 4, 3)]
    assert sorted(np.concatenate(picked).tolist()) == list(range(10))


@pytest.mark.parametrize("args, kwargs, match", [
    ((10, 4), {}, "shuffle=True needs a seed .* got None"),
    ((10, 4, True), {}, "shuffle=True needs a seed .* got True"),
    ((10, 0, 0), {}, "batch_size must be an integer >= 1, got 0"),
    ((-1, 4, 0), {}, "n must be an integer >= 0, got -1"),
    ((2.5, 4, 0), {}, "n must be an integer >= 0, got 2.5"),
])
def test_batches_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        batches(*args, **kwargs)
