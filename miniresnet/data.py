"""Data sets and minibatches.

* :func:`load_digits`: the 8×8 handwritten digits shipped with the package (no download).
* :func:`load_npz`: a user's own ``.npz`` file, validated.
* :func:`grid_1d`: the 1-D input grid of the shattered-gradients experiments.
* :func:`stratified_split` and :func:`batches`: reproducible splits and minibatch indices.

Everything random is drawn on the host by ``numpy.random.Generator(PCG64(seed))``, so a seed
gives the same split and the same batches on every backend and machine. Arrays are returned on
the current backend (:func:`miniresnet.use_backend`) unless ``backend=`` says otherwise.

Examples
--------
>>> import miniresnet as mr
>>> from miniresnet.data import batches, load_digits
>>> ds = load_digits()
>>> ds.x_train.shape, ds.num_classes
((1438, 1, 8, 8), 10)
>>> xp = mr.current_backend().xp
>>> for idx in batches(ds.n_train, 128, seed=0):
...     xb, yb = xp.take(ds.x_train, idx, axis=0), xp.take(ds.y_train, idx, axis=0)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import zipfile
from collections.abc import Iterator
from importlib import resources
from typing import Any

import numpy as np

from miniresnet.backend_choice import current_backend
from miniresnet.backends import Backend, Rng, backend_of, get_backend

__all__ = ["Dataset", "batches", "grid_1d", "load_digits", "load_npz", "stratified_split"]

MAX_MEMBER_BYTES = 2**32
"""The most bytes one array of a :func:`load_npz` file may declare (4 GiB), checked before it
is read."""
_INT64_END = 2**63
_FLOAT_DTYPES = ("float32", "float64")
_REQUIRED_KEYS = ("x", "y")
_OPTIONAL_KEYS = ("x_test", "y_test")


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """A classification data set split into train and test parts, on one backend.

    Attributes
    ----------
    x_train, x_test : array
        Inputs, (N, C, H, W) images or (N, D) vectors, floating, already normalised as
        ``(x - mean) / std``. ``x_test`` has zero rows if there is no test set.
    y_train, y_test : array
        int64 class labels in ``0 .. num_classes - 1``.
    num_classes : int
    name : str
    mean, std : float
        The scalar shift and scale applied to every input (computed on the train part only;
        ``0.0`` and ``1.0`` when no normalisation was asked for).
    """

    x_train: Any
    y_train: Any
    x_test: Any
    y_test: Any
    num_classes: int
    name: str
    mean: float
    std: float

    @property
    def n_train(self) -> int:
        """Number of training examples."""
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        """Number of test examples."""
        return int(self.x_test.shape[0])

    @property
    def backend(self) -> Backend:
        """The backend holding the arrays."""
        return backend_of(self.x_train)

    def __repr__(self) -> str:
        be = self.backend

        def describe(a: Any) -> str:
            return f"{tuple(a.shape)} {be.dtype_name(a.dtype)}"

        return (
            f"Dataset({self.name!r}, train: x {describe(self.x_train)}, "
            f"y {describe(self.y_train)}; test: x {describe(self.x_test)}, "
            f"y {describe(self.y_test)}; num_classes={self.num_classes}, "
            f"mean={self.mean:.6g}, std={self.std:.6g}, backend={be.name!r})"
        )


# ----------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------


def _backend(backend: Backend | str | None) -> Backend:
    if backend is None:
        return current_backend()
    if isinstance(backend, Backend):
        return backend
    return get_backend(backend)


def _float_dtype(dtype: Any, where: str) -> str:
    try:
        name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in _FLOAT_DTYPES:
        raise ValueError(f"{where}: dtype must be 'float32' or 'float64', got {dtype!r}")
    return name


def _int(value: Any, what: str, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{where}: {what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _fraction(test_fraction: Any, where: str) -> float:
    ok = isinstance(test_fraction, int | float | np.integer | np.floating) and not isinstance(
        test_fraction, bool
    )
    if not ok or not 0.0 <= float(test_fraction) < 1.0:
        raise ValueError(
            f"{where}: test_fraction must be a number with 0 <= test_fraction < 1, "
            f"got {test_fraction!r}"
        )
    return float(test_fraction)


# ----------------------------------------------------------------------------------------------
# splitting and normalising (host side)
# ----------------------------------------------------------------------------------------------


def stratified_split(
    labels: Any, test_fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split example indices into train and test parts, class by class.

    For every class with ``m`` examples, ``round(test_fraction * m)`` of them (halves rounded
    up) go to the test part, chosen by a seeded permutation of that class's examples; at least
    one example of each class stays in the train part. The same seed gives the same split on
    every machine, and for one seed a larger fraction's test part contains a smaller one's.

    Parameters
    ----------
    labels : array_like of int, shape (N,)
        Class labels (host or backend array).
    test_fraction : float
        Fraction of each class that goes to the test part, ``0 <= test_fraction < 1``.
    seed : int
        Seed of the ``numpy.random.PCG64`` generator.

    Returns
    -------
    train_idx, test_idx : numpy.ndarray of int64
        Disjoint sorted indices covering ``0 .. N-1``.
    """
    fraction = _fraction(test_fraction, "stratified_split")
    seed = _int(seed, "seed", "stratified_split", 0)
    host = _host(labels)
    if host.ndim != 1 or host.dtype.kind not in "iu":
        raise ValueError(
            f"stratified_split: labels must be a 1-D integer array, got shape {host.shape} "
            f"and dtype {host.dtype}"
        )
    gen = np.random.Generator(np.random.PCG64(seed))
    test_parts = []
    for c in np.unique(host):
        members = np.flatnonzero(host == c)
        shuffled = gen.permutation(members)  # drawn for every class: the stream never depends
        k = min(math.floor(fraction * members.size + 0.5), members.size - 1)  # on the fraction
        test_parts.append(shuffled[:k])
    test_idx = np.sort(np.concatenate(test_parts)) if test_parts else np.zeros(0, np.int64)
    train_mask = np.ones(host.shape[0], dtype=bool)
    train_mask[test_idx] = False
    return np.flatnonzero(train_mask).astype(np.int64), test_idx.astype(np.int64)


