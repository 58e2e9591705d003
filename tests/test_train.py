"""fit(): real training on digits, reproducibility, resuming from a checkpoint."""

import dataclasses

import numpy as np
import pytest

import miniresnet as mr
from miniresnet import data, nn
from miniresnet.checkpoint import load_checkpoint, save_checkpoint
from miniresnet.optim import SGD
from miniresnet.train import evaluate, fit, main


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
    path = tmp_path / "ckpt.npz"
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
    path = tmp_path / "run.npz"
    main(["--n", "1", "--width", "0.25", "--epochs", "1", "--save", str(path)])
    out = capsys.readouterr().out
    assert "ResNet-8" in out and "final test accuracy" in out
    assert load_checkpoint(path).epoch == 1
