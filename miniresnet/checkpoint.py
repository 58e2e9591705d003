"""Checkpoints: a model's weights and buffers, an optimiser's state and metadata in one
pickle-free ``.npz`` file, written atomically.

Layout of a checkpoint (format version 1), an ``.npz`` archive readable with
``numpy.load(path, allow_pickle=False)``:

``meta``
    0-d unicode array holding a JSON object: ``format`` (``"miniresnet-checkpoint"``),
    ``version`` (1), ``config`` (the model's ``config``, from which
    :func:`miniresnet.nn.build_model` rebuilds it, or null), ``epoch``, ``extra``,
    ``model_keys`` (the state-dict names, in order), ``optimizer`` (null, or the kind of every
    optimiser entry: ``"array"``, ``"int"``, ``"float"``, ``"bool"``, ``"str"`` or
    ``"none"``), ``backend`` and ``miniresnet_version`` (informational).
``model/<name>``
    Every parameter and buffer of the model (``model.state_dict()``), dtype kept.
``optimizer/<key>``
    Every optimiser entry except ``None`` ones: arrays as they are, Python scalars as 0-d int64,
    float64, bool or unicode arrays whose Python type is restored from ``meta``.

Examples
--------
>>> import os, tempfile
>>> from miniresnet import nn
>>> from miniresnet.checkpoint import load_checkpoint, save_checkpoint
>>> path = os.path.join(tempfile.mkdtemp(), "mlp.npz")
>>> save_checkpoint(path, nn.mlp(2, 8), epoch=3, extra={"lr": 0.1})
>>> ckpt = load_checkpoint(path)          # rebuilds the model from its saved config
>>> ckpt.epoch, ckpt.extra, type(ckpt.model).__name__
(3, {'lr': 0.1}, 'Network')
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import stat
import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib import format as npy_format

from miniresnet.backends import Backend, backend_of
from miniresnet.config import current_backend, to_numpy
from miniresnet.nn.models import build_model
from miniresnet.nn.module import Module
from miniresnet.tracing import Tensor

__all__ = ["FORMAT", "FORMAT_VERSION", "Checkpoint", "CheckpointError", "load_checkpoint",
           "save_checkpoint"]

FORMAT = "miniresnet-checkpoint"
FORMAT_VERSION = 1
_READABLE_VERSIONS = (1,)
_KINDS = ("array", "int", "float", "bool", "str", "none")
_META = "meta"
_MODEL = "model/"
_OPTIMIZER = "optimizer/"


class CheckpointError(ValueError):
    """A file is not a (readable) miniresnet checkpoint, or does not fit the model/optimiser."""


@dataclasses.dataclass(frozen=True, eq=False)
class Checkpoint:
    """What :func:`load_checkpoint` restored.

    Attributes
    ----------
    model : Module
        The model holding the saved weights (the one passed in, or one rebuilt from ``config``).
    epoch : int or None
    extra : Any
        The ``extra`` value saved, after a JSON round trip (tuples come back as lists).
    config : dict or None
        The saved model config.
    optimizer_state : dict or None
        The saved optimiser state (arrays on the model's backend, scalars as Python objects),
        or ``None`` if none was saved; it has been loaded into ``optimizer`` if one was given.
    """

    model: Module
    epoch: int | None
    extra: Any
    config: dict | None
    optimizer_state: dict[str, Any] | None


# ----------------------------------------------------------------------------------------------
# saving
# ----------------------------------------------------------------------------------------------


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} {obj!r}")


def _to_json(value: Any, what: str) -> Any:
    """``value`` after a JSON round trip (so that saving and loading agree), or a clear error."""
    try:
        return json.loads(json.dumps(value, default=_json_default))
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"save_checkpoint: {what} must be JSON-serialisable (str, int, float, bool, None, and "
            f"lists and dicts with string keys of those); cannot store {e}"
        ) from e


def _host_array(value: Any, what: str) -> np.ndarray:
    raw = value.raw if isinstance(value, Tensor) else value
    if isinstance(raw, np.ndarray):
        host = np.array(raw, copy=True)
    else:
        try:
            backend_of(raw)
        except TypeError:
            raise TypeError(
                f"save_checkpoint: {what} is a {type(value).__name__}; valid values are arrays "
                f"of a backend, NumPy arrays, Tensors, int, float, bool, str and None"
            ) from None
        host = to_numpy(raw)
    if host.dtype.kind not in "biufc":
        raise TypeError(f"save_checkpoint: {what} has dtype {host.dtype}; only numeric and "
                        f"boolean arrays can be stored")
    return host


def _optimizer_entries(state: Any) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    if not isinstance(state, Mapping):
        raise TypeError(f"save_checkpoint: optimizer.state_dict() must return a dict, got "
                        f"{type(state).__name__}")
    arrays: dict[str, np.ndarray] = {}
    kinds: dict[str, str] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise TypeError(f"save_checkpoint: optimizer state keys must be str, got {key!r}")
        what = f"optimizer state {key!r}"
        if value is None:
            kinds[key] = "none"
            continue
        if isinstance(value, bool | np.bool_):
            kind, host = "bool", np.array(bool(value))
        elif isinstance(value, int | np.integer):
            if not -(2**63) <= int(value) < 2**63:
                raise ValueError(f"save_checkpoint: {what} = {value} does not fit in int64")
            kind, host = "int", np.array(int(value), dtype=np.int64)
        elif isinstance(value, float | np.floating):
            kind, host = "float", np.array(float(value), dtype=np.float64)
        elif isinstance(value, str):
            kind, host = "str", np.array(value, dtype=np.str_)
            if str(host[()]) != value:  # NumPy drops trailing NUL characters
                raise ValueError(f"save_checkpoint: {what} ends in NUL characters, which an "
                                 f".npz file cannot keep")
        else:
            kind, host = "array", _host_array(value, what)
        kinds[key] = kind
        arrays[_OPTIMIZER + key] = host
    return arrays, kinds


def _model_backend(model: Module) -> Backend:
    for _, tensor in model.named_parameters():
        return tensor.backend
    for _, tensor in model.named_buffers():
        return tensor.backend
    return current_backend()


def _target_mode(path: Path) -> int:
    """Permissions for the new file: those of the file it replaces, else 0o666 minus umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


@functools.cache
def _umask() -> int:
    try:  # Linux: read it without changing it
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_npz(file: Any, arrays: Mapping[str, np.ndarray]) -> None:
    """An uncompressed ``.npz`` archive, as ``numpy.savez`` writes, but never with pickles."""
    with zipfile.ZipFile(file, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, array in arrays.items():
            with zf.open(key + ".npy", mode="w", force_zip64=True) as member:
                npy_format.write_array(member, array, allow_pickle=False)


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write to a temporary file beside ``path``, fsync it, then rename it onto ``path``.

    On any error the temporary file is removed and an existing ``path`` is untouched.
    """
    mode = _target_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            f = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            raise
        with f:
            _write_npz(f, arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)


def save_checkpoint(
    path: str | os.PathLike,
    model: Module,
    optimizer: Any = None,
    *,
    epoch: int | None = None,
    extra: Any = None,
) -> None:
    """Save ``model`` (and ``optimizer``) to one ``.npz`` file at ``path``, atomically.

    The file appears complete or not at all: it is written to a temporary file in the same
    directory, flushed to disk and renamed onto ``path``. If anything fails, an existing file
    at ``path`` is left as it was and no temporary file remains. The name is used as given (no
    ``.npz`` is appended).

    Parameters
    ----------
    path : str or os.PathLike
        Target file; its directory must exist.
    model : Module
        Its ``state_dict()`` (parameters and buffers) is saved, and its ``config`` (if it has
        one, as every :mod:`miniresnet.nn` model does) so that :func:`load_checkpoint` can
        rebuild it. Train/eval mode is not saved.
    optimizer : object, optional
        Anything with ``state_dict()`` returning ``{str: array | int | float | bool | str |
        None}``; entries come back with the same Python types.
    epoch : int, optional
    extra : JSON-serialisable, optional
        Anything else to keep (e.g. the training history); round-trips through JSON.

    Raises
    ------
    TypeError
        If a value cannot be stored (the message names it and lists what can).
    FileNotFoundError, IsADirectoryError
        If the directory is missing or ``path`` is a directory.
    """
    path = Path(path)
    if not isinstance(model, Module):
        raise TypeError(f"save_checkpoint: model must be a miniresnet Module, got "
                        f"{type(model).__name__}")
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int | np.integer)):
        raise TypeError(f"save_checkpoint: epoch must be an int or None, got {epoch!r}")
    if path.is_dir():
        raise IsADirectoryError(f"save_checkpoint: {str(path)!r} is a directory; give a file "
                                f"path such as {str(path / 'checkpoint.npz')!r}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"save_checkpoint: directory {str(path.parent)!r} does not "
                                f"exist; create it first")

    # everything is converted and checked in memory before the disk is touched
    state = model.state_dict()
    arrays = {_MODEL + name: _host_array(value, f"model entry {name!r}")
              for name, value in state.items()}
    kinds = None
    if optimizer is not None:
        if not callable(getattr(optimizer, "state_dict", None)):
            raise TypeError(f"save_checkpoint: optimizer must have a state_dict() method, got "
                            f"{type(optimizer).__name__}")
        opt_arrays, kinds = _optimizer_entries(optimizer.state_dict())
        arrays.update(opt_arrays)
    import miniresnet

    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config": _to_json(getattr(model, "config", None), "the model's config"),
        "epoch": None if epoch is None else int(epoch),
        "extra": _to_json(extra, "extra"),
        "model_keys": list(state),
        "optimizer": kinds,
        "backend": _model_backend(model).name,
        "miniresnet_version": miniresnet.__version__,
    }
    arrays[_META] = np.array(json.dumps(meta), dtype=np.str_)
    _atomic_write(path, arrays)


# ----------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------


def _fail(path: Path, message: str) -> CheckpointError:
    return CheckpointError(f"load_checkpoint: {str(path)!r} {message}")


def _read_meta(archive: Any, path: Path) -> dict:
    files = sorted(archive.files)
    if _META not in files:
        raise _fail(path, f"is not a miniresnet checkpoint: it has no {_META!r} entry (found "
                          f"keys {files}); checkpoints are written by save_checkpoint")
    try:
        raw = archive[_META]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise _fail(path, f"has an unreadable {_META!r} entry ({e})") from e
    if raw.ndim != 0 or raw.dtype.kind != "U":
        raise _fail(path, f"is not a miniresnet checkpoint: {_META!r} must be a 0-d unicode "
                          f"array, got shape {raw.shape} dtype {raw.dtype}")
    try:
        meta = json.loads(str(raw[()]))
    except ValueError as e:
        raise _fail(path, f"is not a miniresnet checkpoint: {_META!r} is not JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise _fail(path, f"is not a miniresnet checkpoint: {_META!r} has format {found!r}, "
                          f"expected {FORMAT!r}")
    version = meta.get("version")
    if version not in _READABLE_VERSIONS:
        raise _fail(path, f"has checkpoint format version {version!r}; this miniresnet reads "
                          f"versions {list(_READABLE_VERSIONS)} (was it written by a newer "
                          f"miniresnet?)")
    keys, kinds, epoch = meta.get("model_keys"), meta.get("optimizer"), meta.get("epoch")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise _fail(path, f"has a corrupt {_META!r}: 'model_keys' must be a list of names")
    if kinds is not None and not (
        isinstance(kinds, dict) and all(v in _KINDS for v in kinds.values())
    ):
        raise _fail(path, f"has a corrupt {_META!r}: 'optimizer' must map keys to one of "
                          f"{list(_KINDS)}")
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int)):
        raise _fail(path, f"has a corrupt {_META!r}: 'epoch' must be an int or null")
    if meta.get("config") is not None and not isinstance(meta["config"], dict):
        raise _fail(path, f"has a corrupt {_META!r}: 'config' must be an object or null")
    return meta


def _read_archive(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    if not path.exists():
        raise FileNotFoundError(f"load_checkpoint: no such file: {str(path)!r}")
    if not path.is_file():
        raise IsADirectoryError(f"load_checkpoint: {str(path)!r} is not a file")
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise _fail(path, f"is not a miniresnet checkpoint: it cannot be read as an .npz "
                          f"archive ({e})") from e
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise _fail(path, "is not a miniresnet checkpoint: it is a single .npy array, not an "
                          ".npz archive")
    with archive:
        meta = _read_meta(archive, path)
        kinds = meta["optimizer"] or {}
        expected = [_MODEL + k for k in meta["model_keys"]]
        expected += [_OPTIMIZER + k for k, kind in kinds.items() if kind != "none"]
        found = set(archive.files) - {_META}
        missing = [k for k in expected if k not in found]
        unexpected = sorted(found - set(expected))
        if missing or unexpected:
            parts = ([f"missing entries {missing}"] if missing else []) + (
                [f"unexpected entries {unexpected}"] if unexpected else [])
            raise _fail(path, f"is incomplete or corrupt: {', '.join(parts)}")
        arrays = {}
        for key in expected:
            try:
                arrays[key] = archive[key]
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
                raise _fail(path, f"has an unreadable entry {key!r} ({e})") from e
    return meta, arrays


def _restore_optimizer_state(
    kinds: dict[str, str], arrays: dict[str, np.ndarray], backend: Backend, path: Path
) -> dict[str, Any]:
    state: dict[str, Any] = {}
    scalar_kinds = {"int": "iu", "float": "f", "bool": "b", "str": "U"}
    for key, kind in kinds.items():
        if kind == "none":
            state[key] = None
            continue
        host = arrays[_OPTIMIZER + key]
        if kind == "array":
            if host.dtype.kind not in "biufc":
                raise _fail(path, f"has optimizer entry {key!r} of dtype {host.dtype}, which "
                                  f"is not numeric")
            state[key] = backend.asarray(host, host.dtype.name)
            continue
        if host.ndim != 0 or host.dtype.kind not in scalar_kinds[kind]:
            raise _fail(path, f"has a corrupt optimizer entry {key!r}: a {kind} should be a "
                              f"0-d array, got shape {host.shape} dtype {host.dtype}")
        state[key] = {"int": int, "float": float, "bool": bool, "str": str}[kind](host[()])
    return state


def _dtype_name(array: Any) -> str:
    return backend_of(array).dtype_name(array.dtype)


def _load_weights(model: Module, weights: dict[str, np.ndarray], path: Path) -> None:
    """Strict, all-or-nothing load: keys, shapes and dtypes are all checked before any copy."""
    own = model.state_dict()
    if set(own) == set(weights):
        wrong = [f"{k}: checkpoint {w.dtype.name}, model {_dtype_name(own[k])}"
                 for k, w in weights.items()
                 if tuple(w.shape) == tuple(own[k].shape) and w.dtype.name != _dtype_name(own[k])]
        if wrong:
            raise _fail(path, f"has dtypes that differ from the model's [{'; '.join(wrong)}]; "
                              f"build the model with the checkpoint's dtype, or pass model=None "
                              f"to rebuild it from the saved config")
    try:
        model.load_state_dict(weights, strict=True)
    except (KeyError, ValueError) as e:
        message = e.args[0] if e.args else str(e)
        raise _fail(path, f"does not fit the model: {message}") from e


def _config_differences(model: Module, saved: dict | None) -> list[str]:
    own = getattr(model, "config", None)
    if saved is None or not isinstance(own, dict):
        return []
    try:
        own = json.loads(json.dumps(own, default=_json_default))
    except (TypeError, ValueError):
        return []
    keys = sorted((set(own) | set(saved)) - {"seed"})
    return [f"{k}: model {own.get(k)!r}, checkpoint {saved.get(k)!r}"
            for k in keys if own.get(k) != saved.get(k)]


def load_checkpoint(
    path: str | os.PathLike, model: Module | None = None, optimizer: Any = None
) -> Checkpoint:
    """Load a checkpoint written by :func:`save_checkpoint`.

    The file is read with ``allow_pickle=False`` and checked: it must exist, carry miniresnet
    metadata of a known format version and hold every entry the metadata lists. The weights
    are then loaded strictly (every key, shape and dtype must match; nothing is changed if one
    does not), onto the backend of ``model``.

    Parameters
    ----------
    path : str or os.PathLike
    model : Module, optional
        Model to load the weights into; by default one is rebuilt from the saved config with
        :func:`miniresnet.nn.build_model` on the current backend. If the given model's
        ``config`` differs from the saved one (other than ``seed``) but the weights fit, a
        ``UserWarning`` names the differences.
    optimizer : object, optional
        Anything with ``load_state_dict(dict)``; it receives the saved optimiser state.

    Returns
    -------
    Checkpoint

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    CheckpointError
        (a ``ValueError``) If the file is not a readable miniresnet checkpoint, or it does not
        fit the model or the optimiser; the message names the offending keys.
    """
    path = Path(path)
    meta, arrays = _read_archive(path)
    config = meta.get("config")
    given = model is not None
    if model is None:
        if config is None:
            raise _fail(path, "has no model config (it was saved from a model without "
                              "`config`); pass the model to load into as model=")
        try:
            model = build_model(config)
        except (TypeError, ValueError, KeyError) as e:
            raise _fail(path, f"has a model config that cannot be rebuilt ({e}): {config}") from e
    elif not isinstance(model, Module):
        raise TypeError(f"load_checkpoint: model must be a miniresnet Module or None, got "
                        f"{type(model).__name__}")
    weights = {name: arrays[_MODEL + name] for name in meta["model_keys"]}
    _load_weights(model, weights, path)
    if given and (diff := _config_differences(model, config)):
        warnings.warn(f"load_checkpoint: the weights fit, but the model's config differs from "
                      f"the checkpoint's: {'; '.join(diff)}", UserWarning, stacklevel=2)

    kinds = meta.get("optimizer")
    optimizer_state = None
    if kinds is not None:
        optimizer_state = _restore_optimizer_state(kinds, arrays, _model_backend(model), path)
    if optimizer is not None:
        if optimizer_state is None:
            raise _fail(path, "holds no optimizer state (it was saved with optimizer=None)")
        try:
            optimizer.load_state_dict(optimizer_state)
        except (KeyError, ValueError) as e:
            message = e.args[0] if e.args else str(e)
            raise _fail(path, f"does not fit the optimizer: {message}") from e
    return Checkpoint(model=model, epoch=meta.get("epoch"), extra=meta.get("extra"),
                      config=config, optimizer_state=optimizer_state)