def _host(a: Any) -> np.ndarray:
    if isinstance(a, np.ndarray):
        return a
    try:
        return backend_of(a).to_numpy(a)
    except TypeError:
        return np.asarray(a)


def _finish(
    name: str,
    parts: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    num_classes: int,
    dtype: str,
    normalize: bool,
    backend: Backend,
    where: str,
    keys: tuple[str, str],
) -> Dataset:
    """Normalise with train statistics (float64 on the host), check, cast, move to ``backend``.

    ``keys`` name the sources of the train and test inputs in error messages.
    """
    x, y, x_test, y_test = parts
    with np.errstate(over="ignore"):  # a longdouble beyond float64 becomes inf, reported below
        h, h_test = x.astype(np.float64), x_test.astype(np.float64)
    for key, raw, values in ((keys[0], x, h), (keys[1], x_test, h_test)):
        _check_range(values, raw, key, "float64", where, None)
    mean, std = 0.0, 1.0
    if normalize:
        # Statistics of the inputs scaled by a power of two into [-1, 1]: no sum can overflow,
        # and the scaling is exact, so ordinary data gives the same bits as unscaled arithmetic.
        e = int(np.frexp(np.max(np.abs(h)))[1])
        h, h_test = np.ldexp(h, -e), np.ldexp(h_test, -e)
        scaled_mean, scaled_std = np.mean(h), np.std(h)
        mean, std = float(np.ldexp(scaled_mean, e)), float(np.ldexp(scaled_std, e))
        if not std > 0.0:
            raise ValueError(
                f"{where}: every training input equals {mean!r}, so the standard deviation is 0 "
                f"and the inputs cannot be normalised; pass normalize=False"
            )
        h, h_test = (h - scaled_mean) / scaled_std, (h_test - scaled_mean) / scaled_std
    for key, raw, values in ((keys[0], x, h), (keys[1], x_test, h_test)):
        _check_range(values, raw, key, dtype, where, (mean, std) if normalize else None)
    return Dataset(
        x_train=backend.asarray(h.astype(dtype), dtype),
        y_train=backend.asarray(y.astype(np.int64), "int64"),
        x_test=backend.asarray(h_test.astype(dtype), dtype),
        y_test=backend.asarray(y_test.astype(np.int64), "int64"),
        num_classes=int(num_classes),
        name=name,
        mean=mean,
        std=std,
    )


