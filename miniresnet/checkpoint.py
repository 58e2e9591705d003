"""Checkpoints: a model's weights and buffers, an optimiser's state and metadata in one
safetensors file (``.safetensors``), written atomically and readable by any safetensors tool.

Layout (format version 2): tensors ``model/<name>`` (``model.state_dict()``, dtype kept) and
``optimizer/<key>`` (arrays as they are; ints, floats and bools as 0-d int64, float64 and bool
tensors; strings as 1-d UTF-8 uint8 tensors; ``None`` entries only in the metadata), and two
metadata strings: ``"miniresnet"``, a JSON object with ``format`` (``"miniresnet-checkpoint"``),
``version``, ``config`` (the model's, from which :func:`miniresnet.nn.build_model` rebuilds it,
or null), ``epoch``, ``extra``, ``model_keys`` (state-dict order), ``optimizer`` (null, or the
kind of every entry: ``"array"``, ``"int"``, ``"float"``, ``"bool"``, ``"str"``, ``"none"``),
``backend`` and ``miniresnet_version``; and ``"sha256"``, the SHA-256 digest of that object
(canonical JSON) and of every tensor (name, dtype, shape, bytes; in name order).

Checkpoints are files people exchange, so loading trusts nothing in them and never runs code
or unpickles. safetensors checks the header against the file's size; the config is checked
(:func:`~miniresnet.nn.models.validate_config`) and the state it implies, computed in closed
form, is compared with the stored tensors' names, shapes and dtypes before any tensor is read or
layer built; then the digest is verified. The digest detects corruption and accidental edits,
not a forger, who can recompute it. Format-1 ``.npz`` checkpoints still load, with a warning
that they carry no digest.

Examples
--------
>>> import os, tempfile
>>> from miniresnet import nn
>>> from miniresnet.checkpoint import load_checkpoint, save_checkpoint
>>> path = os.path.join(tempfile.mkdtemp(), "mlp.safetensors")
>>> save_checkpoint(path, nn.mlp(2, 8), epoch=3, extra={"lr": 0.1})
>>> ckpt = load_checkpoint(path)          # rebuilds the model from its saved config
>>> ckpt.epoch, ckpt.extra, type(ckpt.model).__name__
(3, {'lr': 0.1}, 'Network')
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
from numpy.lib import format as npy_format
from safetensors import SafetensorError, safe_open

from miniresnet.backend_choice import current_backend
from miniresnet.backends import Backend, backend_of
from miniresnet.creation import to_numpy
from miniresnet.files import write_atomic
from miniresnet.nn.models import (
    build_model,
    short_repr,
    state_count,
    state_shapes,
    validate_config,
)
from miniresnet.nn.module import Module
from miniresnet.tracing import Tensor

__all__ = ["FORMAT", "FORMAT_VERSION", "Checkpoint", "CheckpointError", "load_checkpoint",
           "save_checkpoint"]

FORMAT = "miniresnet-checkpoint"
FORMAT_VERSION = 2
_KINDS = ("array", "int", "float", "bool", "str", "none")
_MODEL = "model/"
_OPTIMIZER = "optimizer/"
_DTYPES = {  # safetensors' names of the dtypes it shares with NumPy
    "BOOL": "bool", "I8": "int8", "U8": "uint8", "I16": "int16", "U16": "uint16", "I32": "int32",
    "U32": "uint32", "I64": "int64", "U64": "uint64", "F16": "float16", "F32": "float32",
    "F64": "float64", "C64": "complex64"}


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


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _little_endian(array: np.ndarray) -> np.ndarray:
    return np.asarray(array, dtype=array.dtype.newbyteorder("<"), order="C")


def _digest(meta: dict, arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 of the canonical metadata and of every array (name, dtype, shape, bytes)."""
    h = hashlib.sha256(_canonical(meta))
    for name in sorted(arrays):
        array = _little_endian(arrays[name])
        h.update(_canonical([name, array.dtype.name, list(array.shape)]))
        h.update(array)
    return h.hexdigest()


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
    if not isinstance(raw, np.ndarray):
        try:
            backend_of(raw)
        except TypeError:
            raise TypeError(
                f"save_checkpoint: {what} is a {type(value).__name__}; valid values are arrays "
                f"of a backend, NumPy arrays, Tensors, int, float, bool, str and None"
            ) from None
        raw = to_numpy(raw)
    if raw.dtype.name not in _DTYPES.values():
        raise TypeError(f"save_checkpoint: {what} has dtype {raw.dtype}; valid dtypes: "
                        f"{', '.join(_DTYPES.values())}")
    return _little_endian(raw)


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
            try:
                kind, host = "str", np.frombuffer(value.encode(), dtype=np.uint8)
            except UnicodeEncodeError as e:
                raise ValueError(f"save_checkpoint: {what} cannot be encoded as UTF-8 "
                                 f"({e})") from None
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


