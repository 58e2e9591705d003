"""SGD, schedules and clipping against hand-computed reference updates."""

import math

import numpy as np
import pytest

import miniresnet as mr
from miniresnet.optim import (
    SGD,
    clip_grad_norm_,
    clip_grad_value_,
    constant_schedule,
    cosine_schedule,
    step_schedule,
)


def _param(backend, values):
    return mr.Tensor(backend.asarray(np.asarray(values, dtype=float), "float64"),
                     requires_grad=True)


@pytest.mark.parametrize("momentum,nesterov,wd", [(0.0, False, 0.0), (0.9, False, 1e-2),
                                                  (0.9, True, 5e-4)])
def test_sgd_matches_reference(backend, momentum, nesterov, wd):
    p = _param(backend, [1.0, -2.0, 0.5])
    opt = SGD([p], lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    w, v = np.array([1.0, -2.0, 0.5]), None
    for _ in range(4):
        loss = mr.sum(p * p * p)  # gradient 3 w^2
        loss.backward()
        opt.step()
        opt.zero_grad()
        g = 3 * w**2 + wd * w
        if momentum:
            v = g if v is None else momentum * v + g
            g = g + momentum * v if nesterov else v
        w = w - 0.1 * g
        np.testing.assert_allclose(mr.to_numpy(p), w, rtol=1e-14)
    assert opt.steps == 4 and p.grad is None


def test_sgd_state_round_trip_and_errors(backend):
    p = _param(backend, [1.0, 2.0])
    opt = SGD([p], lr=0.1, momentum=0.9)
    mr.sum(p * p).backward()
    opt.step()
    state = opt.state_dict()
    q = _param(backend, [1.0, 2.0])
    other = SGD([q], lr=0.5)
    other.load_state_dict({k: (mr.to_numpy(v) if hasattr(v, "shape") else v)
                           for k, v in state.items()})
    assert other.lr == 0.1 and other.momentum == 0.9 and other.steps == 1
    np.testing.assert_array_equal(mr.to_numpy(other.velocity[0]), mr.to_numpy(opt.velocity[0]))
    with pytest.raises(KeyError, match=r"missing \['velocity.0'\]"):
        other.load_state_dict({k: v for k, v in state.items() if k != "velocity.0"})
    with pytest.raises(ValueError, match="Nesterov momentum needs momentum > 0"):
        SGD([p], nesterov=True)
    with pytest.raises(TypeError, match="leaf Tensors with requires_grad=True"):
        SGD([mr.tensor([1.0])])


def test_schedules():
    step = step_schedule(0.1, [10, 15])
    assert [step(e) for e in (0, 9, 10, 14, 15, 30)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    cos = cosine_schedule(0.2, 10)
    assert cos(0) == 0.2 and cos(5) == pytest.approx(0.1) and cos(10) == pytest.approx(0.0)
    assert cos(2) == pytest.approx(0.1 * (1 + math.cos(math.pi * 0.2)))


def test_clipping(backend):
    a, b = _param(backend, [3.0, 0.0]), _param(backend, [0.0, 4.0])
    a.grad, b.grad = a.raw * 1.0, b.raw * 1.0  # gradients (3, 0) and (0, 4): norm 5
    assert clip_grad_norm_([a, b], 1.0) == pytest.approx(5.0)
    np.testing.assert_allclose(mr.to_numpy(a.grad), [0.6, 0.0], rtol=1e-10)
    np.testing.assert_allclose(mr.to_numpy(b.grad), [0.0, 0.8], rtol=1e-10)
    assert clip_grad_norm_([a, b], 10.0) == pytest.approx(1.0)  # below: untouched
    np.testing.assert_allclose(mr.to_numpy(b.grad), [0.0, 0.8], rtol=1e-10)
    b.grad = backend.asarray(np.array([-2.0, 0.5]), "float64")
    clip_grad_value_([b], 1.0)
    np.testing.assert_array_equal(mr.to_numpy(b.grad), [-1.0, 0.5])


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(lr=float("nan")), ValueError, "lr must be a finite number >= 0, got nan"),
    (dict(lr=float("inf")), ValueError, "lr must be a finite number >= 0, got inf"),
    (dict(lr=-0.1), ValueError, "lr must be a finite number >= 0, got -0.1"),
    (dict(lr=True), TypeError, "lr must be a real number, got True"),
    (dict(lr="0.1"), TypeError, "lr must be a real number, got '0.1'"),
    (dict(momentum=-0.1), ValueError, "momentum must be a finite number >= 0 and < 1"),
    (dict(momentum=1.0), ValueError, "momentum must be a finite number >= 0 and < 1, got 1.0"),
    (dict(momentum=float("nan")), ValueError, "momentum must be"),
    (dict(weight_decay=-1e-4), ValueError, "weight_decay must be a finite number >= 0"),
    (dict(weight_decay=float("inf")), ValueError, "weight_decay must be a finite number"),
    (dict(momentum=0.9, nesterov="yes"), TypeError, "nesterov must be a bool, got 'yes'"),
])
def test_sgd_rejects_bad_hyperparameters(backend, kwargs, error, match):
    with pytest.raises(error, match=f"SGD: {match}"):
        SGD([_param(backend, [1.0])], **kwargs)


