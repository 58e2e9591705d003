"""fit(): real training on digits, reproducibility, resuming from a checkpoint."""

import dataclasses
import math

import numpy as np
import pytest

import miniresnet as mr
from miniresnet import data, nn
from miniresnet import functional as F
from miniresnet.checkpoint import load_checkpoint, save_checkpoint
from miniresnet.nn.module import functional_call
from miniresnet.optim import SGD
from miniresnet.train import DivergenceError, evaluate, fit, main


@pytest.fixture
def digits(backend):
    return data.load_digits(dtype="float64")


def small(seed=0):
    return nn.resnet_cifar(1, width=0.25, in_channels=1, seed=seed)


def subset(d, n_train=256, n_test=64):
    return dataclasses.replace(d, x_train=d.x_train[:n_train, ...], y_train=d.y_train[:n_train],
                               x_test=d.x_test[:n_test, ...], y_test=d.y_test[:n_test])


def test_fit_learns_digits(digits):
    model = small()
    history = fit(model, digits, epochs=3, batch_size=64, lr=0.1, progress=False)
    assert len(history.records) == 3 and len(history.seconds) == 3
    assert history.column("train_loss")[-1] < history.column("train_loss")[0]
    assert history.records[-1]["test_acc"] >= 0.85
    loss, acc = evaluate(model, digits.x_test, digits.y_test)
    assert acc == history.records[-1]["test_acc"] and loss == history.records[-1]["test_loss"]


