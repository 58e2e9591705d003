"""He et al. 2016 (Tables 2-3, Fig. 4): the five orderings of batch norm, ReLU and the addition
in a residual block, trained with the same budget; curves, final accuracy and the gradient
through depth at the end of training."""

from __future__ import annotations

import numpy as np

from miniresnet import inspect, nn
from miniresnet.experiments import training
from miniresnet.experiments.answers import caveat, finite, mean, num, pct, sentence
from miniresnet.experiments.claims import claim, mean_and_spread
from miniresnet.experiments.plots import figure, save

NAME = "orderings"
TITLE = "Does the order of batch norm, ReLU and addition in a block change how a ResNet trains?"
ESTIMATE = {"quick": 1.2, "default": 33.0, "full": 850.0}
SOURCE = "He et al. 2016"
SETUP = (
    "CIFAR-style ResNets (nn.resnet_cifar, 6n+2 layers, projection shortcuts) in each of the "
    "five block orderings of He et al. 2016 (post: the original; BN after addition; ReLU before "
    "addition; ReLU-only pre-activation; full pre-activation), trained in float32 on the bundled "
    "8x8 digits (or the --data file) with the same budget as the degradation nets: SGD with "
    "momentum 0.9, weight decay 5e-4, batch 128, learning rate 0.1 on a cosine schedule (the "
    "'post' net is the degradation experiment's residual net, shared). After training, a "
    "float64 copy of each net in evaluation mode is profiled (inspect.profile) on the whole "
    "test set with its labels: the norm of the gradient of the mean cross-entropy with respect "
    "to each block's output. The claims compare final-epoch test accuracies and are pinned to "
    "the default scale (n = 3, i.e. 20 layers, width 0.5, 12 epochs, one seed); He et al.'s "
    "numbers are for ResNet-110 on CIFAR-10 (test error 6.61 % original, 8.17 % BN after "
    "addition, 7.84 % ReLU before addition, 6.37 % full pre-activation)."
)

_SCALES = {
    "quick": {"n": 1, "width": 0.25, "epochs": 2, "seeds": 1},
    "default": {"n": 3, "width": 0.5, "epochs": 12, "seeds": 1},
    "full": {"n": 18, "width": 0.5, "epochs": 20, "seeds": 3},
}
LABELS = {"post": "original (post-activation)", "bn_after_add": "BN after addition",
          "relu_before_add": "ReLU before addition", "relu_preact": "ReLU-only pre-activation",
          "full_preact": "full pre-activation"}
PAPER_ERROR = {"post": 6.61, "bn_after_add": 8.17, "relu_before_add": 7.84,
               "full_preact": 6.37}  # % test error, ResNet-110, CIFAR-10 (Tables 2-3)
TRAINS = 0.9        # min final test accuracy: every ordering trains (chance is 0.1)
PREACT_MARGIN = -1.0  # pp: full pre-activation may trail the original by at most 1 pp


def net_config(scale: str, order: str, data: str = "digits") -> dict:
    """The training config of the ``order`` net at ``scale``; "post" is left implicit so the
    net is the one :mod:`~miniresnet.experiments.degradation` trains at the same budget."""
    s = _SCALES[scale]
    extra = {} if order == "post" else {"order": order}
    return training.config(s["n"], width=s["width"], epochs=s["epochs"], data=data, **extra)


def trials(scale: str, seed: int, data: str = "digits") -> list[dict]:
    """One trial per (replicate, ordering); ``data`` is "digits" or an .npz path."""
    if scale not in _SCALES:
        raise ValueError(f"orderings: unknown scale {scale!r}; valid: {', '.join(_SCALES)}")
    s = _SCALES[scale]
    digest = {} if data == "digits" else {"data_sha256": training.file_digest(data)}
    return [{"order": order, "replicate": r, "train_seed": training.net_seed(seed, r),
             "train": net_config(scale, order, data), **digest}
            for r in range(s["seeds"]) for order in nn.ORDERS]


def gradient_through_depth(model, data: str) -> dict:
    """‖∂L/∂h_l‖ (l = 0..L) of the mean test cross-entropy at a float64 copy of ``model`` in
    evaluation mode, on the whole test set; and that loss."""
    ds = training.load_data(data, "float64")
    model.to("float64").eval()
    p = inspect.profile(model, ds.x_test, ds.y_test)
    return {"grad_norm": p.grad_norm.tolist(), "test_loss_f64": p.value}


def run_trial(config: dict, seed: int) -> dict:
    """The net's per-epoch curves and its gradient through depth after training. ``seed`` is
    unused: the net's seed is ``config["train_seed"]`` (shared nets)."""
    net = training.trained(config["train"], config["train_seed"])
    out = {name: [r[name] for r in net.history]
           for name in ("train_loss", "train_acc", "test_loss", "test_acc")}
    return {**out, **gradient_through_depth(net.model, config["train"]["data"])}


def _mean(values) -> list:
    return np.mean(np.asarray(values, dtype=float), axis=0).tolist()


