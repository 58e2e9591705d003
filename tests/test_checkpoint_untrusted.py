"""Checkpoints are files people exchange: a crafted config is rejected before anything is built,
a digest catches corruption and edits, format-1 ``.npz`` files still load (with a warning), and a
save killed mid-write leaves a complete checkpoint and, after the next save, no temporary file.

Self-contained (no helpers imported from other test modules): files are crafted here with
safetensors and NumPy alone, as anyone could."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import itertools
import json
import os
import random
import re
import signal
import subprocess
import time
import tracemalloc
import zipfile

import numpy as np
import pytest
import safetensors.numpy
from safetensors import safe_open

import miniresnet as mr
from miniresnet import nn
from miniresnet.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def small_mlp():
    return nn.mlp(2, 4, in_features=3, out_features=2, residual=True, seed=0)


def small_resnet():
    return nn.resnet_cifar(1, width=0.25, in_channels=1, num_classes=3, dtype="float32", seed=0)


# -- files as anyone can write them -----------------------------------------------------------


def digest(meta, tensors):
    """The documented digest: SHA-256 of the canonical metadata JSON, then of each tensor's
    [name, dtype, shape] and bytes, in name order."""
    h = hashlib.sha256(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        a = tensors[name]
        h.update(json.dumps([name, a.dtype.name, list(a.shape)], separators=(",", ":")).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def read_file(path):
    """(tensors, meta, digest) of a checkpoint, read with safetensors alone."""
    with safe_open(path, framework="numpy") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, json.loads(metadata["miniresnet"]), metadata["sha256"]


def write_file(path, tensors, meta, sha=None):
    """A format-2 checkpoint file; the digest is correct (as a forger would make it) unless
    ``sha`` is given."""
    metadata = {"miniresnet": json.dumps(meta), "sha256": sha or digest(meta, tensors)}
    safetensors.numpy.save_file(tensors, path, metadata=metadata)


def rewrite(path, change, redigest=True):
    """Re-save a checkpoint after ``change(tensors, meta)``; ``redigest=False`` keeps the old
    digest (an accidental edit)."""
    tensors, meta, sha = read_file(path)
    change(tensors, meta)
    write_file(path, tensors, meta, None if redigest else sha)


def metadata(model, config, version, optimizer=None, epoch=None, extra=None):
    return {"format": "miniresnet-checkpoint", "version": version, "config": config,
            "epoch": epoch, "extra": extra, "model_keys": list(model.state_dict()),
            "optimizer": optimizer, "backend": "numpy", "miniresnet_version": "0"}


def write_current(path, model, /, **changes):
    """A format-2 file of ``model``'s weights whose config is edited by ``changes``."""
    tensors = {f"model/{k}": mr.to_numpy(v) for k, v in model.state_dict().items()}
    write_file(path, tensors, metadata(model, {**model.config, **changes}, 2))


def write_legacy(path, model, /, optimizer=None, epoch=None, extra=None, **changes):
    """A format-1 checkpoint, as save_checkpoint wrote them before safetensors: an uncompressed
    .npz with a 0-d unicode JSON 'meta' entry; optimiser scalars as 0-d arrays."""
    arrays = {f"model/{k}": mr.to_numpy(v) for k, v in model.state_dict().items()}
    kinds = None
    if optimizer is not None:
        kinds = {}
        for key, value in optimizer.items():
            kinds[key] = next(kind for kind, types in (
                ("none", type(None)), ("bool", bool), ("int", int), ("float", float),
                ("str", str), ("array", object)) if isinstance(value, types))
            if value is not None:
                dtype = {"int": np.int64, "float": np.float64}.get(kinds[key])
                arrays[f"optimizer/{key}"] = np.array(value, dtype=dtype)
    meta = metadata(model, {**model.config, **changes}, 1, kinds, epoch, extra)
    with open(path, "wb") as f:
        np.savez(f, meta=np.array(json.dumps(meta)), **arrays)


WRITERS = {"safetensors": write_current, "npz": write_legacy}


