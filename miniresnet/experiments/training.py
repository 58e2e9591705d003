"""Shared trained networks: training a network is a cached trial whose result is a checkpoint.

:func:`trained` returns the model a training config describes, trained with
:func:`miniresnet.train.fit`, together with its per-epoch history. Several experiments ask for
the same nets (degradation, lesions, paths, ...), so the result is stored once and loaded after::

    STORE/<key>.safetensors   the trained model, its optimiser state and (in ``extra``) the
                              training config, seed and history (authoritative)
    STORE/<key>.json          the same history as a small JSON record, for people and tools
    STORE/<key>.partial.safetensors   while training: the state after the last finished epoch
    STORE/<key>.epoch<e>.safetensors  snapshots: the state after epoch ``e`` for ``e`` in
                              :data:`SNAPSHOT_EPOCHS` (or asked of :func:`snapshot`)

``key`` is the SHA-256 of the canonical training config, the seed, the backend, the digest of
an ``.npz`` data file's bytes and the code version (the package's, plus a digest of this
module's source). Training checkpoints after every epoch, so a killed run resumes from the
epoch after the last one saved; :func:`~miniresnet.train.fit` makes the resumed run
bit-identical to an uninterrupted one on the same backend and machine. Every file is written
atomically; a lock file (POSIX ``flock``) makes processes that ask for the same net at once
train it once, the others then load it.

Where the store is: :func:`store_at` sets it for a block. The runner
(:func:`miniresnet.experiments.runner.execute`) sets it to ``OUT/.trials/_train`` around every
trial, in whichever process (pool worker, dask worker) the trial runs. Without a store (e.g.
``run_trial`` called directly) :func:`trained` trains and caches nothing.

To share a net, experiments build the same config (:func:`config`) and pass the same seed;
derive that seed from the run's global seed in ``trials(scale, seed)`` and put it in the trial
config, never from ``run_trial``'s own seed (which differs per experiment).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from miniresnet import nn
from miniresnet.checkpoint import load_checkpoint, save_checkpoint
from miniresnet.experiments.keys import canonical, code_version, sha256
from miniresnet.files import write_atomic
from miniresnet.optim import SGD
from miniresnet.train import (
    DivergenceError,
    History,
    fit,  # looked up here at call time: tests count the calls
)

__all__ = ["SNAPSHOT_EPOCHS", "Trained", "config", "current_store", "file_digest", "load_data",
           "net_seed", "snapshot", "store_at", "train_key", "trained"]

_STORE: Path | None = None
SNAPSHOT_EPOCHS = (1, 3)  # every stored net keeps its weights after these epochs (if < epochs)
_TRAINING_KEYS = ("model", "data", "dtype", "epochs", "batch_size", "lr", "momentum",
                  "weight_decay", "schedule", "clip_norm")


@dataclasses.dataclass(frozen=True, eq=False)
class Trained:
    """A trained network: ``model`` (in evaluation mode), ``history`` (fit's per-epoch records:
    epoch, lr, train_loss, train_acc, test_loss, test_acc), ``seconds`` (wall time per epoch,
    of whichever run trained it), ``steps`` (per step: ``{"loss": [...], "grad_norm": [...]}``,
    the minibatch loss and the gradient norm before clipping) and ``cached`` (loaded from the
    store, not trained now)."""

    model: Any
    history: list[dict]
    seconds: list[float]
    steps: dict
    cached: bool


def config(n: int, *, residual: bool = True, width: float = 0.5, epochs: int = 12,
           lr: float = 0.1, batch_size: int = 128, momentum: float = 0.9,
           weight_decay: float = 5e-4, schedule: str = "cosine", data: str = "digits",
           dtype: str = "float32", clip_norm: float | None = None, **model: Any) -> dict:
    """The training config of a CIFAR-style ResNet (``residual=False``: its plain counterpart)
    with ``n`` blocks per stage; ``model`` adds :func:`miniresnet.nn.resnet_cifar` arguments;
    ``clip_norm`` clips the gradients by global norm before each step.
    ``data`` is "digits" (the bundled digits, split with seed 0) or the path of an ``.npz``
    file (:func:`miniresnet.data.load_npz`; its own test set, else 20 % held out, seed 0)."""
    return {"model": {"model": "resnet_cifar", "n": n, "residual": residual, "width": width,
                      **model},
            "data": data, "dtype": dtype, "epochs": epochs, "batch_size": batch_size, "lr": lr,
            "momentum": momentum, "weight_decay": weight_decay, "schedule": schedule,
            "clip_norm": clip_norm}


def net_seed(seed: int, replicate: int = 0) -> int:
    """The training seed of replicate ``replicate`` in a run seeded ``seed`` (< 2**32), the same
    for every experiment (so they share the net)."""
    digest = hashlib.sha256(json.dumps(["trained-net", int(seed), int(replicate)]).encode())
    return int.from_bytes(digest.digest()[:4], "big")


# ---------------------------------------------------------------------------- the store

@contextlib.contextmanager
def store_at(folder: str | os.PathLike | None) -> Iterator[None]:
    """Use ``folder`` (created if needed; ``None``: no caching) as the store inside the block."""
    global _STORE
    previous = _STORE
    _STORE = None if folder is None else Path(folder)
    try:
        yield
    finally:
        _STORE = previous


def current_store() -> Path | None:
    """The store set by :func:`store_at`, or None."""
    return _STORE


def file_digest(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (an .npz data file's part of the store key)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def train_key(cfg: dict, seed: int) -> str:
    """The store key of the net ``cfg`` trained with ``seed`` on the current backend."""
    from miniresnet.backend_choice import current_backend
    data = cfg["data"]
    return sha256(canonical({
        "config": cfg, "seed": int(seed), "backend": current_backend().name,
        "data_sha256": None if data == "digits" else file_digest(data),
        "version": code_version(_this_module())}))


def _this_module():
    import sys

    return sys.modules[__name__]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (POSIX flock; a no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------- training

def _check(cfg: dict) -> dict:
    if not isinstance(cfg, dict) or set(cfg) != set(_TRAINING_KEYS):
        got = sorted(cfg) if isinstance(cfg, dict) else type(cfg).__name__
        raise ValueError(f"trained: a training config has exactly the keys "
                         f"{', '.join(_TRAINING_KEYS)} (see training.config); got {got}")
    if cfg["data"] != "digits" and not str(cfg["data"]).endswith(".npz"):
        raise ValueError(f"trained: data must be 'digits' or the path of an .npz file, got "
                         f"{cfg['data']!r}")
    return json.loads(json.dumps(cfg))  # what a JSON round trip gives (tuples -> lists)


def load_data(data: str, dtype: str):
    """The data set of a training config's ``data`` entry (split with seed 0)."""
    from miniresnet import data as datasets

    if data == "digits":
        return datasets.load_digits(dtype=dtype, seed=0)
    try:
        return datasets.load_npz(data, dtype=dtype, seed=0, test_fraction=0.2)
    except ValueError as e:
        if "already holds a test set" not in str(e):
            raise
        return datasets.load_npz(data, dtype=dtype, seed=0)