def test_same_seed_same_history_bit_for_bit(digits):
    runs = [fit(small(), subset(digits), epochs=2, batch_size=64, progress=False).records
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_resume_from_checkpoint_equals_uninterrupted(digits, tmp_path):
    digits = subset(digits)
    kwargs = dict(epochs=3, batch_size=64, lr=0.05, schedule="cosine", progress=False)
    full_model = small()
    full = fit(full_model, digits, **kwargs)
    path = tmp_path / "ckpt.safetensors"
    first = small()
    fit(first, digits, **kwargs, on_epoch_end=lambda e, m, o, h: e == 0 and save_checkpoint(
        path, m, o, epoch=e + 1) or None)
    restored = load_checkpoint(path)
    opt = SGD(restored.model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    load_checkpoint(path, model=restored.model, optimizer=opt)
    rest = fit(restored.model, digits, **kwargs, optimizer=opt, start_epoch=restored.epoch)
    assert rest.records == full.records[1:]
    for a, b in zip(full_model.state_dict().values(), restored.model.state_dict().values()):
        np.testing.assert_array_equal(mr.to_numpy(a), mr.to_numpy(b))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_divergence_is_reported(digits):
    with pytest.raises(FloatingPointError, match="the loss became"):
        fit(nn.mlp(2, 8, in_features=64, out_features=10, norm=False, seed=0),
            _flat(digits), epochs=1, lr=1e6, progress=False)


def _flat(d):
    xp = d.backend.xp
    return type("D", (), {"x_train": xp.reshape(d.x_train, (d.n_train, 64)),
                          "y_train": d.y_train, "x_test": xp.reshape(d.x_test, (d.n_test, 64)),
                          "y_test": d.y_test})()


def test_cli_trains_and_checkpoints(backend, tmp_path, capsys):
    if backend.name != "numpy":
        pytest.skip("the CLI is exercised once")
    path = tmp_path / "run.safetensors"
    main(["--n", "1", "--width", "0.25", "--epochs", "1", "--save", str(path)])
    out = capsys.readouterr().out
    assert "ResNet-8" in out and "final test accuracy" in out
    assert load_checkpoint(path).epoch == 1


def _state(model, optimizer):
    """Host copies of everything a step changes: weights, running statistics, optimiser."""
    host = {k: mr.to_numpy(v) for k, v in model.state_dict().items()}
    host.update({f"opt.{k}": mr.to_numpy(v) if hasattr(v, "shape") else v
                 for k, v in optimizer.state_dict().items()})
    return host


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _one_step_epochs(digits):
    """64 training images in one minibatch: epoch e is exactly step e."""
    return subset(digits, n_train=64, n_test=16)


def _poison(d, row, value):
    """``d`` with every pixel of training image ``row`` set to ``value``."""
    rows = np.arange(d.n_train).reshape(-1, 1, 1, 1) == row
    return dataclasses.replace(d, x_train=d.backend.xp.where(d.backend.asarray(rows), value,
                                                             d.x_train))


def _sgd(model, lr):
    return SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # overflow on the way
@pytest.mark.parametrize("lr,match", [(1e100, "the loss became nan"),
                                      (1e150, "the gradient of stem.0.weight became non-finite")])
def test_divergence_leaves_the_last_good_state(digits, lr, match):
    digits = _one_step_epochs(digits)
    kwargs = dict(batch_size=64, lr=lr, schedule="constant", progress=False)
    model = small()
    opt = _sgd(model, lr)
    with pytest.raises(DivergenceError, match=match) as info:
        fit(model, digits, epochs=50, optimizer=opt, **kwargs)
    e = info.value
    assert e.epoch >= 1 and e.step == 0 and f"at epoch {e.epoch}, step 0" in str(e)
    assert all(p.grad is None for p in opt.params)
    reference = small()
    reference_opt = _sgd(reference, lr)
    fit(reference, digits, epochs=e.epoch, optimizer=reference_opt, **kwargs)  # stops before
    assert reference_opt.steps == opt.steps == e.epoch
    _assert_same_state(_state(model, opt), _state(reference, reference_opt))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # overflow on the way
def test_nan_in_the_data_leaves_the_last_good_state(digits):
    digits = _one_step_epochs(digits)
    kwargs = dict(batch_size=64, lr=0.1, schedule="constant", progress=False)
    model = small()
    opt = _sgd(model, 0.1)
    fit(model, digits, epochs=2, optimizer=opt, **kwargs)
    good = _state(model, opt)
    poisoned = _poison(digits, 7, math.nan)
    with pytest.raises(DivergenceError, match="the loss became nan at epoch 2, step 0"):
        fit(model, poisoned, epochs=3, start_epoch=2, optimizer=opt, **kwargs)
    # the failing forward pass had already updated the batch-norm running statistics
    assert any(k.endswith("running_mean") for k in good)
    _assert_same_state(_state(model, opt), good)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # overflow on the way
def test_nan_in_a_later_minibatch_names_its_step(digits):
    digits = subset(digits, n_train=64, n_test=16)
    poisoned = _poison(digits, 5, math.inf)
    order = [mr.to_numpy(idx).tolist() for idx in
             data.batches(64, 16, np.random.default_rng([0, 0]), backend=digits.backend)]
    step = next(s for s, idx in enumerate(order) if 5 in idx)
    model = small()
    with pytest.raises(DivergenceError, match=f"at epoch 0, step {step};") as info:
        fit(model, poisoned, epochs=1, batch_size=16, progress=False)
    assert info.value.step == step and not math.isfinite(info.value.loss)
    assert all(np.isfinite(mr.to_numpy(v)).all() for v in model.state_dict().values())


class _InterruptedSGD(SGD):
    """Ctrl-C in the middle of the ``at``-th step: one parameter is already updated."""

    def __init__(self, params, at, **kwargs):
        super().__init__(params, **kwargs)
        self.at = at

    def step(self):
        if self.steps + 1 == self.at:
            p = self.params[0]
            p.data = p.raw * 2.0
            raise KeyboardInterrupt
        super().step()


def test_an_interrupted_step_leaves_the_last_good_state(digits):
    digits = _one_step_epochs(digits)
    kwargs = dict(batch_size=64, schedule="constant", progress=False)
    model = small()
    opt = _InterruptedSGD(model.parameters(), at=3, lr=0.1, momentum=0.9)
    with pytest.raises(KeyboardInterrupt):
        fit(model, digits, epochs=5, optimizer=opt, **kwargs)
    reference = small()
    reference_opt = SGD(reference.parameters(), lr=0.1, momentum=0.9)
    fit(reference, digits, epochs=2, optimizer=reference_opt, **kwargs)
    _assert_same_state(_state(model, opt), _state(reference, reference_opt))


@pytest.mark.parametrize("schedule,epoch,error,match", [
    (lambda e: float("nan") if e == 2 else 0.1, 2, ValueError, "must be a finite number >= 0, "
     "got nan"),
    (lambda e: -0.5 * e, 1, ValueError, "must be a finite number >= 0, got -0.5"),
    (lambda e: float("inf"), 0, ValueError, "must be a finite number >= 0, got inf"),
    (lambda e: "0.1", 0, TypeError, r"must be a real number, got '0.1' \(str\)"),
])
def test_every_scheduled_learning_rate_is_checked_before_training(digits, schedule, epoch,
                                                                   error, match):
    model = small()
    before = {k: mr.to_numpy(v) for k, v in model.state_dict().items()}
    with pytest.raises(error, match=f"fit: the learning rate {match} "
                                    rf"\(from schedule <function .*> at epoch {epoch}\)$"):
        fit(model, subset(digits), epochs=4, schedule=schedule, progress=False)
    _assert_same_state({k: mr.to_numpy(v) for k, v in model.state_dict().items()}, before)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(epochs=0), ValueError, "fit: epochs must be >= 1, got 0"),
    (dict(epochs=2.0), TypeError, "fit: epochs must be an int, got 2.0"),
    (dict(batch_size=0), ValueError, "fit: batch_size must be >= 1, got 0"),
    (dict(start_epoch=2), ValueError, "fit: start_epoch=2 leaves nothing to train"),
    (dict(seed=-1), ValueError, "fit: seed must be >= 0, got -1"),
    (dict(lr=float("nan")), ValueError, "fit: lr must be a finite number >= 0, got nan"),
    (dict(momentum=1.0), ValueError, "SGD: momentum must be a finite number >= 0 and < 1"),
    (dict(clip_norm=-1.0), ValueError, "fit: clip_norm must be a finite number > 0, got -1"),
    (dict(clip_value=float("nan")), ValueError, "fit: clip_value must be a finite number > 0"),
])
def test_fit_rejects_bad_arguments(digits, kwargs, error, match):
    with pytest.raises(error, match=match):
        fit(small(), subset(digits), **{"epochs": 2, "progress": False, **kwargs})