def save_checkpoint(
    path: str | os.PathLike,
    model: Module,
    optimizer: Any = None,
    *,
    epoch: int | None = None,
    extra: Any = None,
) -> None:
    """Save ``model`` (and ``optimizer``) to one safetensors file at ``path``, atomically.

    The file appears complete or not at all (:func:`miniresnet.files.write_atomic`): it is
    written to a temporary file in the same folder (named after this process; those of killed
    processes are removed by the next save to ``path``), flushed to disk and renamed onto
    ``path``. If anything fails, an existing file at ``path`` is left as it was and no temporary
    file remains. The name is used as given; use the suffix ``.safetensors`` (the format is
    safetensors whatever the suffix).

    Parameters
    ----------
    path : str or os.PathLike
        Target file; its folder must exist.
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
        If the folder is missing or ``path`` is a folder.
    OSError
        If the file cannot be written (the message names the folder).
    """
    path = Path(path)
    if not isinstance(model, Module):
        raise TypeError(f"save_checkpoint: model must be a miniresnet Module, got "
                        f"{type(model).__name__}")
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int | np.integer)):
        raise TypeError(f"save_checkpoint: epoch must be an int or None, got {epoch!r}")
    if path.is_dir():
        raise IsADirectoryError(f"save_checkpoint: {str(path)!r} is a directory; give a file "
                                f"path such as {str(path / 'checkpoint.safetensors')!r}")
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
    metadata = {"miniresnet": json.dumps(meta), "sha256": _digest(meta, arrays)}
    write_atomic(path, safetensors.numpy.save(arrays, metadata=metadata))


# ----------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------

Specs = dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, dtype name), before reading


def _fail(path: Path, message: str) -> CheckpointError:
    return CheckpointError(f"load_checkpoint: {str(path)!r} {message}")


def _parse_meta(text: Any, path: Path, version: int) -> dict:
    """The metadata object, its structure checked (not yet the config)."""
    try:
        meta = json.loads(text)
    except (TypeError, ValueError, RecursionError):
        raise _fail(path, "is not a miniresnet checkpoint: it has no readable 'miniresnet' "
                          "metadata (a JSON object)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise _fail(path, f"is not a miniresnet checkpoint: its metadata has format "
                          f"{short_repr(found)}, expected {FORMAT!r}")
    if meta.get("version") != version:
        raise _fail(path, f"has checkpoint format version {short_repr(meta.get('version'))} in "
                          f"a file of version {version} (safetensors: 2, .npz: 1); was it "
                          f"written by a newer miniresnet?")
    keys, kinds, epoch = meta.get("model_keys"), meta.get("optimizer"), meta.get("epoch")
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)
            and len(set(keys)) == len(keys)):
        raise _fail(path, "has corrupt metadata: 'model_keys' must be a list of distinct names")
    if kinds is not None and not (
        isinstance(kinds, dict) and all(v in _KINDS for v in kinds.values())
    ):
        raise _fail(path, f"has corrupt metadata: 'optimizer' must map keys to one of "
                          f"{list(_KINDS)}")
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int)):
        raise _fail(path, "has corrupt metadata: 'epoch' must be an int or null")
    if meta.get("config") is not None and not isinstance(meta["config"], dict):
        raise _fail(path, "has corrupt metadata: 'config' must be an object or null")
    return meta


