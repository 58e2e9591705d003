"""Training loop: minibatch SGD with a progress bar, returning the history as data."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from miniresnet import functional as F
from miniresnet.data import batches
from miniresnet.nn.module import Module
from miniresnet.optim import (
    SGD,
    clip_grad_norm_,
    clip_grad_value_,
    constant_schedule,
    cosine_schedule,
    step_schedule,
)
from miniresnet.tracing import make, no_grad


@dataclass
class History:
    """Per-epoch metrics (a list of dicts with ``epoch``, ``lr``, ``train_loss``,
    ``train_acc``, ``test_loss``, ``test_acc``) and, separately, wall-clock ``seconds``."""

    records: list[dict] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def column(self, name: str) -> list:
        """One metric over the epochs, e.g. ``history.column("test_acc")``."""
        return [r[name] for r in self.records]

    def __repr__(self) -> str:
        if not self.records:
            return "History(no epochs)"
        last = self.records[-1]
        return (f"History({len(self.records)} epochs, last: train_loss={last['train_loss']:.4f}"
                f", test_acc={last['test_acc']:.4f})")


def _take(xp, a, idx):
    return xp.take(a, idx, axis=0)


def evaluate(model: Module, x, y, batch_size: int = 500) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)`` in evaluation mode."""
    was_training = model.training
    model.eval()
    xp = make(x).backend.xp
    n = x.shape[0]
    loss_sum, correct = 0.0, 0
    try:
        with no_grad():
            for start in range(0, n, batch_size):
                idx = xp.arange(start, min(n, start + batch_size))
                xb, yb = _take(xp, x, idx), _take(xp, y, idx)
                logits = model(xb)
                loss_sum += float(F.cross_entropy(logits, yb, reduction="sum").item())
                correct += int(xp.sum(xp.astype(xp.argmax(logits.raw, axis=1) == yb, xp.int64)))
    finally:
        model.train(was_training)
    return loss_sum / n, correct / n