def _global_grad_norm(model, xb, yb):
    """The global L2 norm of the mean cross-entropy's parameter gradients, by mr.grad."""
    names = [n for n, _ in model.named_parameters()]
    arrays = [p.raw for p in model.parameters()]

    def loss(*ps):
        return F.cross_entropy(functional_call(model, dict(zip(names, ps)), xb), yb)

    gs = mr.grad(loss, argnums=tuple(range(len(arrays))))(*arrays)
    return math.sqrt(sum(float(np.sum(mr.to_numpy(g) ** 2)) for g in gs))


@pytest.mark.parametrize("clip_norm", [None, 0.05])
def test_every_step_records_its_loss_and_unclipped_gradient_norm(digits, clip_norm):
    """Per step, History keeps the minibatch loss and the gradient norm before clipping; with
    clip_norm the step taken is the gradient scaled to that norm."""
    digits = subset(digits, n_train=96, n_test=16)
    model = nn.mlp(2, 16, in_features=64, out_features=10, norm=False, seed=1)
    flat = _flat(digits)
    lr = 0.2
    opt = SGD(model.parameters(), lr=lr)
    before = {k: mr.to_numpy(v) for k, v in model.state_dict().items()}
    order = [mr.to_numpy(idx) for idx in
             data.batches(96, 32, np.random.default_rng([0, 0]), backend=digits.backend)]
    xp = digits.backend.xp
    idx0 = digits.backend.asarray(order[0])
    xb, yb = xp.take(flat.x_train, idx0, axis=0), xp.take(flat.y_train, idx0, axis=0)
    expected = _global_grad_norm(model, xb, yb)
    model.train()
    h = fit(model, flat, epochs=2, batch_size=32, lr=lr, optimizer=opt, schedule="constant",
            clip_norm=clip_norm, progress=False)
    assert len(h.step_loss) == len(h.step_grad_norm) == 2 * len(order)
    assert h.step_grad_norm[0] == pytest.approx(expected, rel=1e-10)
    assert np.mean(h.step_loss[:3]) == pytest.approx(h.records[0]["train_loss"], rel=1e-12)
    if clip_norm is not None:
        assert expected > clip_norm  # the clip bites
        # the first update moved the weights by exactly lr * clip_norm in global norm
        one_step = nn.mlp(2, 16, in_features=64, out_features=10, norm=False, seed=1)
        sub = dataclasses.replace(digits, x_train=digits.x_train[:32, ...],
                                  y_train=digits.y_train[:32])
        fit(one_step, _flat(sub), epochs=1, batch_size=32, lr=lr, momentum=0.0,
            weight_decay=0.0, schedule="constant", clip_norm=clip_norm, progress=False)
        after = {k: mr.to_numpy(v) for k, v in one_step.state_dict().items()}
        moved = math.sqrt(sum(float(np.sum((after[k] - before[k]) ** 2)) for k in before))
        assert moved == pytest.approx(lr * clip_norm, rel=1e-9)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # overflow on the way
def test_divergence_error_carries_the_history_up_to_the_failing_step(digits):
    digits = _one_step_epochs(digits)
    with pytest.raises(DivergenceError) as info:
        fit(small(), digits, epochs=50, batch_size=64, lr=1e100, schedule="constant",
            progress=False)
    e = info.value
    h = e.history
    assert len(h.records) == e.epoch  # the finished epochs
    assert len(h.step_loss) == len(h.step_grad_norm) == e.epoch + 1  # one step per epoch
    assert all(math.isfinite(v) for v in h.step_loss[:-1])
    # the gradients before the failing step are finite, but the sum of their float64 squares
    # may overflow to inf (a 1e197 loss has 1e197 gradients); never NaN
    assert not any(math.isnan(v) for v in h.step_grad_norm[:-1])
    assert not (math.isfinite(h.step_loss[-1]) and math.isfinite(h.step_grad_norm[-1]))