def _check_range(
    values: np.ndarray, raw: np.ndarray, key: str, dtype: str, where: str,
    stats: tuple[float, float] | None,
) -> None:
    """Raise unless every float64 value fits in ``dtype`` (``raw``: the same before scaling)."""
    limit = float(np.finfo(dtype).max)
    bad = np.flatnonzero(~(np.abs(values) <= limit))
    if not bad.size:
        return
    i = np.unravel_index(bad[0], values.shape)
    became = "" if stats is None else (
        f" that becomes {values[i].item()!r} when normalised with the training mean "
        f"{stats[0]!r} and standard deviation {stats[1]!r},")
    raise ValueError(
        f"{where}: {key!r} has a value {raw[i].item()!r}{became} beyond the range of {dtype} "
        f"(largest {limit:.8g}); inputs must fit in the dtype asked for"
    )


def _split(
    x: np.ndarray, y: np.ndarray, test_fraction: float | None, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if test_fraction is None:
        return x, y, x[:0], y[:0]
    train_idx, test_idx = stratified_split(y, test_fraction, seed)
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


# ----------------------------------------------------------------------------------------------
# the shipped digits
# ----------------------------------------------------------------------------------------------


@functools.cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The shipped (1797, 8, 8) uint8 images and (1797,) int64 labels (read-only, cached)."""
    resource = resources.files("miniresnet").joinpath("datasets", "digits.npz")
    try:
        with resource.open("rb") as f, np.load(f, allow_pickle=False) as z:
            images, labels = z["images"], z["labels"]
    except FileNotFoundError as e:
        raise FileNotFoundError(
            "load_digits: the data file miniresnet/datasets/digits.npz is missing from the "
            "installation; reinstall miniresnet (the file is package data)"
        ) from e
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_digits(
    test_fraction: float = 0.2,
    seed: int = 0,
    dtype: str = "float32",
    backend: Backend | str | None = None,
) -> Dataset:
    """The 8×8 handwritten digits (UCI, CC BY 4.0; see ``miniresnet/datasets/README.md``).

    1797 grey-scale images of the digits 0–9 with pixel values 0..16, split by
    :func:`stratified_split` and normalised with one scalar mean and standard deviation taken
    over all pixels of the training images (a per-pixel scale would divide by zero: some
    border pixels are 0 in every image).

    Parameters
    ----------
    test_fraction : float
        Fraction of each class held out for testing, ``0 <= test_fraction < 1``.
    seed : int
        Seed of the split; the same seed gives the same split everywhere.
    dtype : {"float32", "float64"}
        Dtype of the images.
    backend : Backend or str, optional
        Where the arrays live (default: the current backend).

    Returns
    -------
    Dataset
        Images of shape (N, 1, 8, 8), int64 labels, ``num_classes == 10``, ``name == "digits"``.
    """
    fraction = _fraction(test_fraction, "load_digits")
    dtype = _float_dtype(dtype, "load_digits")
    seed = _int(seed, "seed", "load_digits", 0)
    images, labels = _digits_arrays()
    parts = _split(images[:, None, :, :], labels, fraction, seed)
    return _finish("digits", parts, 10, dtype, True, _backend(backend), "load_digits",
                   ("images", "images"))


# ----------------------------------------------------------------------------------------------
# the 1-D grid
# ----------------------------------------------------------------------------------------------


def grid_1d(
    n: int = 256,
    low: float = -2.0,
    high: float = 2.0,
    dtype: str = "float64",
    backend: Backend | str | None = None,
) -> Any:
    """``n`` evenly spaced points from ``low`` to ``high`` (both included), shape (n, 1).

    The input of the shattered-gradients experiments (Balduzzi et al. 2017), where the
    gradient of a network with one input and one output is plotted along this line.
    """
    n = _int(n, "n", "grid_1d", 2)
    dtype = _float_dtype(dtype, "grid_1d")
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"grid_1d: need finite low < high, got low={low!r}, high={high!r}")
    host = np.linspace(float(low), float(high), n, dtype=np.float64)[:, None]
    return _backend(backend).asarray(host.astype(dtype), dtype)


# ----------------------------------------------------------------------------------------------
# users' .npz files
# ----------------------------------------------------------------------------------------------


def _read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    shown = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_npz: no such file: {shown!r}")
    if not os.path.isfile(path):
        raise ValueError(f"load_npz: {shown!r} is not a file")
    expected = (
        "expected an .npz archive with arrays 'x' and 'y' and optionally 'x_test' and 'y_test' "
        "(numpy.savez(path, x=..., y=...))"
    )
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"load_npz: cannot read {shown!r} ({e}); {expected}") from e
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError(f"load_npz: {shown!r} holds a single array, not an archive; {expected}")
    with loaded:
        found = sorted(loaded.files)
        allowed = _REQUIRED_KEYS + _OPTIONAL_KEYS
        missing = [k for k in _REQUIRED_KEYS if k not in found]
        unknown = [k for k in found if k not in allowed]
        if missing or unknown:
            what = []
            if missing:
                what.append(f"missing keys {missing}")
            if unknown:
                what.append(f"unexpected keys {unknown}")
            raise ValueError(
                f"load_npz: {shown!r} has {' and '.join(what)}; found keys {found}; {expected}"
            )
        if ("x_test" in found) != ("y_test" in found):
            have, lack = ("x_test", "y_test") if "x_test" in found else ("y_test", "x_test")
            raise ValueError(
                f"load_npz: {shown!r} has {have!r} but no {lack!r}; a test set needs both"
            )
        names = set(loaded.zip.namelist())
        for key in found:  # every declared size checked before any array is read
            _check_member(loaded.zip, key if key in names else key + ".npy", key, shown)
        arrays = {}
        for key in found:
            try:
                arrays[key] = loaded[key]
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
                raise ValueError(
                    f"load_npz: cannot read array {key!r} of {shown!r} ({e}); arrays must be "
                    f"numeric (object arrays would need pickle, which is not allowed)"
                ) from e
    return arrays


def _check_member(archive: zipfile.ZipFile, member: str, key: str, shown: str) -> None:
    """Read the ``.npy`` header of ``member`` and bound the bytes it declares, before reading."""
    fmt = np.lib.format
    info = archive.getinfo(member)
    try:
        with archive.open(info) as f:
            version = fmt.read_magic(f)
            if version not in ((1, 0), (2, 0), (3, 0)):
                raise ValueError(f".npy format version {version}; expected 1.0, 2.0 or 3.0")
            # 3.0 differs from 2.0 only by UTF-8 field names, which only record dtypes have
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read(f)
            available = info.file_size - f.tell()
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"load_npz: cannot read the header of array {key!r} of {shown!r} "
                         f"({e})") from e
    declared = math.prod(shape) * dtype.itemsize
    what = f"load_npz: array {key!r} of {shown!r} declares shape {shape} of {dtype}"
    if min(shape, default=0) < 0:
        raise ValueError(f"{what}: a negative length")
    if declared > MAX_MEMBER_BYTES:
        raise ValueError(f"{what}, {declared} bytes, more than the {MAX_MEMBER_BYTES} bytes "
                         f"one array may have (miniresnet.data.MAX_MEMBER_BYTES)")
    if declared > available:
        raise ValueError(f"{what}, {declared} bytes, but the archive member holds only "
                         f"{available} bytes of data; the file is damaged")


def _check_x(x: np.ndarray, key: str, where: str) -> None:
    if x.dtype.kind not in "biuf":
        raise ValueError(f"{where}: {key!r} must hold real numbers, got dtype {x.dtype}")
    if x.ndim not in (2, 4):
        hint = f"; for (N, H, W) images add a channel axis: {key}[:, None]" if x.ndim == 3 else ""
        raise ValueError(
            f"{where}: {key!r} must have shape (N, C, H, W) or (N, D), got {x.shape} "
            f"(rank {x.ndim}){hint}"
        )
    if x.size == 0:
        raise ValueError(f"{where}: {key!r} is empty (shape {x.shape})")
    if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        first = tuple(int(i) for i in np.argwhere(~np.isfinite(x))[0])
        raise ValueError(
            f"{where}: {key!r} has {bad} non-finite value(s) (NaN or inf), first at "
            f"index {first}: {x[first].item()!r}"
        )


def _check_y(y: np.ndarray, key: str, n: int, x_key: str, where: str) -> np.ndarray:
    """Validate labels and return them as int64 (integral floats are accepted)."""
    if y.ndim != 1:
        raise ValueError(f"{where}: {key!r} must be 1-D (one label per example), got shape "
                         f"{y.shape}")
    if y.shape[0] != n:
        raise ValueError(f"{where}: {key!r} has {y.shape[0]} labels but {x_key!r} has {n} "
                         f"examples; they must match")
    if y.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(y) | (y != np.round(y)))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"{where}: {key!r} must hold integer class labels; "
                             f"{key}[{i}] = {y[i].item()!r} is not an integer")
    elif y.dtype.kind not in "iu":
        raise ValueError(f"{where}: {key!r} must hold integer class labels, got dtype {y.dtype}")
    if y.size and y.min() < 0:
        i = int(np.argmin(y))
        raise ValueError(f"{where}: {key!r} has a negative label {key}[{i}] = {y[i].item()!r}; "
                         f"labels must be 0 .. num_classes - 1")
    if y.size and y.max().item() >= _INT64_END:  # exact comparison of a Python int or float
        i = int(np.argmax(y))
        raise ValueError(f"{where}: {key!r} has a label {key}[{i}] = {y[i].item()!r} that does "
                         f"not fit in int64; labels must be 0 .. num_classes - 1")
    return y.astype(np.int64)


def load_npz(
    path: str | os.PathLike,
    dtype: str = "float32",
    test_fraction: float | None = None,
    seed: int = 0,
    *,
    num_classes: int | None = None,
    normalize: bool = True,
    backend: Backend | str | None = None,
) -> Dataset:
    """Load a classification data set from a user's ``.npz`` file, with checks.

    The file (read with ``allow_pickle=False``) must hold exactly ``x`` and ``y``, and may also
    hold ``x_test`` and ``y_test``:

    * ``x``: real numbers of shape (N, C, H, W) or (N, D), N >= 1, no NaN or inf, and every
      input (after normalisation, if asked for) within the range of ``dtype``;
    * ``y``: N class labels, 1-D, integer dtype; floats are accepted when every value is a
      whole number (as written by tools that store everything as float), booleans are not;
      labels must be >= 0, < 2**63 and, if ``num_classes`` is given, < ``num_classes``.
    * ``x_test`` / ``y_test``: the same rules, with the trailing shape of ``x``.

    The file is untrusted: before any array is read, the size its header declares is checked
    against the bytes stored for it and against :data:`MAX_MEMBER_BYTES` (4 GiB). The mean and
    standard deviation are computed so that no sum overflows, even for inputs near the largest
    float64.

    Parameters
    ----------
    path : str or os.PathLike
        The ``.npz`` file.
    dtype : {"float32", "float64"}
        Dtype of the inputs.
    test_fraction : float, optional
        If given (and the file has no test set), hold out this fraction of each class with
        :func:`stratified_split`. Without it and without ``x_test`` the test part is empty.
    seed : int
        Seed of the split.
    num_classes : int, optional
        Number of classes; default ``max(label) + 1`` over all labels.
    normalize : bool
        Normalise the inputs with the scalar mean and standard deviation of the training inputs
        (default); otherwise keep them as they are (``mean=0.0, std=1.0``).
    backend : Backend or str, optional
        Where the arrays live (default: the current backend).

    Returns
    -------
    Dataset
        Named after the file's stem.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file or its contents break the rules above; the message names the file, the
        array and the offending value, and says what is expected.
    """
    where = "load_npz"
    dtype = _float_dtype(dtype, where)
    seed = _int(seed, "seed", where, 0)
    fraction = None if test_fraction is None else _fraction(test_fraction, where)
    if num_classes is not None:
        num_classes = _int(num_classes, "num_classes", where, 1)
    arrays = _read_npz(path)
    where = f"{where}: {os.fspath(path)!r}"
    x, y = arrays["x"], arrays["y"]
    _check_x(x, "x", where)
    y = _check_y(y, "y", x.shape[0], "x", where)
    labels = {"y": y}
    if "x_test" in arrays:
        if fraction is not None:
            raise ValueError(
                f"{where}: the file already holds a test set ('x_test', 'y_test'); pass "
                f"test_fraction=None to use it, or save the file without it to split 'x'"
            )
        x_test = arrays["x_test"]
        _check_x(x_test, "x_test", where)
        if x_test.shape[1:] != x.shape[1:]:
            raise ValueError(
                f"{where}: 'x_test' examples have shape {x_test.shape[1:]} but 'x' examples "
                f"have {x.shape[1:]}; they must match"
            )
        y_test = _check_y(arrays["y_test"], "y_test", x_test.shape[0], "x_test", where)
        labels["y_test"] = y_test
        parts, keys = (x, y, x_test, y_test), ("x", "x_test")
    else:
        parts, keys = _split(x, y, fraction, seed), ("x", "x")
    if num_classes is None:
        num_classes = max(int(lab.max()) for lab in labels.values()) + 1
    for key, lab in labels.items():
        i = int(np.argmax(lab))
        if lab[i] >= num_classes:
            raise ValueError(
                f"{where}: label {key}[{i}] = {int(lab[i])} is out of range for "
                f"num_classes={num_classes}; labels must be 0 .. {num_classes - 1}"
            )
    name = os.path.splitext(os.path.basename(os.fspath(path)))[0]
    return _finish(name, parts, num_classes, dtype, normalize, _backend(backend), where, keys)


# ----------------------------------------------------------------------------------------------
# minibatches
# ----------------------------------------------------------------------------------------------


def batches(
    n: int,
    batch_size: int,
    seed: int | Rng | np.random.Generator | None = None,
    *,
    shuffle: bool = True,
    drop_last: bool = False,
    backend: Backend | str | None = None,
) -> Iterator[Any]:
    """Index arrays of the minibatches of one epoch over ``n`` examples.

    Every index ``0 .. n-1`` appears exactly once per epoch (except the ``n % batch_size``
    left over when ``drop_last``); all batches have ``batch_size`` indices but the last, which
    may be smaller. Select a batch with ``xp.take(x, idx, axis=0)``.

    Parameters
    ----------
    n : int
        Number of examples.
    batch_size : int
        Indices per batch, >= 1.
    seed : int, Rng or numpy.random.Generator
        Source of the shuffling order, required when ``shuffle``. An int gives the same order
        on every call; a generator (a :class:`~miniresnet.backends.Rng` or a NumPy
        ``Generator``) advances, giving a new order for every epoch that is reproducible from
        the generator's seed. The order is drawn when ``batches`` is called.
    shuffle : bool
        Visit the examples in a random order (default) or in order ``0 .. n-1``.
    drop_last : bool
        Leave out a last batch smaller than ``batch_size``.
    backend : Backend or str, optional
        Backend of the index arrays (default: the current backend).

    Yields
    ------
    array of int64
        The indices of one batch.
    """
    n = _int(n, "n", "batches", 0)
    batch_size = _int(batch_size, "batch_size", "batches", 1)
    if shuffle:
        if isinstance(seed, Rng):
            gen = seed.generator
        elif isinstance(seed, np.random.Generator):
            gen = seed
        elif isinstance(seed, int | np.integer) and not isinstance(seed, bool) and seed >= 0:
            gen = np.random.Generator(np.random.PCG64(int(seed)))
        else:
            raise ValueError(
                f"batches: shuffle=True needs a seed (an int >= 0, a miniresnet Rng or a "
                f"numpy Generator) so that the order is reproducible, got {seed!r}"
            )
        order = gen.permutation(n).astype(np.int64)
    else:
        order = np.arange(n, dtype=np.int64)
    stop = n - n % batch_size if drop_last else n
    indices = _backend(backend).asarray(order, "int64")
    return (indices[start : min(start + batch_size, stop)] for start in range(0, stop, batch_size))