def make_schedule(schedule, lr: float, epochs: int, milestones=None) -> Callable[[int], float]:
    """"constant", "cosine", "step" (÷10 at ``milestones``, default at 50% and 75%), or a
    callable epoch -> learning rate."""
    if callable(schedule):
        return schedule
    if schedule in (None, "constant"):
        return constant_schedule(lr)
    if schedule == "cosine":
        return cosine_schedule(lr, epochs)
    if schedule == "step":
        return step_schedule(lr, milestones or (epochs // 2, 3 * epochs // 4))
    raise ValueError(f"unknown schedule {schedule!r}; valid: constant, cosine, step, a callable")


def fit(model: Module, data, *, epochs: int, batch_size: int = 128, lr: float = 0.1,
        momentum: float = 0.9, nesterov: bool = False, weight_decay: float = 5e-4,
        schedule="cosine", milestones=None, clip_norm: float | None = None,
        clip_value: float | None = None, seed: int = 0, optimizer: SGD | None = None,
        start_epoch: int = 0, progress: bool | None = None,
        on_epoch_end: Callable[[int, Module, SGD, History], None] | None = None) -> History:
    """Train ``model`` with minibatch SGD and cross-entropy on ``data`` (a
    :class:`~miniresnet.data.Dataset`).

    Each epoch's shuffle depends only on ``(seed, epoch)``, so the same seed, backend and
    machine give a bit-identical history, and training resumed from a checkpoint at
    ``start_epoch`` (pass the restored ``optimizer``) continues exactly as an uninterrupted run.

    Parameters
    ----------
    epochs : int
        The epoch to stop at (training runs ``start_epoch .. epochs-1``).
    schedule : "cosine" (default), "step", "constant" or callable epoch -> lr
    clip_norm, clip_value : float, optional
        Clip gradients by global norm / by value before each step.
    progress : bool, optional
        Show a tqdm bar; by default only when stderr is a terminal.
    on_epoch_end : callable, optional
        Called as ``on_epoch_end(epoch, model, optimizer, history)`` (e.g. to checkpoint).

    Returns
    -------
    History
    """
    if optimizer is None:
        optimizer = SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=nesterov,
                        weight_decay=weight_decay)
    lr_at = make_schedule(schedule, lr, epochs, milestones)
    x, y = data.x_train, data.y_train
    be = make(x).backend
    xp = be.xp
    n = x.shape[0]
    steps = math.ceil(n / batch_size)
    history = History()
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=(epochs - start_epoch) * steps, disable=not show, unit="step",
               desc="fit", leave=False)
    model.train()
    try:
        for epoch in range(start_epoch, epochs):
            start = time.perf_counter()
            optimizer.lr = lr_at(epoch)
            epoch_rng = np.random.default_rng([seed, epoch])  # depends on (seed, epoch) only
            loss_sum, correct = 0.0, 0
            for s, idx in enumerate(batches(n, batch_size, epoch_rng, backend=be)):
                xb, yb = _take(xp, x, idx), _take(xp, y, idx)
                logits = model(xb)
                loss = F.cross_entropy(logits, yb)
                loss.backward()
                if clip_norm is not None:
                    clip_grad_norm_(optimizer.params, clip_norm)
                if clip_value is not None:
                    clip_grad_value_(optimizer.params, clip_value)
                optimizer.step()
                optimizer.zero_grad()
                batch_loss = float(loss.item())
                if not math.isfinite(batch_loss):
                    raise FloatingPointError(
                        f"fit: the loss became {batch_loss} at epoch {epoch}, step {s}; lower "
                        "the learning rate or clip gradients (clip_norm=...)"
                    )
                loss_sum += batch_loss * idx.shape[0]
                correct += int(xp.sum(xp.astype(xp.argmax(logits.raw, axis=1) == yb, xp.int64)))
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{batch_loss:.3f}")
            test_loss, test_acc = evaluate(model, data.x_test, data.y_test)
            history.records.append({"epoch": epoch, "lr": optimizer.lr,
                                    "train_loss": loss_sum / n, "train_acc": correct / n,
                                    "test_loss": test_loss, "test_acc": test_acc})
            history.seconds.append(time.perf_counter() - start)
            if on_epoch_end is not None:
                on_epoch_end(epoch, model, optimizer, history)
    finally:
        bar.close()
    return history


def main(argv: list[str] | None = None) -> History:
    """``python -m miniresnet.train``: train a CIFAR-style ResNet (or its plain twin) on digits."""
    import argparse

    from miniresnet import data as datasets
    from miniresnet import nn
    from miniresnet.checkpoint import save_checkpoint
    from miniresnet.config import use_backend

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--n", type=int, default=3, help="blocks per stage (6n+2 layers)")
    parser.add_argument("--plain", action="store_true", help="the plain counterpart")
    parser.add_argument("--order", default="post", choices=nn.ORDERS)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--backend", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", default=None, help="write a checkpoint here after each epoch")
    args = parser.parse_args(argv)
    if args.backend:
        use_backend(args.backend)
    data = datasets.load_digits(dtype=args.dtype, seed=args.seed)
    model = nn.resnet_cifar(args.n, in_channels=1, num_classes=data.num_classes,
                            residual=not args.plain, order=args.order, width=args.width,
                            dtype=args.dtype, seed=args.seed)
    kind = "plain" if args.plain else "ResNet"
    print(f"{kind}-{6 * args.n + 2} ({model.num_parameters():,} parameters) on {data!r}")

    def report(epoch, model, optimizer, history):
        r = history.records[-1]
        print(f"epoch {epoch:3d}  lr {r['lr']:.4f}  train loss {r['train_loss']:.4f}  "
              f"train acc {r['train_acc']:.4f}  test acc {r['test_acc']:.4f}  "
              f"({history.seconds[-1]:.1f} s)")
        if args.save:
            save_checkpoint(args.save, model, optimizer, epoch=epoch + 1)

    history = fit(model, data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                  weight_decay=args.weight_decay, seed=args.seed, on_epoch_end=report)
    print(f"final test accuracy {history.records[-1]['test_acc']:.4f} in "
          f"{sum(history.seconds):.1f} s")
    return history


if __name__ == "__main__":
    main()
