"""Training loop: minibatch SGD with a progress bar, returning the history as data."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from miniresnet import functional as F
from miniresnet.data import batches
from miniresnet.nn.module import Module
from miniresnet.optim import (
    SGD,
    check_int,
    check_real,
    clip_grad_value_,
    constant_schedule,
    cosine_schedule,
    scale_grads_,
    step_schedule,
)
from miniresnet.tracing import as_tensor, no_grad


class DivergenceError(FloatingPointError):
    """Training met a non-finite loss or gradient; the model and optimiser were left at their
    state after the last good step.

    Attributes
    ----------
    epoch, step : int
        Where it happened (``step`` counts the minibatches of that epoch from 0).
    loss : float
        The loss of the failing minibatch.
    history : History
        The run's history up to the failure: the finished epochs, and the per-step loss and
        gradient norm of every step of this run including the failing one.
    """

    def __init__(self, message: str, epoch: int, step: int, loss: float,
                 history: History | None = None):
        super().__init__(message)
        self.epoch, self.step, self.loss = epoch, step, loss
        self.history = History() if history is None else history


def _checked_loss(loss, params) -> tuple[float, float]:
    """The loss as a float, or NaN unless the loss and every gradient are finite, and the
    gradients' global L2 norm, with one host transfer. The finiteness probe adds ``g · 0`` to
    the loss: it is 0 for finite ``g`` and NaN otherwise, and summing zeros cannot overflow (a
    sum of squares can), so the probe equals the loss exactly when everything is finite. The
    squares are summed in float64, where no finite float32 gradient's square overflows."""
    xp = loss.backend.xp
    wide = xp.float64
    probe, squares = loss.raw, xp.zeros((), dtype=wide, device=loss.backend.device)
    with np.errstate(invalid="ignore", over="ignore"):  # inf · 0 is the point of the probe
        for p in params:
            if p.grad is not None:
                g = p.grad.raw
                probe = probe + xp.sum(g * 0)
                g = xp.astype(g, wide, copy=False)
                squares = squares + xp.sum(g * g)
    both = xp.stack([xp.astype(probe, wide, copy=False), squares])
    value, total = (float(v) for v in loss.backend.to_numpy(both))
    return value, math.sqrt(total) if total == total else math.nan


def _divergence(model, optimizer, loss, epoch: int, step: int,
                history: History) -> DivergenceError:
    value = loss.item()
    if math.isfinite(value):
        names = {id(p): name for name, p in model.named_parameters()}
        bad = next(names.get(id(p), f"parameter {i} of the optimizer")
                   for i, p in enumerate(optimizer.params)
                   if p.grad is not None and not as_tensor(
                       p.backend.xp.all(p.backend.xp.isfinite(p.grad.raw))).item())
        what = f"the gradient of {bad} became non-finite (loss {value})"
    else:
        what = f"the loss became {value}"
    return DivergenceError(
        f"fit: {what} at epoch {epoch}, step {step}; the model and optimizer keep their state "
        "after the previous step. Lower the learning rate, clip gradients (clip_norm=...) or "
        "check the data for NaN/inf", epoch, step, value, history)


@dataclass
class History:
    """Per-epoch metrics (a list of dicts with ``epoch``, ``lr``, ``train_loss``,
    ``train_acc``, ``test_loss``, ``test_acc``), the wall-clock ``seconds`` per epoch and, per
    step, the minibatch loss ``step_loss`` and the global L2 norm of its gradients before any
    clipping ``step_grad_norm`` (inf where its square overflows the dtype). ``instruments``
    maps each instrument's name to its ``(step, value)`` records (see ``fit``'s
    ``instruments``)."""

    records: list[dict] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    step_loss: list[float] = field(default_factory=list)
    step_grad_norm: list[float] = field(default_factory=list)
    instruments: dict[str, list[tuple[int, Any]]] = field(default_factory=dict)

    def column(self, name: str) -> list:
        """One metric over the epochs, e.g. ``history.column("test_acc")``."""
        return [r[name] for r in self.records]

    def __repr__(self) -> str:
        if not self.records:
            return "History(no epochs)"
        last = self.records[-1]
        return (f"History({len(self.records)} epochs, last: train_loss={last['train_loss']:.4f}"
                f", test_acc={last['test_acc']:.4f})")