def test_sgd_checks_every_learning_rate_and_loaded_state(backend):
    p = _param(backend, [1.0, 2.0])
    opt = SGD([p], lr=0.0, momentum=0.5)  # lr 0 is allowed (warm-up schedules start there)
    for bad in (float("nan"), -1.0, float("-inf")):
        with pytest.raises(ValueError, match="SGD: lr must be a finite number >= 0"):
            opt.lr = bad
    assert opt.lr == 0.0
    mr.sum(p * p).backward()
    opt.step()
    before = opt.state_dict()
    for key, bad, error in (("momentum", 1.5, ValueError), ("lr", float("nan"), ValueError),
                            ("steps", -1, ValueError), ("steps", 1.5, TypeError),
                            ("nesterov", 1, TypeError)):
        with pytest.raises(error, match=f"SGD.load_state_dict: {key} must"):
            opt.load_state_dict({**before, key: bad})
        assert opt.state_dict() == before  # a rejected state changes nothing


@pytest.mark.parametrize("make,match", [
    (lambda: step_schedule(float("nan"), [1]), "step_schedule: lr must be a finite number"),
    (lambda: step_schedule(0.1, [1], gamma=-0.5), "step_schedule: gamma must be a finite"),
    (lambda: step_schedule(0.1, [-1]), "step_schedule: milestone must be >= 0, got -1"),
    (lambda: cosine_schedule(-0.1, 10), "cosine_schedule: lr must be a finite number >= 0"),
    (lambda: cosine_schedule(0.1, 10, min_lr=float("inf")), "cosine_schedule: min_lr must"),
    (lambda: constant_schedule(float("inf")), "constant_schedule: lr must be a finite number"),
])
def test_schedules_reject_bad_rates(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("bad", [-1.0, 0.0, float("nan"), float("inf")])
def test_clipping_rejects_bad_thresholds(backend, bad):
    p = _param(backend, [3.0, -4.0])
    p.grad = p.raw * 1.0
    with pytest.raises(ValueError, match=f"clip_grad_norm_: max_norm must be a finite number "
                                         f"> 0, got {bad}"):
        clip_grad_norm_([p], bad)
    with pytest.raises(ValueError, match=f"clip_grad_value_: clip_value must be a finite "
                                         f"number > 0, got {bad}"):
        clip_grad_value_([p], bad)
    with pytest.raises(TypeError, match="clip_grad_value_: clip_value must be a real number"):
        clip_grad_value_([p], True)
    np.testing.assert_array_equal(mr.to_numpy(p.grad), [3.0, -4.0])  # untouched
