"""The GPU stand-in: on ``array_api_strict_device1`` every array stays on that device and leaves
it only through the backend (see ``tests/conftest.py`` for the checks every test runs under there,
and ``miniresnet.backends`` for the host boundary)."""

import numpy as np
import pytest

import miniresnet as mr
from miniresnet import nn
from miniresnet.backends import backend_of

pytestmark = pytest.mark.backends("array_api_strict_device1")


def test_implicit_host_transfers_are_refused(backend):
    x = mr.tensor([1.5, -2.0]).raw
    assert x.device == backend.device
    with pytest.raises(RuntimeError, match="to a NumPy array"):
        np.asarray(x)
    for convert in (float, int, bool):
        with pytest.raises(RuntimeError, match="implicit device -> host transfer"):
            convert(x[0])
    # the documented boundary: the backend's to_numpy, and Tensor methods built on it
    assert backend.to_numpy(x).tolist() == [1.5, -2.0]
    t = mr.tensor([3.0])
    assert t.numpy().tolist() == [3.0] and t.item() == 3.0 and float(t) == 3.0
    assert mr.to_numpy(t).tolist() == [3.0]


def test_everything_is_created_on_the_device(backend):
    x = mr.tensor([1.0, 2.0])
    made = [x, mr.zeros((2, 3)), mr.ones((4,), dtype="float32"), mr.zeros_like(x, (3,)),
            mr.ones_like(x), mr.full_like(x, 2.0), backend.rng(0).normal(2),
            backend.rng(0).integers(0, 3, 2), backend.asarray(np.ones(2))]
    for i, a in enumerate(made):
        assert (a.raw if isinstance(a, mr.Tensor) else a).device == backend.device, i


def test_devices_meet_only_through_a_transfer(backend):
    cpu = mr.get_backend("array_api_strict")
    x, y = mr.tensor([1.0, 2.0]), cpu.asarray([1.0, 2.0])
    assert backend_of(x.raw) is backend and backend_of(y) is cpu
    with pytest.raises(ValueError, match="different devices"):
        x + y
    moved = mr.to_backend(y, backend.name)
    assert moved.device == backend.device and backend_of(moved) is backend
    assert mr.to_backend(x, "array_api_strict").device == cpu.device
    assert (x + moved).numpy().tolist() == [2.0, 4.0]


def test_a_result_created_off_the_device_is_caught(backend):
    host_ones = mr.Primitive("host_ones", lambda xp, x: xp.ones(x.shape, dtype=x.dtype))
    with pytest.raises(AssertionError, match="host_ones created its result on .*CPU_DEVICE"):
        mr.bind(host_ones, mr.tensor([1.0]))


def _blocks():
    """One block of every kind the constructors offer (tiny)."""
    yield from (nn.BasicBlock(2, 2, order=order, rng=0) for order in nn.ORDERS)
    yield from (nn.DenseBlock(2, 2, order=order, rng=0) for order in nn.ORDERS)
    for shortcut in ("projection", "zero_pad"):
        yield nn.BasicBlock(2, 4, stride=2, shortcut=shortcut, rng=0)
        yield nn.DenseBlock(2, 3, shortcut=shortcut, rng=0)
    yield nn.BasicBlock(2, 2, residual=False, norm=False, activation="tanh", rng=0)
    yield nn.BasicBlock(2, 2, skipinit=0.5, layers=3, activation="sigmoid", rng=0)
    yield nn.HighwayBlock(2, 4, stride=2, rng=0)


def test_every_block_variant_trains_on_the_device(backend):
    rng = backend.rng(1)
    for block in _blocks():
        shape = (3, 2, 4, 4) if isinstance(block, nn.HighwayBlock) or block._conv else (3, 2)
        out = block(mr.tensor(rng.normal(shape)))
        loss = mr.sum(out * out)
        loss.backward()
        assert out.raw.device == backend.device
        for name, p in block.named_parameters():
            assert p.grad is not None and p.grad.shape == p.shape, (block, name)
            assert p.grad.raw.device == backend.device, (block, name)
        for name, b in block.named_buffers():
            assert b.raw.device == backend.device, (block, name)