def _build(cfg: dict, seed: int, ds):
    shape = tuple(ds.x_train.shape)
    if len(shape) != 4:
        raise ValueError(f"trained: {cfg['model']['model']} needs images (N, C, H, W); the data "
                         f"{ds.name!r} has inputs of shape {shape}")
    model = nn.build_model({"in_channels": shape[1], "num_classes": ds.num_classes,
                            **cfg["model"], "dtype": cfg["dtype"], "seed": int(seed)})
    optimizer = SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                    weight_decay=cfg["weight_decay"])
    return model, optimizer


def _load(path: Path, cfg: dict, seed: int, ds):
    """(model, optimizer, epoch, extra) from the checkpoint at ``path``, or None if it is
    missing, unreadable or belongs to another run."""
    if not path.exists():
        return None
    model, optimizer = _build(cfg, seed, ds)
    try:
        ckpt = load_checkpoint(path, model, optimizer)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    extra = ckpt.extra if isinstance(ckpt.extra, dict) else {}
    if extra.get("training") != cfg or extra.get("seed") != int(seed) \
            or not isinstance(ckpt.epoch, int) or len(extra.get("history", ())) != ckpt.epoch \
            or not isinstance(extra.get("steps"), dict):
        return None
    return model, optimizer, ckpt.epoch, extra