def _check_entries(meta: dict, specs: Specs, path: Path, rebuild: bool) -> None:
    """The stored tensors are those the metadata lists and, when the model is to be rebuilt,
    those its config implies: checked from the header alone, before any tensor is read."""
    kinds = meta["optimizer"] or {}
    expected = {_MODEL + k for k in meta["model_keys"]}
    expected |= {_OPTIMIZER + k for k, kind in kinds.items() if kind != "none"}
    missing, unexpected = sorted(expected - set(specs)), sorted(set(specs) - expected)
    if missing or unexpected:
        found = [f"{what} entries {short_repr(names)}" for what, names in
                 (("missing", missing), ("unexpected", unexpected)) if names]
        raise _fail(path, f"is incomplete or corrupt: {', '.join(found)}")
    if not rebuild:
        return
    if meta["config"] is None:
        raise _fail(path, "has no model config (it was saved from a model without `config`); "
                          "pass the model to load into as model=")
    try:
        config = validate_config(meta["config"])
    except (TypeError, ValueError) as e:
        raise _fail(path, f"has an invalid model config: {e}") from None
    stored = len(meta["model_keys"])
    if (count := state_count(config)) != stored:  # closed form: nothing enumerated yet
        raise _fail(path, f"has a model config that implies {count} state entries, but the file "
                          f"holds {stored}; the config does not describe the stored weights")
    shapes = state_shapes(config)  # bounded now: as many entries as the file holds
    wrong = [f"{name}: config implies {shape} {config['dtype']}, file has "
             f"{short_repr(spec[0])} {spec[1]}" if spec else f"{name}: missing"
             for name, shape in shapes.items()
             if (spec := specs.get(_MODEL + name)) != (shape, config["dtype"])]
    if wrong:
        raise _fail(path, f"has weights that do not match its model config ({len(wrong)} of "
                          f"{stored} entries differ): {'; '.join(wrong[:3])}"
                          f"{'; ...' if len(wrong) > 3 else ''}")


def _read_safetensors(path: Path, check: Callable[[dict, Specs], None]) -> tuple[dict, dict]:
    try:
        with safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
            meta = _parse_meta(metadata.get("miniresnet"), path, version=2)
            slices = {name: f.get_slice(name) for name in f.keys()}
            specs = {name: (tuple(s.get_shape()), _DTYPES.get(s.get_dtype(), s.get_dtype()))
                     for name, s in slices.items()}
            check(meta, specs)
            if bad := [f"{k}: {t}" for k, (_, t) in specs.items() if t not in _DTYPES.values()]:
                raise _fail(path, f"has entries of unsupported dtypes {short_repr(bad)}")
            arrays = {name: f.get_tensor(name) for name in specs}
    except SafetensorError as e:
        raise _fail(path, f"is not a miniresnet checkpoint: it is neither a safetensors file "
                          f"nor a format-1 .npz archive ({e})") from None
    if _digest(meta, arrays) != metadata.get("sha256"):
        raise _fail(path, "does not match the SHA-256 digest stored in it: the file was "
                          "corrupted or edited after it was saved")
    return meta, arrays


def _read_npz(path: Path, check: Callable[[dict, Specs], None]) -> tuple[dict, dict]:
    """A format-1 checkpoint: an uncompressed .npz archive with a JSON 'meta' entry."""
    readers = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}
    try:
        with np.load(path, allow_pickle=False) as archive:
            specs: Specs = {}
            file_size = path.stat().st_size
            for info in archive.zip.infolist():  # headers first: never allocate what they claim
                with archive.zip.open(info) as member:
                    shape, _, dtype = readers[npy_format.read_magic(member)](member)
                    size = member.tell() + math.prod(shape) * dtype.itemsize
                if (info.compress_type != zipfile.ZIP_STORED or size != info.file_size
                        or size > file_size or dtype.hasobject):
                    raise _fail(path, f"has a corrupt entry {info.filename!r}")
                specs[info.filename.removesuffix(".npy")] = (shape, dtype.name)
            meta_shape, meta_dtype = specs.pop("meta", (None, ""))
            if meta_shape != () or not meta_dtype.startswith("str"):  # unicode: "str<bits>"
                raise _fail(path, f"is not a miniresnet checkpoint: it has no 0-d unicode "
                                  f"'meta' entry (found entries {short_repr(sorted(specs))})")
            meta = _parse_meta(str(archive["meta"][()]), path, version=1)
            check(meta, specs)
            arrays = {name: archive[name] for name in specs}
    except CheckpointError:
        raise
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise _fail(path, f"is a corrupt .npz archive ({short_repr(e)})") from None
    warnings.warn(f"load_checkpoint: {str(path)!r} is a format-1 .npz checkpoint, which carries "
                  f"no digest: edits and corruption cannot be detected. Save it again to get a "
                  f"safetensors checkpoint that has one.", UserWarning, stacklevel=3)
    return meta, arrays


