"""load_npz with hostile or extreme files: labels that wrap, inputs that overflow, lying headers."""

from __future__ import annotations

import io
import tracemalloc
import zipfile

import numpy as np
import pytest

import miniresnet as mr
from miniresnet.data import load_npz


def host(x):
    return mr.to_numpy(x)


def images(n=4, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 2, 3, 3))


def npy(array=None, *, shape=None, descr="<f8", data=b"", version=None):
    """The bytes of a .npy file: ``array`` saved, or a bare header declaring ``shape``."""
    buf = io.BytesIO()
    if array is not None:
        np.lib.format.write_array(buf, np.asarray(array), version=version, allow_pickle=False)
        return buf.getvalue()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + data


def archive(tmp_path, name="data.npz", **members):
    """An .npz file holding ``members`` (name -> .npy bytes) as ``name.npy``."""
    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as zf:
        for key, raw in members.items():
            zf.writestr(key + ".npy", raw)
    return path


def write(tmp_path, name="data.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


# -- labels that do not fit in int64 -----------------------------------------------------------


@pytest.mark.parametrize("y, match", [
    (np.array([0, 1, 2**63 + 5, 0], dtype=np.uint64), r"y\[2\] = 9223372036854775813"),
    (np.array([0, 1, 2**64 - 1, 0], dtype=np.uint64), r"y\[2\] = 18446744073709551615"),
    (np.array([0.0, 1.0, 1e20, 0.0]), r"y\[2\] = 1e\+20"),
    (np.array([0.0, 1.0, 2.0**63, 0.0]), r"y\[2\] = 9.223372036854776e\+18"),
])
def test_labels_beyond_int64_are_rejected(tmp_path, y, match):
    path = write(tmp_path, x=images(), y=y)
    with pytest.raises(ValueError, match=rf"load_npz: '.*data.npz': 'y' has a label {match} that "
                                         r"does not fit in int64; labels must be 0 \.\. "):
        load_npz(path)
    test_path = write(tmp_path, "t.npz", x=images(), y=[0, 1, 0, 1], x_test=images(), y_test=y)
    with pytest.raises(ValueError, match=rf"'.*t.npz': 'y_test' has a label y_test{match[1:]}"):
        load_npz(test_path)


def test_the_largest_labels_that_fit_load_exactly(backend, tmp_path):
    top = 2**63 - 1024  # the largest float64 below 2**63
    for y in (np.array([0, top, 1, 0], dtype=np.uint64), np.array([0.0, top, 1.0, 0.0])):
        ds = load_npz(write(tmp_path, x=images(), y=y))
        assert host(ds.y_train).tolist() == [0, top, 1, 0] and ds.num_classes == top + 1


# -- inputs that overflow the dtype asked for, or the statistics ---------------------------------


def test_inputs_beyond_float32_are_rejected_not_made_inf(backend, tmp_path):
    x = images()
    x[1, 0, 2, 1] = -1e39
    path = write(tmp_path, x=x, y=[0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"load_npz: '.*data.npz': 'x' has a value -1e\+39 beyond "
                                         r"the range of float32 \(largest 3.4028235e\+38\)"):
        load_npz(path, normalize=False)
    wide = load_npz(path, normalize=False, dtype="float64")
    np.testing.assert_array_equal(host(wide.x_train), x)
    normalised = host(load_npz(path).x_train)  # normalised, every input fits in float32
    assert np.isfinite(normalised).all() and normalised[1, 0, 2, 1] < -1.5


def test_test_inputs_that_overflow_after_normalisation_are_rejected(backend, tmp_path):
    x_test = images()
    x_test[3, 1, 1, 1] = 1e300
    path = write(tmp_path, x=images(seed=1), y=[0, 1, 0, 1], x_test=x_test, y_test=[0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"'x_test' has a value 1e\+300 that becomes .*e\+300 "
                                         r"when normalised with the training mean .* beyond the "
                                         r"range of float32"):
        load_npz(path)
    assert host(load_npz(path, dtype="float64").x_test)[3, 1, 1, 1] > 1e299


@pytest.mark.parametrize("scale", [1e300, np.finfo(np.float64).max])
def test_statistics_of_huge_inputs_do_not_overflow(backend, tmp_path, scale):
    x = np.sign(images()) * scale  # every |x| = scale: sums and squares overflow float64
    ds = load_npz(write(tmp_path, x=x, y=[0, 1, 0, 1]), dtype="float64")
    unit = np.sign(images())
    assert ds.mean == pytest.approx(unit.mean() * scale, rel=1e-12)
    assert ds.std == pytest.approx(unit.std() * scale, rel=1e-12) and np.isfinite(ds.std)
    np.testing.assert_allclose(host(ds.x_train), (unit - unit.mean()) / unit.std(), rtol=1e-12)


@pytest.mark.skipif(np.finfo(np.longdouble).max <= np.finfo(np.float64).max,
                    reason="longdouble is float64 here")
def test_longdouble_inputs_beyond_float64_are_rejected(tmp_path):
    x = images().astype(np.longdouble)
    x[0, 0, 0, 0] = np.longdouble("1e400")
    path = write(tmp_path, x=x, y=[0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"'x' has a value .*1e\+400.* beyond the range of "
                                         r"float64"):
        load_npz(path, dtype="float64")


# -- headers that declare more than the file holds -------------------------------------------


def test_a_huge_declared_shape_is_rejected_before_anything_is_read(tmp_path):
    path = archive(tmp_path, "big.npz", x=npy(shape=(10**6, 10**6), data=bytes(16)),
                   y=npy([0, 1]))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"load_npz: array 'x' of '.*big.npz' declares shape "
                                             r"\(1000000, 1000000\) of float64, 8000000000000 "
                                             r"bytes, more than the 4294967296 bytes one array "
                                             r"may have \(miniresnet.data.MAX_MEMBER_BYTES\)"):
            load_npz(path)
        assert tracemalloc.get_traced_memory()[1] < 2**20
    finally:
        tracemalloc.stop()


def test_a_shape_larger_than_the_stored_data_is_rejected(tmp_path):
    path = archive(tmp_path, x=npy(shape=(1000, 1000), data=bytes(16)), y=npy([0, 1]))
    with pytest.raises(ValueError, match=r"array 'x' of '.*data.npz' declares shape \(1000, "
                                         r"1000\) of float64, 8000000 bytes, but the archive "
                                         r"member holds only 16 bytes of data"):
        load_npz(path)
    path = archive(tmp_path, "short.npz", x=npy(images()), y=npy(shape=(4,), descr="<i8",
                                                                  data=bytes(24)))
    with pytest.raises(ValueError, match=r"array 'y' .* declares shape \(4,\) of int64, 32 bytes, "
                                         r"but the archive member holds only 24 bytes"):
        load_npz(path)


def test_a_negative_declared_length_is_rejected(tmp_path):
    path = archive(tmp_path, x=npy(shape=(-1, 3)), y=npy([0, 1]))
    with pytest.raises(ValueError, match=r"array 'x' of '.*data.npz' declares shape \(-1, 3\) of "
                                         r"float64: a negative length"):
        load_npz(path)


def test_a_member_that_is_not_npy_is_rejected(tmp_path):
    path = tmp_path / "raw.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x.npy", npy(images()))
        zf.writestr("y", b"labels: 0, 1, 0, 1")
    with pytest.raises(ValueError, match=r"cannot read the header of array 'y' of '.*raw.npz' "
                                         r"\(the magic string is not correct"):
        load_npz(path)


def test_the_cap_applies_to_honest_files_too(tmp_path, monkeypatch):
    path = write(tmp_path, x=images(), y=[0, 1, 0, 1])
    monkeypatch.setattr("miniresnet.data.MAX_MEMBER_BYTES", 500)
    with pytest.raises(ValueError, match=r"array 'x' .* declares shape \(4, 2, 3, 3\) of float64, "
                                         r"576 bytes, more than the 500 bytes"):
        load_npz(path)
    monkeypatch.setattr("miniresnet.data.MAX_MEMBER_BYTES", 576)
    assert load_npz(path).n_train == 4


def test_every_npy_version_and_compression_still_loads(backend, tmp_path):
    x = images()
    for version in ((1, 0), (2, 0), (3, 0)):
        path = archive(tmp_path, f"v{version[0]}.npz", x=npy(x, version=version),
                       y=npy(np.array([0, 1, 0, 1]), version=version))
        np.testing.assert_array_equal(host(load_npz(path, normalize=False,
                                                    dtype="float64").x_train), x)
    path = tmp_path / "packed.npz"
    np.savez_compressed(path, x=x, y=[0, 1, 0, 1])
    np.testing.assert_array_equal(host(load_npz(path, normalize=False,
                                                dtype="float64").x_train), x)