@dataclass(frozen=True)
class TrainingStep:
    """What an instrument sees of one training step, just after it was taken.

    Read-only: the arrays are the very arrays training uses (updates replace arrays, never
    write into them), so an instrument must not write into them; ``fit`` puts back the
    parameters, buffers, optimiser state, gradients and train/eval modes after the instruments
    ran, whatever they did.

    Attributes
    ----------
    model, optimizer
        The model (holding ``params_after``, in training mode) and the optimiser.
    epoch : int
        The epoch.
    step : int
        The step counted over the whole run, ``epoch · steps_per_epoch + index``.
    index : int
        The step within the epoch, from 0.
    lr : float
        The learning rate of the step.
    x, y : backend arrays
        The minibatch.
    loss : float
        The minibatch loss at ``params_before`` (as in ``History.step_loss``).
    gradients : mapping
        Parameter name -> the gradient of that loss at ``params_before``, before any clipping.
    params_before, params_after : mapping
        Parameter name -> the parameter before and after the step.
    buffers_before : mapping
        Buffer name -> the buffer (batch-norm running statistics) before the step's forward
        pass; the model holds them as updated by it.
    """

    model: Module
    optimizer: SGD
    epoch: int
    step: int
    index: int
    lr: float
    x: Any
    y: Any
    loss: float
    gradients: Mapping[str, Any]
    params_before: Mapping[str, Any]
    params_after: Mapping[str, Any]
    buffers_before: Mapping[str, Any]


def _check_instruments(instruments) -> list:
    """``instruments`` as a list after checking each one's name, ``every`` and call."""
    if instruments is None:
        return []
    if not isinstance(instruments, Sequence) or isinstance(instruments, str):
        raise TypeError(f"fit: instruments must be a list of instruments, got "
                        f"{type(instruments).__name__}")
    seen = set()
    for i, inst in enumerate(instruments):
        what = f"fit: instruments[{i}] ({type(inst).__name__})"
        name = getattr(inst, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{what} has no name: an instrument needs a non-empty str name, a "
                            f"positive int every and a call instrument(step) -> value "
                            f"(see miniresnet.instruments)")
        if name in seen:
            raise ValueError(f"{what}: two instruments are named {name!r}; each records under "
                             "its own name")
        seen.add(name)
        every = getattr(inst, "every", None)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"{what} {name!r}: every must be a positive int (run every that "
                             f"many steps), got {every!r}")
        if not callable(inst):
            raise TypeError(f"{what} {name!r} is not callable; it must be called as "
                            "instrument(step) -> value")
    return list(instruments)


def _instrument(due: list, view: TrainingStep, tensors: list, history: History) -> None:
    """Run the ``due`` instruments on ``view`` and record their values, then put back
    everything of the training state they could have changed."""
    model, optimizer = view.model, view.optimizer
    raws, state = [t.raw for t in tensors], optimizer.state_dict()
    modes = [(m, m.training) for m in model.modules()]
    try:
        for inst in due:
            history.instruments.setdefault(inst.name, []).append((view.step, inst(view)))
    finally:
        for t, raw in zip(tensors, raws):
            if t.raw is not raw:
                t.data = raw
        optimizer.load_state_dict(state)
        for m, training in modes:
            object.__setattr__(m, "training", training)
        for p in (*model.parameters(), *optimizer.params):
            p.grad = None


def _take(xp, a, idx):
    return xp.take(a, idx, axis=0)


def _hits(xp, logits, y):
    """How many rows of ``logits`` put their maximum on the label, as a 0-d device array."""
    return xp.sum(xp.astype(xp.argmax(logits.raw, axis=1) == y, xp.int64))