def _restore_optimizer_state(
    kinds: dict[str, str], arrays: dict[str, np.ndarray], backend: Backend, path: Path
) -> dict[str, Any]:
    state: dict[str, Any] = {}
    scalars = {"int": ("iu", int), "float": ("f", float), "bool": ("b", bool), "str": ("U", str)}
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
        elif kind == "str" and host.dtype == np.uint8 and host.ndim == 1:  # format 2: UTF-8
            try:
                state[key] = host.tobytes().decode()
            except UnicodeDecodeError:
                raise _fail(path, f"has optimizer entry {key!r} that is not UTF-8") from None
        elif host.ndim == 0 and host.dtype.kind in scalars[kind][0]:
            state[key] = scalars[kind][1](host[()])
        else:
            raise _fail(path, f"has a corrupt optimizer entry {key!r}: a {kind} should be a "
                              f"0-d array, got shape {host.shape} dtype {host.dtype}")
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
    return [f"{k}: model {short_repr(own.get(k))}, checkpoint {short_repr(saved.get(k))}"
            for k in keys if own.get(k) != saved.get(k)]


def load_checkpoint(
    path: str | os.PathLike, model: Module | None = None, optimizer: Any = None
) -> Checkpoint:
    """Load a checkpoint written by :func:`save_checkpoint`.

    The file is untrusted: loading never runs code and never unpickles. Before any tensor is
    read or any layer built, the metadata is checked (format, version, structure), and, when
    the model is rebuilt, its config (known arguments, types and ranges) and the names, shapes
    and dtypes that config implies against the stored tensors. The tensors are then read and
    the SHA-256 digest stored with them verified: it detects corruption and accidental edits,
    not a forger (anyone can recompute it). Last, the weights are loaded strictly (every key,
    shape and dtype must match; nothing is changed if one does not), onto the backend of
    ``model``. The format is recognised from the file's first bytes: a format-1 ``.npz``
    checkpoint loads with a ``UserWarning`` (it has no digest).

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
        (a ``ValueError``) If the file is not a readable miniresnet checkpoint, its config is
        invalid or does not match its weights, its digest does not match, or it does not fit
        the model or the optimiser; the message names the offending entries.
    """
    path = Path(path)
    if model is not None and not isinstance(model, Module):
        raise TypeError(f"load_checkpoint: model must be a miniresnet Module or None, got "
                        f"{type(model).__name__}")
    if not path.exists():
        raise FileNotFoundError(f"load_checkpoint: no such file: {str(path)!r}")
    if not path.is_file():
        raise IsADirectoryError(f"load_checkpoint: {str(path)!r} is not a file")
    with open(path, "rb") as f:
        read = _read_npz if f.read(4) == b"PK\x03\x04" else _read_safetensors
    meta, arrays = read(path, lambda meta, specs: _check_entries(meta, specs, path,
                                                                 rebuild=model is None))
    config = meta["config"]
    given = model is not None
    if model is None:
        model = build_model(config)
    _load_weights(model, {name: arrays[_MODEL + name] for name in meta["model_keys"]}, path)
    if given and (diff := _config_differences(model, config)):
        warnings.warn(f"load_checkpoint: the weights fit, but the model's config differs from "
                      f"the checkpoint's: {'; '.join(diff)}", UserWarning, stacklevel=2)

    kinds = meta["optimizer"]
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
    return Checkpoint(model=model, epoch=meta["epoch"], extra=meta.get("extra"),
                      config=config, optimizer_state=optimizer_state)
