"""miniresnet.checkpoint: exact round trips, pickle-free files, atomic writes, clear errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
import safetensors.numpy
from test_checkpoint_untrusted import digest, read_file, rewrite

import miniresnet as mr
from miniresnet import nn
from miniresnet.backends import backend_of
from miniresnet.checkpoint import (
    FORMAT_VERSION,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)


def host(x):
    return mr.to_numpy(x)


class StubOptimizer:
    """The optimiser contract: state_dict() -> {str: array | scalar | None}, load_state_dict."""

    def __init__(self, state=None):
        self.state = state or {}

    def state_dict(self):
        return dict(self.state)

    def load_state_dict(self, state):
        if set(state) != set(self.state) and self.state:
            raise KeyError(f"missing {sorted(set(self.state) - set(state))}")
        self.state = dict(state)


MODELS = {
    "resnet": (lambda seed=0: nn.resnet_cifar(1, width=0.5, in_channels=1, dtype="float32",
                                              seed=seed), (4, 1, 8, 8)),
    "mlp": (lambda seed=0: nn.mlp(2, 6, in_features=3, out_features=2, residual=True,
                                  seed=seed), (5, 3)),
}


def inputs(backend, shape, dtype, seed=1):
    return backend.asarray(np.random.default_rng(seed).normal(size=shape).astype(dtype), dtype)


def trained(name, backend, seed=0):
    """A model whose weights and BN statistics differ from any freshly built one."""
    build, shape = MODELS[name]
    model = build(seed)
    dtype = model.config["dtype"]
    rng = np.random.default_rng(seed + 100)
    model.load_state_dict({k: (host(v) + 0.1 * rng.normal(size=v.shape)).astype(dtype)
                           for k, v in model.state_dict().items()})
    model(inputs(backend, shape, dtype, seed=seed + 7))  # train mode: moves the running stats
    return model, inputs(backend, shape, dtype)


def optimizer_state(backend):
    return {
        "lr": 0.1, "momentum": 0.9, "steps": 3, "big": 2**40, "nesterov": False, "flag": True,
        "name": "sgd", "empty": "", "schedule": None, "inf": float("inf"),
        "velocity.0": backend.asarray(np.arange(6.0).reshape(2, 3), "float32"),
        "counts": backend.asarray(np.array([1, 2], dtype=np.int64), "int64"),
        "scalar_array": backend.asarray(np.array(2.5), "float64"),
    }


@pytest.fixture
def path(tmp_path):
    return tmp_path / "ckpt.safetensors"


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_is_bit_identical(backend, path, name):
    model, x = trained(name, backend)
    save_checkpoint(path, model, epoch=4, extra={"history": [1.5, 2.0], "note": "ok"})
    fresh = MODELS[name][0](seed=5)
    for loaded in (load_checkpoint(path).model, load_checkpoint(path, model=fresh).model):
        model, _ = trained(name, backend)  # the same again: the last pass moved its statistics
        assert loaded.config == model.config | ({"seed": 5} if loaded is fresh else {})
        own, back = model.state_dict(), loaded.state_dict()
        assert list(own) == list(back)
        for k in own:
            assert backend_of(back[k]) is backend
            assert back[k].dtype == own[k].dtype
            np.testing.assert_array_equal(host(back[k]), host(own[k]))
        for train in (False, True):
            model.train(train)
            loaded.train(train)
            np.testing.assert_array_equal(host(loaded(x).raw), host(model(x).raw))
        initial = MODELS[name][0]().state_dict()
        assert all(not np.array_equal(host(b), host(initial[k]))
                   for k, b in loaded.named_buffers())  # the statistics were restored too
    ckpt = load_checkpoint(path)
    assert isinstance(ckpt, Checkpoint)
    assert ckpt.epoch == 4 and ckpt.extra == {"history": [1.5, 2.0], "note": "ok"}
    assert ckpt.config == model.config and ckpt.optimizer_state is None


def test_optimizer_state_round_trips_with_types(backend, path):
    model, _ = trained("mlp", backend)
    state = optimizer_state(backend)
    save_checkpoint(path, model, StubOptimizer(state), epoch=0)
    target = StubOptimizer()
    ckpt = load_checkpoint(path, optimizer=target)
    assert target.state.keys() == state.keys() and list(ckpt.optimizer_state) == list(state)
    for key, value in state.items():
        got = target.state[key]
        if value is None or isinstance(value, int | float | bool | str):
            assert type(got) is type(value) and got == value, key
        else:
            assert backend_of(got) is backend and got.dtype == value.dtype and got.shape == \
                value.shape
            np.testing.assert_array_equal(host(got), host(value))
    assert ckpt.epoch == 0


def test_file_is_a_safetensors_file_with_a_digest(backend, path):
    model, _ = trained("resnet", backend)
    save_checkpoint(path, model, StubOptimizer(optimizer_state(backend)), extra=[1, "a"])
    tensors, meta, sha = read_file(path)
    assert sha == digest(meta, tensors)
    assert meta["format"] == "miniresnet-checkpoint" and meta["version"] == FORMAT_VERSION == 2
    assert meta["config"] == model.config and meta["extra"] == [1, "a"]
    assert meta["model_keys"] == list(model.state_dict())
    assert meta["optimizer"]["lr"] == "float" and meta["optimizer"]["schedule"] == "none"
    assert {k for k in tensors if k.startswith("model/")} == {
        f"model/{k}" for k in model.state_dict()}
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(tensors[f"model/{k}"], host(v))
    assert "optimizer/schedule" not in tensors and tensors["optimizer/steps"].dtype == np.int64
    assert tensors["optimizer/name"].tobytes() == b"sgd" and tensors["optimizer/lr"].shape == ()
    header = int.from_bytes(path.read_bytes()[:8], "little")  # the safetensors layout
    assert path.read_bytes()[8:9] == b"{" and 8 + header < path.stat().st_size


def test_strings_round_trip_exactly(backend, path):
    model, _ = trained("mlp", backend)
    state = {"a": "", "b": "x\x00", "c": "ünïcødé \u2603", "d": "\x00"}
    save_checkpoint(path, model, StubOptimizer(state))
    assert load_checkpoint(path).optimizer_state == state


def test_model_without_config_and_numpy_values(backend, path):
    model = nn.Sequential(nn.Linear(2, 3, rng=0), nn.BatchNorm1d(3))
    save_checkpoint(path, model, StubOptimizer({"x": np.ones(2), "n": np.int64(3)}),
                    extra={"loss": np.float32(0.5)})
    with pytest.raises(CheckpointError, match="has no model config .* pass the model to load "
                                              "into as model="):
        load_checkpoint(path)
    other = nn.Sequential(nn.Linear(2, 3, rng=1), nn.BatchNorm1d(3))
    ckpt = load_checkpoint(path, model=other)
    assert ckpt.extra == {"loss": 0.5} and ckpt.optimizer_state["n"] == 3
    assert type(ckpt.optimizer_state["n"]) is int
    np.testing.assert_array_equal(host(other[0].weight.raw), host(model[0].weight.raw))


# -- atomic writes ----------------------------------------------------------------------------


def failing_fsync(monkeypatch):
    """The disk fails after the data was written to the temporary file, before the rename."""
    def fsync(fd):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(os, "fsync", fsync)


def test_crash_mid_save_keeps_the_old_checkpoint(backend, path, monkeypatch):
    model, _ = trained("mlp", backend)
    save_checkpoint(path, model, epoch=1)
    before = path.read_bytes()
    other, _ = trained("mlp", backend, seed=3)
    failing_fsync(monkeypatch)
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_checkpoint(path, other, epoch=2)
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == [path.name]
    monkeypatch.undo()
    assert load_checkpoint(path).epoch == 1


def test_crash_mid_save_leaves_no_file(backend, path, monkeypatch):
    model, _ = trained("mlp", backend)
    failing_fsync(monkeypatch)
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_checkpoint(path, model)
    assert os.listdir(path.parent) == []


def test_interrupt_during_fsync_or_rename_cleans_up(backend, path, monkeypatch):
    model, _ = trained("mlp", backend)
    save_checkpoint(path, model, epoch=1)
    before = path.read_bytes()
    for name in ("fsync", "replace"):
        def boom(*args, **kwargs):
            raise KeyboardInterrupt
        with monkeypatch.context() as m:
            m.setattr(os, name, boom)
            with pytest.raises(KeyboardInterrupt):
                save_checkpoint(path, model, epoch=2)
        assert path.read_bytes() == before and os.listdir(path.parent) == [path.name]


def test_overwrite_keeps_permissions(backend, path):
    model, _ = trained("mlp", backend)
    save_checkpoint(path, model)
    os.chmod(path, 0o640)
    save_checkpoint(path, model, epoch=9)
    assert path.stat().st_mode & 0o777 == 0o640 and load_checkpoint(path).epoch == 9


@pytest.mark.parametrize("kwargs, match", [
    ({"extra": {"f": print}}, "extra must be JSON-serialisable .* cannot store "
                              "builtin_function_or_method"),
    ({"optimizer": StubOptimizer({"lst": [1, 2]})},
     "optimizer state 'lst' is a list; valid values are arrays"),
    ({"optimizer": StubOptimizer({3: 1.0})}, "optimizer state keys must be str, got 3"),
    ({"optimizer": StubOptimizer({"s": np.array(["a"])})}, "dtype <U1; valid dtypes: bool"),
    ({"optimizer": StubOptimizer({"c": np.ones(2, complex)})}, "dtype complex128; valid"),
    ({"optimizer": StubOptimizer({"n": 2**70})}, "does not fit in int64"),
    ({"optimizer": object()}, "optimizer must have a state_dict"),
    ({"epoch": 1.5}, "epoch must be an int or None, got 1.5"),
])
def test_unsavable_values_write_nothing(backend, path, kwargs, match):
    model, _ = trained("mlp", backend)
    with pytest.raises(TypeError if "int64" not in match else ValueError, match=match):
        save_checkpoint(path, model, **kwargs)
    assert os.listdir(path.parent) == []


def test_save_path_errors(backend, tmp_path):
    model, _ = trained("mlp", backend)
    with pytest.raises(IsADirectoryError, match="is a directory; give a file path"):
        save_checkpoint(tmp_path, model)
    with pytest.raises(FileNotFoundError, match="directory .*missing.* does not exist"):
        save_checkpoint(tmp_path / "missing" / "c.safetensors", model)
    with pytest.raises(TypeError, match="model must be a miniresnet Module, got dict"):
        save_checkpoint(tmp_path / "c.safetensors", {})


# -- corrupted, foreign and mismatched files --------------------------------------------------


def test_foreign_and_corrupted_files(backend, path, tmp_path):
    model, _ = trained("mlp", backend)
    with pytest.raises(FileNotFoundError, match="no such file: .*nothere"):
        load_checkpoint(tmp_path / "nothere.safetensors")
    plain = tmp_path / "plain.npz"
    np.savez(plain, w=np.ones(3))
    with pytest.raises(CheckpointError, match=r"not a miniresnet checkpoint: it has no 0-d "
                                              r"unicode 'meta' entry \(found entries \['w'\]\)"):
        load_checkpoint(plain)
    foreign = tmp_path / "foreign.safetensors"
    safetensors.numpy.save_file({"w": np.ones(3)}, foreign)
    with pytest.raises(CheckpointError, match="not a miniresnet checkpoint: it has no readable "
                                              "'miniresnet' metadata"):
        load_checkpoint(foreign)
    text = tmp_path / "text.safetensors"
    text.write_text("not a checkpoint")
    np.save(tmp_path / "one.npy", np.ones(2))
    for name in ("text.safetensors", "one.npy"):
        with pytest.raises(CheckpointError, match=f"{name}' is not a miniresnet checkpoint: it "
                                                  f"is neither a safetensors file nor"):
            load_checkpoint(tmp_path / name)

    save_checkpoint(path, model)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.safetensors"):
        load_checkpoint(truncated)


@pytest.mark.parametrize("change, match", [
    (lambda a, m: m.update(version=99), "format version 99 in a file of version 2"),
    (lambda a, m: m.update(format="other"), "has format 'other', expected 'miniresnet-checkpoint'"),
    (lambda a, m: a.pop("model/stem.weight"), r"missing entries \['model/stem.weight'\]"),
    (lambda a, m: a.update({"model/ghost": np.ones(1)}), r"unexpected entries \['model/ghost'\]"),
    (lambda a, m: a.update({"model/stem.bias": np.ones(2)}),
     r"do not match its model config \(1 of 18 entries differ\): stem.bias: config implies "
     r"\(6,\) float64, file has \(2,\) float64$"),
    (lambda a, m: a.update({"model/stem.bias": a["model/stem.bias"].astype(np.float32)}),
     r"stem.bias: config implies \(6,\) float64, file has \(6,\) float32"),
    (lambda a, m: m.update(model_keys="x"), "'model_keys' must be a list"),
    (lambda a, m: m.update(model_keys=m["model_keys"] * 2), "'model_keys' must be a list of "
                                                            "distinct names"),
    (lambda a, m: m.update(config={"model": "vgg"}), "invalid model config: unknown model 'vgg'"),
    (lambda a, m: m.update(optimizer={"lr": "complex"}), "'optimizer' must map keys"),
    (lambda a, m: a.update({"optimizer/lr": np.ones(2)}) or m.update(optimizer={"lr": "float"}),
     r"corrupt optimizer entry 'lr': a float should be a 0-d array, got shape \(2,\)"),
    (lambda a, m: a.update({"optimizer/s": np.array([255], np.uint8)})
     or m.update(optimizer={"s": "str"}), "optimizer entry 's' that is not UTF-8"),
])
def test_corrupted_checkpoints(backend, path, change, match):
    """Structurally wrong files, even with a correct digest (as a forger would write them)."""
    model, _ = trained("mlp", backend)
    save_checkpoint(path, model)
    rewrite(path, change)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_weights_that_do_not_fit_a_given_model(backend, path):
    model, _ = trained("mlp", backend)
    save_checkpoint(path, model)
    rewrite(path, lambda a, m: a.update({"model/stem.bias": np.ones(2)}))
    with pytest.raises(CheckpointError, match=r"does not fit the model: .*mis-shaped keys "
                                              r"\[stem.bias: expected \(6,\), got \(2,\)\]"):
        load_checkpoint(path, model=MODELS["mlp"][0]())
    rewrite(path, lambda a, m: a.update({"model/stem.bias": np.ones(6, np.float32)}))
    with pytest.raises(CheckpointError, match=r"dtypes that differ from the model's \[stem.bias: "
                                              r"checkpoint float32, model float64\]"):
        load_checkpoint(path, model=MODELS["mlp"][0]())


def test_meta_not_a_checkpoint_string(backend, path):
    safetensors.numpy.save_file({}, path, metadata={"miniresnet": "{not json", "sha256": ""})
    with pytest.raises(CheckpointError, match="no readable 'miniresnet' metadata"):
        load_checkpoint(path)
    with open(path, "wb") as f:
        np.savez(f, meta=np.ones(3))
    with pytest.raises(CheckpointError, match="no 0-d unicode 'meta' entry"):
        load_checkpoint(path)


def test_other_architecture_names_keys_and_changes_nothing(backend, path):
    model, _ = trained("resnet", backend)
    save_checkpoint(path, model)
    mlp = nn.mlp(1, 4)
    before = {k: host(v) for k, v in mlp.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"does not fit the model: .*missing keys \["
                                              r"'stem.weight'.*unexpected keys \['stem.0.weight'"):
        load_checkpoint(path, model=mlp)
    wide = nn.resnet_cifar(1, width=1, in_channels=1, dtype="float32")
    with pytest.raises(CheckpointError, match=r"mis-shaped keys \[stem.0.weight: expected "
                                              r"\(16, 1, 3, 3\), got \(8, 1, 3, 3\)"):
        load_checkpoint(path, model=wide)
    f64 = nn.resnet_cifar(1, width=0.5, in_channels=1, dtype="float64")
    with pytest.raises(CheckpointError, match="checkpoint float32, model float64.*dtype"):
        load_checkpoint(path, model=f64)
    assert all(np.array_equal(host(v), before[k]) for k, v in mlp.state_dict().items())
    fresh = nn.resnet_cifar(1, width=0.5, in_channels=1, dtype="float64").state_dict()
    assert all(np.array_equal(host(v), host(fresh[k])) for k, v in f64.state_dict().items())


def test_config_difference_warns_and_optimizer_errors(backend, path):
    model, _ = trained("mlp", backend)
    save_checkpoint(path, model)
    plain = nn.mlp(2, 6, in_features=3, out_features=2, residual=False)
    with pytest.warns(UserWarning, match="config differs .*residual: model False, checkpoint True"):
        load_checkpoint(path, model=plain)
    with pytest.raises(CheckpointError, match=r"holds no optimizer state \(it was saved with "
                                              r"optimizer=None\)"):
        load_checkpoint(path, optimizer=StubOptimizer())
    save_checkpoint(path, model, StubOptimizer({"lr": 0.1}))
    with pytest.raises(CheckpointError, match=r"does not fit the optimizer: missing \['steps'\]"):
        load_checkpoint(path, optimizer=StubOptimizer({"lr": 0.2, "steps": 0}))