def evaluate(model: Module, x, y, batch_size: int = 500) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)`` in evaluation mode (NaN for
    both if ``x`` has no rows)."""
    if x.shape[0] == 0:
        return math.nan, math.nan
    was_training = model.training
    model.eval()
    xp = as_tensor(x).backend.xp
    n = x.shape[0]
    loss_sum, correct = 0.0, 0
    try:
        with no_grad():
            for start in range(0, n, batch_size):
                stop = min(n, start + batch_size)  # the array API leaves stops past n undefined
                xb, yb = x[start:stop, ...], y[start:stop]
                logits = model(xb)
                loss_sum += float(F.cross_entropy(logits, yb, reduction="sum").item())
                correct = correct + _hits(xp, logits, yb)  # stays on the device
    finally:
        model.train(was_training)
    return loss_sum / n, as_tensor(correct).item() / n


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
        on_epoch_end: Callable[[int, Module, SGD, History], None] | None = None,
        instruments: Sequence | None = None) -> History:
    """Train ``model`` with minibatch SGD and cross-entropy on ``data`` (a
    :class:`~miniresnet.data.Dataset`).

    Each epoch's shuffle depends only on ``(seed, epoch)``, so the same seed, backend and
    machine give a bit-identical history, and training resumed from a checkpoint at
    ``start_epoch`` (pass the restored ``optimizer``) continues exactly as an uninterrupted run.

    Every argument, and the learning rate the schedule gives for every epoch to be run, is
    checked before training starts. The loss and the gradients are checked before each step:
    if one is not finite, or the step is interrupted (Ctrl-C), the weights, the batch-norm
    running statistics and the optimiser state are put back as they were after the previous
    step.

    Parameters
    ----------
    epochs : int
        The epoch to stop at (training runs ``start_epoch .. epochs-1``; ``start_epoch <
        epochs``).
    lr, momentum, nesterov, weight_decay
        For the :class:`~miniresnet.optim.SGD` made when no ``optimizer`` is given (``lr`` is
        also the schedule's base rate).
    schedule : "cosine" (default), "step", "constant" or callable epoch -> lr
    clip_norm, clip_value : float, optional
        Clip gradients by global norm / by value before each step (finite, > 0).
    seed : int
        Non-negative; the shuffles' seed.
    progress : bool, optional
        Show a tqdm bar; by default only when stderr is a terminal.
    on_epoch_end : callable, optional
        Called as ``on_epoch_end(epoch, model, optimizer, history)`` (e.g. to checkpoint).
    instruments : list, optional
        Measurements taken during training (:mod:`miniresnet.instruments` has built-ins). An
        instrument has a ``name`` (str, unique), ``every`` (int >= 1) and is called as
        ``instrument(step)`` with a :class:`TrainingStep` after every step whose run-wide
        index is a multiple of ``every`` (step 0 included); its return value is appended as
        ``(step, value)`` to ``history.instruments[name]``. They do not change training: the
        parameters, buffers, optimiser state, gradients and modes are put back after them
        (and the shuffles have their own generator), so the weights and history are those of
        a run without them. An instrument that raises stops training after its step.

    Returns
    -------
    History

    Raises
    ------
    DivergenceError
        (a ``FloatingPointError``) When a loss or gradient is not finite; it names the epoch,
        the step within it and the loss.
    """
    epochs = check_int("fit", "epochs", epochs, 1)
    start_epoch = check_int("fit", "start_epoch", start_epoch, 0)
    if start_epoch >= epochs:
        raise ValueError(f"fit: start_epoch={start_epoch} leaves nothing to train with "
                         f"epochs={epochs} (training runs start_epoch .. epochs-1)")
    batch_size = check_int("fit", "batch_size", batch_size, 1)
    seed = check_int("fit", "seed", seed, 0)
    lr = check_real("fit", "lr", lr)
    for name, value in (("clip_norm", clip_norm), ("clip_value", clip_value)):
        if value is not None:
            check_real("fit", name, value, positive=True)
    if optimizer is None:
        optimizer = SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=nesterov,
                        weight_decay=weight_decay)
    elif not isinstance(optimizer, SGD):
        raise TypeError(f"fit: optimizer must be an SGD, got {type(optimizer).__name__}")
    instruments = _check_instruments(instruments)
    lr_at = make_schedule(schedule, lr, epochs, milestones)
    lrs = {}
    for epoch in range(start_epoch, epochs):  # schedules are pure: check them all up front
        value = lr_at(epoch)
        try:
            lrs[epoch] = check_real("fit", "the learning rate", value)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{e} (from schedule {schedule!r} at epoch {epoch})") from None
    x, y = data.x_train, data.y_train
    be = as_tensor(x).backend
    xp = be.xp
    n = x.shape[0]
    if n == 0:
        raise ValueError("fit: data.x_train holds no examples")
    steps = math.ceil(n / batch_size)
    # Updates replace arrays (SGD.step, batch norm's running statistics), so references to the
    # current arrays are a snapshot of the whole training state.
    tensors = list({id(t): t for t in (*model.parameters(), *model.buffers(),
                                       *optimizer.params)}.values())
    history = History()
    named = list(model.named_parameters())
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=(epochs - start_epoch) * steps, disable=not show, unit="step",
               desc="fit", leave=False)
    model.train()
    try:
        for epoch in range(start_epoch, epochs):
            start = time.perf_counter()
            optimizer.lr = lrs[epoch]
            epoch_rng = np.random.default_rng([seed, epoch])  # depends on (seed, epoch) only
            loss_sum, correct = 0.0, 0
            for s, idx in enumerate(batches(n, batch_size, epoch_rng, backend=be)):
                xb, yb = _take(xp, x, idx), _take(xp, y, idx)
                saved = [t.raw for t in tensors], optimizer.state_dict()
                step = epoch * steps + s
                due = [inst for inst in instruments if step % inst.every == 0]
                if due:  # before the forward pass updates the running statistics
                    buffers = {name: b.raw for name, b in model.named_buffers()}
                try:
                    logits = model(xb)
                    loss = F.cross_entropy(logits, yb)
                    loss.backward()
                    if due:  # references: clipping and the step replace arrays, never edit
                        before = {name: p.raw for name, p in named}
                        grads = {name: p.grad.raw if p.grad is not None else xp.zeros_like(p.raw)
                                 for name, p in named}
                    batch_loss, grad_norm = _checked_loss(loss, optimizer.params)
                    history.step_loss.append(batch_loss if math.isfinite(batch_loss)
                                             else loss.item())
                    history.step_grad_norm.append(grad_norm)
                    if not math.isfinite(batch_loss):
                        raise _divergence(model, optimizer, loss, epoch, s, history)
                    if clip_norm is not None and grad_norm > clip_norm:
                        scale_grads_(optimizer.params, clip_norm / (grad_norm + 1e-12))
                    if clip_value is not None:
                        clip_grad_value_(optimizer.params, clip_value)
                    optimizer.step()
                except BaseException:  # a failed or interrupted step leaves no trace
                    for t, raw in zip(tensors, saved[0]):
                        t.data = raw
                    optimizer.load_state_dict(saved[1])
                    raise
                finally:
                    optimizer.zero_grad()
                if due:
                    _instrument(due, TrainingStep(
                        model, optimizer, epoch, step, s, optimizer.lr, xb, yb, batch_loss,
                        MappingProxyType(grads), MappingProxyType(before),
                        MappingProxyType({name: p.raw for name, p in named}),
                        MappingProxyType(buffers)), tensors, history)
                loss_sum += batch_loss * idx.shape[0]
                correct = correct + _hits(xp, logits, yb)  # stays on the device
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{batch_loss:.3f}")
            test_loss, test_acc = evaluate(model, data.x_test, data.y_test)
            history.records.append({"epoch": epoch, "lr": optimizer.lr,
                                    "train_loss": loss_sum / n,
                                    "train_acc": as_tensor(correct).item() / n,
                                    "test_loss": test_loss, "test_acc": test_acc})
            history.seconds.append(time.perf_counter() - start)
            if on_epoch_end is not None:
                on_epoch_end(epoch, model, optimizer, history)
    finally:
        bar.close()
    return history


# -- the command line ---------------------------------------------------------------------------
PROG = "python -m miniresnet.train"
_DEFAULTS = {"n": 3, "order": "post", "width": 1.0, "dtype": "float32", "epochs": 15,
             "batch_size": 128, "lr": 0.1, "weight_decay": 5e-4, "schedule": "cosine", "seed": 0}
_ARCHITECTURE = ("n", "order", "width", "dtype")  # and --plain: taken from a resumed checkpoint
_SCHEDULES = ("cosine", "step", "constant")


def _number(kind: type, low: float, strict: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: text -> finite ``kind`` ``>= low`` (``> low`` if strict)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole' if kind is int else 'a'} "
                                             f"number, got {text!r}") from None
        if not (math.isfinite(value) and (value > low if strict else value >= low)):
            raise argparse.ArgumentTypeError(
                f"must be {'finite and ' * (kind is float)}{'>' if strict else '>='} {low:g}, "
                f"got {text}")
        return value
    return parse


def _schedule(text: str) -> str:
    if text not in _SCHEDULES:
        raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from "
                                         f"{', '.join(_SCHEDULES)})")
    return text


_count, _positive, _non_negative = _number(int, 1), _number(float, 0, True), _number(float, 0)
# how every training setting is read, from the command line or from a resumed checkpoint
_TRAINING = {"epochs": _count, "batch_size": _count, "lr": _non_negative,
             "weight_decay": _non_negative, "schedule": _schedule, "seed": _number(int, 0)}


def _parser() -> argparse.ArgumentParser:
    from miniresnet import nn
    from miniresnet.backend_choice import current_backend
    from miniresnet.backends import BACKEND_NAMES

    p = argparse.ArgumentParser(
        prog=PROG,
        description="Train a CIFAR-style ResNet (or its plain counterpart) on the 8x8 "
                    "handwritten digits with SGD and cross-entropy, printing each epoch's "
                    "metrics.",
        epilog=f"Example: {PROG} --n 1 --width 0.5 --epochs 5 --save run.safetensors, then "
               f"{PROG} --resume run.safetensors --epochs 10 to train on. Ctrl-C stops it (exit "
               f"status 130) after one line saying what was saved.")
    model = p.add_argument_group("model (with --resume, taken from the checkpoint)")
    model.add_argument("--n", type=_count, default=None,
                       help=f"blocks per stage: 6n+2 layers (default: {_DEFAULTS['n']})")
    model.add_argument("--plain", action="store_true", help="the plain counterpart (no "
                       "shortcuts) instead of the ResNet")
    model.add_argument("--order", choices=nn.ORDERS, default=None,
                       help=f"order of the residual block's layers (default: "
                            f"{_DEFAULTS['order']})")
    model.add_argument("--width", type=_positive, default=None,
                       help=f"channel multiplier, > 0 (default: {_DEFAULTS['width']})")
    model.add_argument("--dtype", choices=("float32", "float64"), default=None,
                       help=f"(default: {_DEFAULTS['dtype']})")
    train = p.add_argument_group("training (with --resume, defaults are the checkpoint's run)")
    train.add_argument("--epochs", type=_count, default=None,
                       help=f"train epochs 0 .. EPOCHS-1 (default: {_DEFAULTS['epochs']})")
    train.add_argument("--batch-size", type=_count, default=None,
                       help=f"(default: {_DEFAULTS['batch_size']})")
    train.add_argument("--lr", type=_non_negative, default=None,
                       help=f"base learning rate, >= 0 (default: {_DEFAULTS['lr']})")
    train.add_argument("--weight-decay", type=_non_negative, default=None,
                       help=f"L2 penalty, >= 0 (default: {_DEFAULTS['weight_decay']})")
    train.add_argument("--schedule", choices=_SCHEDULES, default=None,
                       help=f"learning-rate schedule over the epochs (default: "
                            f"{_DEFAULTS['schedule']})")
    train.add_argument("--seed", type=_TRAINING["seed"], default=None,
                       help=f"seeds the split, the initial weights and the shuffles "
                            f"(default: {_DEFAULTS['seed']})")
    p.add_argument("--backend", choices=BACKEND_NAMES, default=current_backend().name,
                   help="array backend (default: %(default)s, from MINIRESNET_BACKEND)")
    p.add_argument("--save", metavar="PATH", default=None,
                   help="write a checkpoint (.safetensors) here after each epoch")
    p.add_argument("--resume", metavar="PATH", default=None,
                   help="continue the run saved in this checkpoint, at the epoch after the "
                        "last one it holds")
    return p


def _check_target(parser: argparse.ArgumentParser, path: str) -> None:
    """Fail now, not after the first epoch, if ``--save`` cannot be written."""
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        parser.error(f"argument --save: {path!r} is a folder; name a file in it")
    if not folder.is_dir():
        parser.error(f"argument --save: the folder {str(folder)!r} of {path!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        parser.error(f"argument --save: the folder {str(folder)!r} is not writable")


def _resume(parser: argparse.ArgumentParser, path: str):
    """The model, optimiser, epoch and training settings saved at ``path``, all checked."""
    from miniresnet.checkpoint import load_checkpoint

    try:
        ckpt = load_checkpoint(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        parser.error(f"argument --resume: {e}")
    config = ckpt.config or {}
    if (config.get("model"), config.get("in_channels"), config.get("num_classes")) != (
            "resnet_cifar", 1, 10):
        parser.error(f"argument --resume: {path!r} holds no digits ResNet made by {PROG}")
    if ckpt.epoch is None or ckpt.optimizer_state is None:
        parser.error(f"argument --resume: {path!r} holds no epoch or no optimizer state")
    optimizer = SGD(ckpt.model.parameters(), momentum=0.9)
    try:
        optimizer.load_state_dict(ckpt.optimizer_state)
    except (KeyError, TypeError, ValueError) as e:
        parser.error(f"argument --resume: {path!r} holds an unusable optimizer state: {e}")
    extra = {} if ckpt.extra is None else ckpt.extra
    stored = extra.get("train", {}) if isinstance(extra, dict) else None
    if not isinstance(stored, dict) or set(stored) - set(_TRAINING):
        parser.error(f"argument --resume: {path!r} has unreadable training settings")
    try:  # checked as if they were typed on the command line
        stored = {k: _TRAINING[k](str(v)) for k, v in stored.items()}
    except argparse.ArgumentTypeError as e:
        parser.error(f"argument --resume: {path!r} has a bad training setting: {e}")
    return ckpt.model, optimizer, ckpt.epoch, stored


def main(argv: list[str] | None = None) -> History:
    """``python -m miniresnet.train``: see ``python -m miniresnet.train --help``.

    Ctrl-C stops it with exit status 130 after one line saying what was saved; a diverging
    run (:class:`DivergenceError`) exits with status 1 and its message. The backend is
    selected for this call only."""
    from miniresnet.backend_choice import use_backend
    from miniresnet.backends import BackendUnavailable

    parser = _parser()
    args = parser.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k in _DEFAULTS and v is not None}
    if args.resume and (clash := [k for k in _ARCHITECTURE if k in given] + ["plain"] * args.plain):
        parser.error(f"argument --resume: the model comes from the checkpoint; do not give "
                     f"{', '.join('--' + k for k in clash)}")
    if args.save:
        _check_target(parser, args.save)
    try:
        backend = use_backend(args.backend)
    except BackendUnavailable as e:
        parser.error(f"argument --backend: {e}")
    progress = {"epoch": 0, "saved": None}  # the epoch under way, the last one saved
    try:
        with backend:
            history = _run(parser, args, given, progress)
    except (KeyboardInterrupt, DivergenceError) as e:
        if progress["saved"] is None:
            saved = "nothing was saved" + ("" if args.save else " (no --save)")
        else:
            saved = (f"{args.save} holds the model after epoch {progress['saved']} (continue "
                     f"with {PROG} --resume {args.save})")
        if isinstance(e, KeyboardInterrupt):
            print(f"interrupted in epoch {progress['epoch']}: {saved}", file=sys.stderr)
            raise SystemExit(130) from None
        print(f"{PROG}: {e}; {saved}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"final test accuracy {history.records[-1]['test_acc']:.4f} in "
          f"{sum(history.seconds):.1f} s")
    return history


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, given: dict,
         progress: dict) -> History:
    """Everything after the command line's own checks: the checkpoint's, then training."""
    from miniresnet import data as datasets
    from miniresnet import nn
    from miniresnet.checkpoint import save_checkpoint

    model, optimizer, start, stored = (_resume(parser, args.resume) if args.resume
                                       else (None, None, 0, {}))
    settings = {**_DEFAULTS, **stored, **given}
    if start >= settings["epochs"]:
        parser.error(f"argument --epochs: the checkpoint already holds {start} epochs; ask for "
                     f"more than {settings['epochs']} to train on")
    progress["epoch"] = start
    if model is None:
        model = nn.resnet_cifar(settings["n"], in_channels=1, num_classes=10,
                                residual=not args.plain, order=settings["order"],
                                width=settings["width"], dtype=settings["dtype"],
                                seed=settings["seed"])
    else:
        optimizer.weight_decay = settings["weight_decay"]
    config = model.config
    data = datasets.load_digits(dtype=config["dtype"], seed=settings["seed"])
    kind = "ResNet" if config["residual"] else "plain"
    where = f"from {args.resume} at epoch {start} " if args.resume else ""
    print(f"{kind}-{6 * config['n'] + 2} ({model.num_parameters():,} parameters) {where}"
          f"on {data!r}", flush=True)

    def report(epoch, model, optimizer, history):
        if args.save:
            save_checkpoint(args.save, model, optimizer, epoch=epoch + 1,
                            extra={"train": {k: settings[k] for k in _TRAINING}})
            progress["saved"] = epoch
        progress["epoch"] = epoch + 1
        r = history.records[-1]
        print(f"epoch {epoch:3d}  lr {r['lr']:.4f}  train loss {r['train_loss']:.4f}  "
              f"train acc {r['train_acc']:.4f}  test acc {r['test_acc']:.4f}  "
              f"({history.seconds[-1]:.1f} s)", flush=True)

    return fit(model, data, epochs=settings["epochs"], batch_size=settings["batch_size"],
               lr=settings["lr"], weight_decay=settings["weight_decay"],
               schedule=settings["schedule"], seed=settings["seed"], optimizer=optimizer,
               start_epoch=start, on_epoch_end=report)


if __name__ == "__main__":
    main()