def trained(cfg: dict, seed: int, *, progress: bool = False,
            after_epoch: Callable[[int], None] | None = None) -> Trained:
    """The net ``cfg`` (see :func:`config`) trained with ``seed`` (weights and shuffles).

    With a store set (:func:`store_at`), a finished net is loaded, an interrupted one resumes
    after its last checkpointed epoch, and a new one is trained and checkpointed after every
    epoch. ``after_epoch(epoch)`` is called after each epoch's checkpoint is written (a test
    hook: raising there stops training as a kill would). Raises
    :class:`~miniresnet.train.DivergenceError` if training diverges (nothing final is stored;
    its ``history`` covers the whole run, resumed epochs included).
    """
    cfg = _check(cfg)
    seed = int(seed)
    ds = load_data(cfg["data"], cfg["dtype"])
    store = _STORE
    if store is None:
        return _train(cfg, seed, ds, None, progress, after_epoch)
    store.mkdir(parents=True, exist_ok=True)
    key = train_key(cfg, seed)
    with _locked(store / f"{key}.lock"):
        return _train(cfg, seed, ds, store / key, progress, after_epoch)


def _train(cfg, seed, ds, stem: Path | None, progress, after_epoch) -> Trained:
    final = partial = None
    if stem is not None:
        final = stem.with_name(stem.name + ".safetensors")
        partial = stem.with_name(stem.name + ".partial.safetensors")
        done = _load(final, cfg, seed, ds)
        if done is not None and done[2] == cfg["epochs"]:
            model, _, _, extra = done
            model.eval()
            return Trained(model, extra["history"], extra["seconds"], extra["steps"], True)
        resumed = _load(partial, cfg, seed, ds)
    else:
        resumed = None
    if resumed is not None and resumed[2] < cfg["epochs"]:
        model, optimizer, start, extra = resumed
        before = History(list(extra["history"]), list(extra["seconds"]),
                         list(extra["steps"]["loss"]), list(extra["steps"]["grad_norm"]))
    else:
        model, optimizer = _build(cfg, seed, ds)
        start, before = 0, History()

    def on_epoch_end(epoch, model, optimizer, history):
        if partial is not None:
            extra = _extra(cfg, seed, _joined(before, history))
            save_checkpoint(partial, model, optimizer, epoch=epoch + 1, extra=extra)
            if epoch + 1 in SNAPSHOT_EPOCHS and epoch + 1 < cfg["epochs"]:
                save_checkpoint(_snapshot_path(stem, epoch + 1), model, optimizer,
                                epoch=epoch + 1, extra=extra)
        if after_epoch is not None:
            after_epoch(epoch)

    try:
        history = _fit(model, optimizer, ds, cfg, seed, start, progress, on_epoch_end)
    except DivergenceError as e:
        e.history = _joined(before, e.history)
        raise
    history = _joined(before, history)
    assert len(history.records) == cfg["epochs"]
    extra = _extra(cfg, seed, history)
    if final is not None:
        save_checkpoint(final, model, optimizer, epoch=cfg["epochs"], extra=extra)
        write_atomic(final.with_suffix(".json"), json.dumps(extra, indent=1))
        with contextlib.suppress(OSError):
            partial.unlink()
    model.eval()
    return Trained(model, extra["history"], extra["seconds"], extra["steps"], False)