@contextlib.contextmanager
def deadline(seconds):
    """Abort the block with TimeoutError after ``seconds``: code that builds a crafted model
    fails quickly instead of running for minutes."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def rejected_cheaply(path, match):
    """Load ``path``, expecting a CheckpointError matching ``match`` within a fraction of a
    second and with a tracemalloc peak under 1 MB; returns the message."""
    tracemalloc.start()
    try:
        start = time.perf_counter()
        with deadline(5), pytest.raises(CheckpointError, match=match) as info:
            load_checkpoint(path)
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, f"{peak} bytes allocated"
    assert seconds < 0.5, f"{seconds:.2f} s"
    message = str(info.value)
    assert len(message) < 1000, message
    return message


# -- crafted configs: rejected before anything is built ---------------------------------------


@pytest.mark.parametrize("fmt", list(WRITERS))
@pytest.mark.parametrize("build, changes, match", [
    (small_mlp, {"depth": 200_000},
     r"has a model config that implies 1000008 state entries, but the file holds 18"),
    (small_mlp, {"width": 100_000},
     r"do not match its model config \(17 of 18 entries differ\): stem.weight: config implies "
     r"\(100000, 3\) float64, file has \(4, 3\) float64; stem.bias: .*; \.\.\.$"),
    (small_resnet, {"width": 100_000},
     r"stem.0.weight: config implies \(1600000, 1, 3, 3\) float32, file has \(4, 1, 3, 3\)"),
], ids=["mlp-depth-200000", "mlp-width-100000", "resnet-width-100000"])
def test_crafted_config_is_rejected_before_anything_is_built(backend, tmp_path, fmt, build,
                                                             changes, match):
    path = tmp_path / f"crafted.{fmt}"
    WRITERS[fmt](path, build(), **changes)
    assert path.stat().st_size < 50_000  # a small file asking for a huge model
    rejected_cheaply(path, match)


@pytest.mark.parametrize("fmt", list(WRITERS))
@pytest.mark.parametrize("build, changes, match", [
    (small_mlp, {"depht": 3}, r"mlp: unknown argument\(s\) \['depht'\]; valid: depth, width, "),
    (small_mlp, {"width": "4"}, r"mlp: width must be an int >= 1, got '4' \(str\)"),
    (small_mlp, {"layers": 1.5}, r"mlp: layers must be an int >= 1, got 1.5 \(float\)"),
    (small_mlp, {"residual": "yes"}, r"mlp: residual must be True or False, got 'yes' \(str\)"),
    (small_mlp, {"depth": -1}, "mlp: depth must be an int >= 0, got -1"),
    (small_mlp, {"width": 0}, "mlp: width must be an int >= 1, got 0"),
    (small_mlp, {"width": 10**5000 // 10**4990}, None),  # huge but an int: shapes differ
    (small_mlp, {"beta": float("nan")}, "mlp: beta must be a finite number, got nan"),
    (small_mlp, {"seed": -1}, "mlp: seed must be None or an int >= 0, got -1"),
    (small_mlp, {"dtype": "float16"}, "mlp: unknown dtype 'float16'; valid: float32, float64"),
    (small_mlp, {"activation": "gelu"}, "mlp: unknown activation 'gelu'; valid: relu, tanh, "
                                        "sigmoid"),
    (small_mlp, {"zero_init_residual": True}, "mlp: zero_init_residual needs each residual "
                                              "branch to end with an affine batch norm"),
    (small_mlp, {"model": "vgg"}, "unknown model 'vgg'; valid: resnet_cifar, mlp"),
    (small_resnet, {"n": 0}, "resnet_cifar: n must be an int >= 1, got 0"),
    (small_resnet, {"width": 2e6}, r"resnet_cifar: width must be a number > 0 and <= 1e\+06"),
    (small_resnet, {"width": float("inf")}, "resnet_cifar: width must be a number > 0"),
    (small_resnet, {"shortcut": "identity"}, "resnet_cifar: identity shortcut impossible"),
    (small_resnet, {"block": "bottleneck"}, "resnet_cifar: unknown block 'bottleneck'; valid: "
                                            "basic, highway"),
])
def test_invalid_config_is_a_clear_bounded_error(backend, tmp_path, fmt, build, changes, match):
    path = tmp_path / f"bad.{fmt}"
    WRITERS[fmt](path, build(), **changes)
    if match is None:
        rejected_cheaply(path, "do not match its model config")
    else:
        rejected_cheaply(path, "has an invalid model config: " + match)


@pytest.mark.parametrize("fmt", list(WRITERS))
@pytest.mark.parametrize("changes, match", [
    ({"junk": "x" * 1_000_000}, r"mlp: unknown argument\(s\) \['junk'\]; valid: depth"),
    ({"model": ["x" * 1_000_000]}, r"unknown model \['xxx"),
    ({"width": list(range(100_000))}, r"mlp: width must be an int >= 1, got \[0, 1, 2"),
])
def test_huge_config_gives_a_short_message(backend, tmp_path, fmt, changes, match):
    path = tmp_path / f"huge.{fmt}"
    WRITERS[fmt](path, small_mlp(), **changes)
    with pytest.raises(CheckpointError, match="has an invalid model config: " + match) as info:
        load_checkpoint(path)
    assert len(str(info.value)) < 1000


def test_missing_required_argument(backend, tmp_path):
    path = tmp_path / "c.safetensors"
    write_current(path, small_mlp())
    rewrite(path, lambda t, m: m["config"].pop("width"))
    rejected_cheaply(path, "invalid model config: mlp: missing required argument 'width'")


def test_constructors_validate_through_the_same_function(backend):
    cases = [
        (lambda: nn.mlp(2, 0), ValueError, "mlp: width must be an int >= 1, got 0"),
        (lambda: nn.mlp(-1, 4), ValueError, "mlp: depth must be an int >= 0, got -1"),
        (lambda: nn.mlp(2, 4, residual="yes"), TypeError, "mlp: residual must be True or False"),
        (lambda: nn.mlp(2, 4, layers=0), ValueError, "mlp: layers must be an int >= 1, got 0"),
        (lambda: nn.mlp(2, 4, dtype="int64"), ValueError, "unknown dtype 'int64'"),
        (lambda: nn.mlp(2, 4, seed=-3), ValueError, "seed must be None or an int >= 0, got -3"),
        (lambda: nn.resnet_cifar(0), ValueError, "resnet_cifar: n must be an int >= 1, got 0"),
        (lambda: nn.resnet_cifar(1, width=float("nan")), ValueError, "width must be a number > 0"),
        (lambda: nn.resnet_cifar(1, width=-1), ValueError, "width must be a number > 0"),
        (lambda: nn.resnet_cifar(1.0), TypeError, r"n must be an int >= 1, got 1.0 \(float\)"),
        (lambda: nn.resnet_cifar(1, beta=float("inf")), ValueError, "beta must be a finite"),
        (lambda: nn.resnet_cifar(1, shortcut="identity"), ValueError, "identity shortcut"),
        (lambda: nn.resnet_cifar(1, block="highway", zero_init_residual=True), ValueError,
         "zero_init_residual needs .* got block='highway'"),
        (lambda: nn.build_model({"model": "mlp", "depth": 1, "width": 2, "bogus": 1}), TypeError,
         r"mlp: unknown argument\(s\) \['bogus'\]"),
    ]
    for make, error, match in cases:
        with pytest.raises(error, match=match):
            make()
    # the complete config, defaults filled in, is what the constructors store
    from miniresnet.nn.models import validate_config

    assert validate_config({"model": "mlp", "depth": 2, "width": 4}) == nn.mlp(2, 4).config
    assert nn.mlp(0, 4, zero_init_residual=True).config["depth"] == 0  # no block to zero


# -- the closed-form state shapes can never drift from the models ------------------------------


def configs():
    """Every option of both models (highway blocks ignore order, residual and skipinit)."""
    for order, norm, residual, shortcut, block, skipinit in itertools.product(
            nn.ORDERS, (True, False), (True, False), ("projection", "zero_pad", "identity"),
            ("basic", "highway"), (None, 0.5)):
        if shortcut == "identity" and (residual or block == "highway"):
            continue
        yield dict(model="resnet_cifar", n=1, width=0.25, in_channels=2, num_classes=3,
                   order=order, norm=norm, residual=residual, shortcut=shortcut, block=block,
                   skipinit=skipinit)
    yield dict(model="resnet_cifar", n=2, width=0.01, dtype="float32")  # one channel throughout
    yield dict(model="resnet_cifar", n=3, width=1 / 16, zero_init_residual=True)
    yield dict(model="resnet_cifar", n=2, width=0.25, init="fixup", norm=False, lam=0.5)
    for order, norm, residual, layers, skipinit, depth in itertools.product(
            nn.ORDERS, (True, False), (True, False), (1, 2, 3), (None, 0.0), (1, 2)):
        yield dict(model="mlp", depth=depth, width=3, in_features=2, out_features=5, order=order,
                   norm=norm, residual=residual, layers=layers, skipinit=skipinit)
    yield dict(model="mlp", depth=0, width=3)
    yield dict(model="mlp", depth=3, width=2, dtype="float32", zero_init_residual=True,
               order="post")
    # the activations (CReLU doubles what the layers it feeds take), looks-linear, bias init
    for order, norm, residual, shortcut, activation in itertools.product(
            ("relu_preact", "full_preact"), (True, False), (True, False),
            ("projection", "zero_pad"), ("crelu", "leaky_relu", "identity")):
        yield dict(model="resnet_cifar", n=1, width=0.25, in_channels=2, num_classes=3,
                   order=order, norm=norm, residual=residual, shortcut=shortcut,
                   activation=activation, bias_init=0.0 if norm else 0.1,
                   init="looks_linear" if activation == "crelu" and (
                       order, shortcut) != ("full_preact", "zero_pad") else "he")
    for order, norm, residual, layers, depth in itertools.product(
            ("relu_preact", "full_preact"), (True, False), (True, False), (1, 2), (0, 2)):
        yield dict(model="mlp", depth=depth, width=3, in_features=2, out_features=5, order=order,
                   norm=norm, residual=residual, layers=layers, activation="crelu",
                   init="looks_linear" if layers == 1 else "fixup", bias_init=0.1)
    yield dict(model="mlp", depth=2, width=3, order="post", norm=False, activation="leaky_relu",
               bias_init=0.5)
    yield dict(model="resnet_cifar", n=1, width=0.25, block="highway", norm=False,
               activation="identity", bias_init=0.2)


def test_closed_form_state_shapes_equal_the_built_models(backend):
    from miniresnet.nn.models import state_count, state_shapes

    n = 0
    for config in configs():
        model = nn.build_model(config)
        built = [(name, tuple(v.shape)) for name, v in model.state_dict().items()]
        assert list(state_shapes(config).items()) == built, config
        assert state_count(config) == len(built), config
        dtype = backend.dtype(config.get("dtype", "float64"))
        assert all(v.dtype == dtype for v in model.state_dict().values())
        n += 1
    assert n > 300


def test_state_count_is_closed_form(backend):
    from miniresnet.nn.models import state_count

    start = time.perf_counter()
    assert state_count({"model": "mlp", "depth": 10**12, "width": 4}) == 5 * 10**12 + 8
    assert state_count({"model": "resnet_cifar", "n": 10**12}) == 30 * 10**12 + 17
    assert time.perf_counter() - start < 0.1


# -- the digest: corruption and accidental edits --------------------------------------------------


@pytest.mark.parametrize("key, value", [("residual", False), ("beta", 0.5),
                                        ("activation", "tanh"), ("lam", 2.0)])
def test_config_edit_with_unchanged_shapes_is_caught(backend, tmp_path, key, value):
    path = tmp_path / "c.safetensors"
    model = small_mlp()
    save_checkpoint(path, model)
    rewrite(path, lambda t, m: m["config"].update({key: value}), redigest=False)
    match = "does not match the SHA-256 digest stored in it: the file was corrupted or edited"
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path, model=small_mlp())


@pytest.mark.parametrize("where", [0.0, 0.5, 1.0])
def test_flipped_byte_in_an_array_is_caught(backend, tmp_path, where):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, small_resnet(), epoch=1)
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")  # the tensors follow the header
    data[start + round(where * (len(data) - 1 - start))] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the SHA-256 digest"):
        load_checkpoint(path)


# -- format 1: .npz checkpoints still load, with a warning ---------------------------------------


def test_legacy_npz_checkpoint_loads_with_a_warning(backend, tmp_path):
    path = tmp_path / "old.npz"
    model = small_resnet()
    rng = np.random.default_rng(0)
    model.load_state_dict({k: (mr.to_numpy(v) + rng.normal(size=v.shape)).astype(np.float32)
                           for k, v in model.state_dict().items()})
    state = {"lr": 0.1, "steps": 3, "nesterov": True, "name": "sgd", "schedule": None,
             "velocity": np.arange(6.0).reshape(2, 3)}
    write_legacy(path, model, state, epoch=5, extra={"history": [1.5]})
    for target in (None, small_resnet()):
        with pytest.warns(UserWarning, match="format-1 .npz checkpoint, which carries no digest: "
                                             "edits and corruption cannot be detected"):
            ckpt = load_checkpoint(path, model=target)
        assert ckpt.epoch == 5 and ckpt.extra == {"history": [1.5]}
        assert ckpt.config == model.config
        for k, v in model.state_dict().items():
            got = ckpt.model.state_dict()[k]
            assert got.dtype == v.dtype
            np.testing.assert_array_equal(mr.to_numpy(got), mr.to_numpy(v))
        opt = ckpt.optimizer_state
        assert {k: (type(v), v) for k, v in opt.items() if k != "velocity"} == {
            k: (type(v), v) for k, v in state.items() if k != "velocity"}
        np.testing.assert_array_equal(mr.to_numpy(opt["velocity"]), state["velocity"])


def rezip(path, replace, compression=zipfile.ZIP_STORED):
    """Rewrite an .npz archive, replacing members by name with the bytes ``replace`` gives."""
    with zipfile.ZipFile(path) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, replace.get(name, data))


def huge_header():
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": "<f8", "fortran_order": False, "shape": (10**6, 10**6)})
    return buffer.getvalue() + bytes(16)


@pytest.mark.parametrize("replace, compression", [
    ({"model/stem.weight.npy": huge_header()}, zipfile.ZIP_STORED),
    ({"meta.npy": huge_header()}, zipfile.ZIP_STORED),
    ({}, zipfile.ZIP_DEFLATED),
], ids=["entry-claims-8-TB", "meta-claims-8-TB", "compressed"])
def test_legacy_npz_entries_are_checked_before_they_are_read(backend, tmp_path, replace,
                                                            compression):
    path = tmp_path / "old.npz"
    write_legacy(path, small_mlp())
    rezip(path, replace, compression)
    rejected_cheaply(path, r"old.npz' has a corrupt entry '(model/stem.weight|meta).npy'")


# -- temporary files: named after their process, removed once it is gone ---------------------------


def test_next_save_removes_temporaries_of_dead_processes_only(backend, tmp_path, monkeypatch):
    path = tmp_path / "ckpt.safetensors"
    gone = subprocess.Popen(["true"])
    gone.wait()  # a process id that no longer exists
    dead = f".ckpt.safetensors.{gone.pid}.0a1b2c3d.tmp"
    alive = f".ckpt.safetensors.{os.getpid()}.0a1b2c3d.tmp"  # perhaps a save in progress
    other = f".other.safetensors.{gone.pid}.0a1b2c3d.tmp"  # another checkpoint's
    for name in (dead, alive, other):
        (tmp_path / name).write_bytes(b"partial")
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: renamed.append(a) or real_replace(a, b))
    save_checkpoint(path, small_mlp())
    assert sorted(os.listdir(tmp_path)) == sorted([path.name, alive, other])
    assert re.fullmatch(rf"\.ckpt\.safetensors\.{os.getpid()}\.[0-9a-f]+\.tmp",
                        os.path.basename(renamed[0]))


def slow(fsync):
    return lambda fd: time.sleep(0.002) or fsync(fd)


def test_kill_9_mid_write_leaves_a_complete_checkpoint_and_no_temporaries(backend, tmp_path):
    path = tmp_path / "ckpt.safetensors"
    model = nn.mlp(3, 128, in_features=16, seed=0)  # about 0.5 MB
    rng = random.Random(0)
    mid_write = 0
    for kill in range(20):
        pid = os.fork()
        if pid == 0:  # the child saves again and again until it is killed
            try:
                os.fsync = slow(os.fsync)  # a slow disk: most kills land mid-write
                while True:
                    save_checkpoint(path, model, epoch=kill)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.002, 0.04))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status), "the child stopped saving on its own"
        mid_write += any(name != path.name for name in os.listdir(tmp_path))
        if path.exists():  # complete and intact (the digest is verified)
            assert load_checkpoint(path, model=nn.mlp(3, 128, in_features=16)).epoch <= kill
    assert mid_write >= 3, "too few kills landed mid-write to test anything"
    save_checkpoint(path, model, epoch=20)
    assert os.listdir(tmp_path) == [path.name]
    assert load_checkpoint(path).epoch == 20


# -- save errors name the folder -------------------------------------------------------------------


def test_save_errors_name_the_folder_not_the_temporary_file(backend, tmp_path, monkeypatch):
    path = tmp_path / "ckpt.safetensors"
    model = small_mlp()
    real_open = os.open

    def read_only_folder(file, flags, *args, **kwargs):
        if os.path.basename(file).startswith(".ckpt.safetensors."):
            raise PermissionError(errno.EACCES, "Permission denied", file)
        return real_open(file, flags, *args, **kwargs)

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    for name, fake, error in (("open", read_only_folder, PermissionError),
                              ("fsync", disk_full, OSError)):
        with monkeypatch.context() as m:
            m.setattr(os, name, fake)
            with pytest.raises(error) as info:
                save_checkpoint(path, model)
        message = str(info.value)
        assert f"in the folder {str(tmp_path)!r}" in message and ".tmp" not in message, message
        assert os.listdir(tmp_path) == []
    if os.geteuid() != 0:  # root writes anywhere
        os.chmod(tmp_path, 0o500)
        try:
            with pytest.raises(PermissionError, match=f"folder {re.escape(repr(str(tmp_path)))}"):
                save_checkpoint(path, model)
        finally:
            os.chmod(tmp_path, 0o700)
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match=f"directory {re.escape(repr(str(missing)))} "
                                                f"does not exist"):
        save_checkpoint(missing / "c.safetensors", model)
