"""Test helper: does a measurement leave a model exactly as it was?"""

import contextlib

import numpy as np

import miniresnet as mr
from miniresnet import ops


def snapshot(model):
    """Everything a measurement must leave alone: parameters and buffers, the parameters'
    ``.grad``, every module's train/eval mode and running-statistics switch."""
    return ({k: mr.to_numpy(v) for k, v in model.state_dict().items()},
            [None if p.grad is None else mr.to_numpy(p.grad) for p in model.parameters()],
            [(m.training, getattr(m, "track_running_stats", None)) for m in model.modules()])


def assert_same(a, b):
    assert a[0].keys() == b[0].keys()
    for k in a[0]:
        np.testing.assert_array_equal(a[0][k], b[0][k], err_msg=k)
    assert len(a[1]) == len(b[1])
    for ga, gb in zip(a[1], b[1]):
        assert (ga is None) == (gb is None)
        if ga is not None:
            np.testing.assert_array_equal(ga, gb)
    assert a[2] == b[2]


def with_grads(model, backend):
    """Give every parameter a distinct ``.grad``, so that a test sees whether it changes."""
    for i, p in enumerate(model.parameters()):
        p.grad = mr.Tensor(backend.asarray(np.full(p.shape, 0.5 + i), "float64"))
    return model


@contextlib.contextmanager
def unchanged(model, x, mode):
    """Put ``model`` in ``mode`` ("train" or "eval") with gradients on every parameter, then
    check that the body leaves it exactly as it was."""
    ops.sum(model(x) ** 2).backward()  # every .grad set (and, in train mode, new statistics)
    model.train(mode == "train")
    before = snapshot(model)
    yield model
    assert_same(before, snapshot(model))