def _fit(model, optimizer, ds, cfg, seed, start, progress, on_epoch_end) -> History:
    return fit(model, ds, epochs=cfg["epochs"], batch_size=cfg["batch_size"], lr=cfg["lr"],
               momentum=cfg["momentum"], weight_decay=cfg["weight_decay"],
               schedule=cfg["schedule"], clip_norm=cfg["clip_norm"], seed=seed,
               optimizer=optimizer, start_epoch=start, progress=progress,
               on_epoch_end=on_epoch_end)


def _joined(first: History, then: History) -> History:
    """The history of a run resumed after ``first`` that went on with ``then``."""
    return History(first.records + then.records, first.seconds + then.seconds,
                   first.step_loss + then.step_loss, first.step_grad_norm + then.step_grad_norm)


def _extra(cfg: dict, seed: int, history: History) -> dict:
    """What a checkpoint of the store keeps beside the weights (JSON-ready)."""
    return {"training": cfg, "seed": seed, "history": history.records,
            "seconds": history.seconds,
            "steps": {"loss": history.step_loss, "grad_norm": history.step_grad_norm}}


# ---------------------------------------------------------------------------- snapshots

class _Stop(Exception):
    """Raised after the last epoch a snapshot run needs."""


def _snapshot_path(stem: Path, epoch: int) -> Path:
    return stem.with_name(f"{stem.name}.epoch{int(epoch)}.safetensors")


def snapshot(cfg: dict, seed: int, epoch: int):
    """The net ``cfg`` trained with ``seed`` as it was after ``epoch`` epochs of its training
    (0: at initialisation; ``cfg["epochs"]``: :func:`trained`'s net), in evaluation mode.

    With a store, snapshots at :data:`SNAPSHOT_EPOCHS` are kept when the net is trained (so
    asking for one trains the shared net if it is not stored yet); a missing one (a net stored
    without it, or another epoch) is made by training from scratch up to ``epoch`` with the
    full run's schedule (bit-identical to the full run, as resuming is) and stored. Without a
    store it is trained each time."""
    cfg = _check(cfg)
    seed, epoch = int(seed), int(epoch)
    if not 0 <= epoch <= cfg["epochs"]:
        raise ValueError(f"snapshot: epoch must be in 0..{cfg['epochs']}, got {epoch}")
    if epoch == cfg["epochs"]:
        return trained(cfg, seed).model
    ds = load_data(cfg["data"], cfg["dtype"])
    if epoch == 0:
        model, _ = _build(cfg, seed, ds)
        return model.eval()
    store = _STORE
    if store is None:
        return _train_to(cfg, seed, ds, epoch, None)
    stem = store / train_key(cfg, seed)
    if epoch in SNAPSHOT_EPOCHS:
        trained(cfg, seed)  # the shared net; training it now stores its snapshots
    with _locked(store / f"{stem.name}.lock"):
        done = _load(_snapshot_path(stem, epoch), cfg, seed, ds)
        if done is not None and done[2] == epoch:
            return done[0].eval()
        return _train_to(cfg, seed, ds, epoch, stem)


def _train_to(cfg, seed, ds, epoch, stem: Path | None):
    """Train a fresh net for ``epoch`` epochs of ``cfg``'s schedule, storing snapshots."""
    model, optimizer = _build(cfg, seed, ds)

    def on_epoch_end(e, model, optimizer, history):
        if stem is not None and (e + 1 in SNAPSHOT_EPOCHS or e + 1 == epoch):
            save_checkpoint(_snapshot_path(stem, e + 1), model, optimizer, epoch=e + 1,
                            extra=_extra(cfg, seed, history))
        if e + 1 == epoch:
            raise _Stop

    with contextlib.suppress(_Stop):
        _fit(model, optimizer, ds, cfg, seed, 0, False, on_epoch_end)
    return model.eval()