def summarise(results: list, scale: str) -> dict:
    """Claims on the final test accuracies; data: mean curves and gradient norms per order."""
    orders = [o for o in nn.ORDERS if any(c["order"] == o for c, _ in results)]
    per: dict[str, dict] = {}
    for o in orders:
        ds = [d for c, d in results if c["order"] == o]
        per[o] = {m: _mean([d[m] for d in ds])
                  for m in ("train_loss", "train_acc", "test_loss", "test_acc", "grad_norm")}
        per[o]["final_test_acc"] = [d["test_acc"][-1] for d in ds]
        per[o]["replicates"] = len(ds)
    finals: dict[int, dict[str, float]] = {}
    for c, d in results:
        finals.setdefault(c["replicate"], {})[c["order"]] = d["test_acc"][-1]
    worst = mean_and_spread(min(f.values()) for f in finals.values())
    diffs = mean_and_spread(100 * (f["full_preact"] - f["post"]) for f in finals.values()
                            if "full_preact" in f and "post" in f)
    c0 = results[0][0]["train"]
    layers = 6 * c0["model"]["n"] + 2
    epochs = c0["epochs"]
    claims = [
        claim("orderings_all_train", source=SOURCE, paper_status="paper",
              paper=1 - PAPER_ERROR["bn_after_add"] / 100,
              claim=f"every ordering trains: the lowest final test accuracy (fraction) over the "
                    f"five orderings of a {layers}-layer ResNet after {epochs} epochs (He et al. "
                    f"2016: all five train, the worst, BN after addition, at 8.17 % error on "
                    f"CIFAR-10, ResNet-110; rule: above {TRAINS}, far above chance 0.1)",
              measured=worst[0], n=worst[2], spread=worst[1],
              rule={"op": "gt", "value": TRAINS}, holds_at="default"),
        claim("orderings_full_preact_vs_post", source=SOURCE, paper_status="paper",
              paper=PAPER_ERROR["post"] - PAPER_ERROR["full_preact"],
              claim=f"full pre-activation is not worse than the original: final test accuracy "
                    f"of full pre-activation minus post-activation, percentage points, "
                    f"{layers} layers (He et al. 2016, ResNet-110 on CIFAR-10: 6.37 % against "
                    f"6.61 % error, +0.24 pp; rule: above {PREACT_MARGIN} pp, about four test "
                    f"digits, since one seed on a small test set is noisy)",
              measured=diffs[0], n=diffs[2], spread=diffs[1],
              rule={"op": "gt", "value": PREACT_MARGIN}, holds_at="default"),
    ]
    data = {"orders": orders, "labels": {o: LABELS[o] for o in orders}, "layers": layers,
            "n": c0["model"]["n"], "epochs": epochs, "per_order": per,
            "paper_error": {o: PAPER_ERROR[o] for o in orders if o in PAPER_ERROR}}
    return {"claims": claims, "data": data}


def answer(data: dict, claims: list[dict]) -> str:
    """Whether every ordering trains (final test accuracy above ``TRAINS``), the worst and the
    best ordering, and full pre-activation against the original, from the final accuracies."""
    per, labels = data.get("per_order", {}), data.get("labels", {})
    acc = {o: mean(per[o].get("final_test_acc")) for o in data.get("orders", []) if o in per}
    acc = {o: a for o, a in acc.items() if finite(a)}
    if not acc:
        return sentence("Not measured: no ordering finished training" + caveat(claims))
    worst, best = min(acc, key=acc.get), max(acc, key=acc.get)
    setup = f", at {data['layers']} layers after {data['epochs']} epochs" if finite(
        data.get("layers"), data.get("epochs")) else ""
    if len(acc) < 2:
        text = (f"not measured{setup}: only {labels.get(worst, worst)} finished training, at "
                f"{pct(acc[worst])} test accuracy")
    elif acc[worst] > TRAINS:
        text = (f"only slightly{setup}: all {len(acc)} orderings train, to between "
                f"{pct(acc[worst])} ({labels.get(worst, worst)}) and {pct(acc[best])} "
                f"({labels.get(best, best)}) test accuracy")
    else:
        text = (f"yes{setup}: {labels.get(worst, worst)} reaches only {pct(acc[worst])} test "
                f"accuracy, {labels.get(best, best)} {pct(acc[best])}")
    if finite(acc.get("full_preact"), acc.get("post")):
        diff = 100 * (acc["full_preact"] - acc["post"])
        verb = "beats" if diff > 0 else "trails" if diff < 0 else "ties"
        text += (f", and full pre-activation {verb} the original by "
                 f"{num(abs(diff))} points")
    return sentence(text + caveat(claims))


def plot(data: dict, out_dir) -> list[str]:
    """Training loss and test accuracy per epoch, and ‖∂L/∂h_l‖ through depth, per ordering."""
    fig, axes = figure(3, 1, width=4.4, height=4.0)
    for i, o in enumerate(data["orders"]):
        c = data["per_order"][o]
        epochs = np.arange(1, len(c["train_loss"]) + 1)
        lab = data["labels"][o]
        axes[0, 0].semilogy(epochs, c["train_loss"], color=f"C{i}", label=lab)
        axes[0, 1].plot(epochs, c["test_acc"], color=f"C{i}",
                        label=f"{lab}: {c['test_acc'][-1]:.3f}")
        axes[0, 2].semilogy(np.arange(len(c["grad_norm"])), c["grad_norm"], "o-", ms=3,
                            color=f"C{i}")
    axes[0, 0].set_title("Training loss")
    axes[0, 0].set_xlabel("epoch")
    axes[0, 0].set_ylabel("mean training cross-entropy (nats, log)")
    axes[0, 0].legend(fontsize=7)
    axes[0, 1].set_title("Test accuracy (final value in the legend)")
    axes[0, 1].set_xlabel("epoch")
    axes[0, 1].set_ylabel("test accuracy (fraction)")
    axes[0, 1].legend(fontsize=7, loc="lower right")
    axes[0, 2].set_title("Gradient through depth after training")
    axes[0, 2].set_xlabel("block output l (0 = stem)")
    axes[0, 2].set_ylabel("‖∂L/∂h_l‖, mean test cross-entropy (log)")
    fig.suptitle(f"Block orderings (He et al. 2016), {data['layers']}-layer ResNets, "
                 f"same budget: does the order matter?", fontsize=10)
    return [save(fig, out_dir, "orderings.png")]
