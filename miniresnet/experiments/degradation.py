"""He et al. 2015 (Fig. 1, 6): with the same training budget, a deeper plain network ends at a
higher training loss than a shallower one (degradation), a deeper residual network does not."""

from __future__ import annotations

import numpy as np

from miniresnet.experiments import training
from miniresnet.experiments.answers import caveat, finite, num, sentence
from miniresnet.experiments.claims import claim, mean_and_spread
from miniresnet.experiments.plots import figure, save

NAME = "degradation"
TITLE = "Does a deeper network train worse than a shallower one, plain and residual?"
ESTIMATE = {"quick": 1.0, "default": 35.0, "full": 500.0}
SOURCE = "He et al. 2015"
SETUP = (
    "CIFAR-style networks (nn.resnet_cifar, 6n+2 layers, post-activation basic blocks with "
    "batch norm, projection shortcuts at the stage transitions) and their plain counterparts "
    "(the same layers without shortcuts), trained in float32 on the bundled 8x8 digits (or the "
    "--data file) with the same budget for every net: SGD with momentum 0.9, weight decay 5e-4, "
    "batch 128, learning rate 0.1 on a cosine schedule, the same number of epochs. The claims "
    "compare the final-epoch mean training cross-entropy (nats) of the deepest net with that of "
    "the shallowest, plain and residual separately; they are pinned to the default scale "
    "(n = 1, 3, 7, width 0.5, 12 epochs). The quick scale trains too briefly for the gap to "
    "open. The nets are the shared trained networks other experiments inspect."
)

_SCALES = {
    "quick": {"depths": (1, 2), "width": 0.25, "epochs": 2, "seeds": 1},
    "default": {"depths": (1, 3, 7), "width": 0.5, "epochs": 12, "seeds": 1},
    "full": {"depths": (1, 3, 7, 18), "width": 0.5, "epochs": 20, "seeds": 3},
}
PLAIN_MARGIN = 0.1    # nats: the deep plain net must be clearly worse, not worse by noise
RESNET_MARGIN = 0.05  # nats: the deep residual net may be worse by at most this much
KINDS = ("plain", "resnet")


def net_config(scale: str, n: int, residual: bool, data: str = "digits") -> dict:
    """The training config of the net of depth ``n`` at ``scale`` (shared with other
    experiments through :mod:`miniresnet.experiments.training`)."""
    s = _SCALES[scale]
    return training.config(n, residual=residual, width=s["width"], epochs=s["epochs"],
                           data=data)


def trials(scale: str, seed: int, data: str = "digits") -> list[dict]:
    """One trial per (replicate, depth, plain or residual); ``data`` is "digits" or an .npz
    path (its SHA-256 goes in the configs, so a changed file is not served from the cache).
    The net's training seed comes from ``seed`` and the replicate only."""
    if scale not in _SCALES:
        raise ValueError(f"degradation: unknown scale {scale!r}; valid: {', '.join(_SCALES)}")
    s = _SCALES[scale]
    digest = {} if data == "digits" else {"data_sha256": training.file_digest(data)}
    return [{"kind": kind, "n": n, "replicate": r, "train_seed": training.net_seed(seed, r),
             "train": net_config(scale, n, kind == "resnet", data), **digest}
            for r in range(s["seeds"]) for n in s["depths"] for kind in KINDS]


def deepest_nets(scale: str, seed: int, data: str = "digits") -> list[dict]:
    """The trial configs of the deepest nets at ``scale`` (one per replicate and kind), for the
    experiments that inspect these trained nets: the same configs, so the same stored nets."""
    configs = trials(scale, seed, data)
    n = max(c["n"] for c in configs)
    return [c for c in configs if c["n"] == n]


def run_trial(config: dict, seed: int) -> dict:
    """The net's per-epoch curves (trained, or loaded from the store). ``seed`` is unused: the
    net's seed is ``config["train_seed"]``, so other experiments get the same net."""
    net = training.trained(config["train"], config["train_seed"])
    return {name: [r[name] for r in net.history]
            for name in ("train_loss", "train_acc", "test_loss", "test_acc")}


def _gap(results: list, kind: str) -> tuple[float, float, int]:
    """Mean ± spread over replicates of final train loss (deepest net) − (shallowest net)."""
    finals: dict[int, dict[int, float]] = {}
    for c, d in results:
        if c["kind"] == kind:
            finals.setdefault(c["replicate"], {})[c["n"]] = d["train_loss"][-1]
    gaps = [f[max(f)] - f[min(f)] for f in finals.values() if len(f) >= 2]
    return mean_and_spread(gaps)


def _mean_curve(curves: list) -> list:
    return np.mean(np.asarray(curves, dtype=float), axis=0).tolist()


def summarise(results: list, scale: str) -> dict:
    """Claims on the deepest-minus-shallowest final training loss; data: mean curves per net."""
    depths = sorted({c["n"] for c, _ in results})
    curves: dict[str, dict] = {k: {} for k in KINDS}
    for kind in KINDS:
        for n in depths:
            ds = [d for c, d in results if c["kind"] == kind and c["n"] == n]
            if ds:
                curves[kind][str(n)] = {m: _mean_curve([d[m] for d in ds])
                                        for m in ("train_loss", "test_acc", "train_acc")}
                curves[kind][str(n)]["replicates"] = len(ds)
    lo, hi = depths[0], depths[-1]
    plain, resnet = _gap(results, "plain"), _gap(results, "resnet")
    epochs = len(results[0][1]["train_loss"])
    claims = [
        claim("degradation_plain_deeper_worse", source=SOURCE, paper_status="figure",
              claim=f"the deeper plain net trains worse: final training loss (nats) of plain "
                    f"{6 * hi + 2}-layer minus plain {6 * lo + 2}-layer, after {epochs} "
                    f"epochs with the same budget (He et al.: plain-56 above plain-20, Fig. 1; "
                    f"margin {PLAIN_MARGIN} nats so noise cannot pass)",
              measured=plain[0], n=plain[2], spread=plain[1],
              rule={"op": "gt", "value": PLAIN_MARGIN}, holds_at="default"),
        claim("degradation_resnet_deeper_not_worse", source=SOURCE, paper_status="figure",
              claim=f"the deeper residual net does not train worse: final training loss (nats) "
                    f"of ResNet-{6 * hi + 2} minus ResNet-{6 * lo + 2}, same budget (He et al.: "
                    f"deeper ResNets reach lower training error, Fig. 6; at most "
                    f"{RESNET_MARGIN} nats worse, half the plain margin)",
              measured=resnet[0], n=resnet[2], spread=resnet[1],
              rule={"op": "lt", "value": RESNET_MARGIN}, holds_at="default"),
    ]
    data = {"depths": depths, "layers": [6 * n + 2 for n in depths], "epochs": epochs,
            "curves": curves,
            "final_train_loss": {k: {str(n): curves[k][str(n)]["train_loss"][-1]
                                     for n in depths if str(n) in curves[k]} for k in KINDS},
            "final_test_acc": {k: {str(n): curves[k][str(n)]["test_acc"][-1]
                                   for n in depths if str(n) in curves[k]} for k in KINDS}}
    return {"claims": claims, "data": data}


def answer(data: dict, claims: list[dict]) -> str:
    """Yes or no per kind: whether the deepest net ends more than ``RESNET_MARGIN`` nats of
    training loss above the shallowest (within that margin the two count as equal)."""
    names = {"plain": ("plain", "plain nets"), "resnet": ("ResNet", "residual ones")}
    verdicts, numbers = [], []
    for kind in KINDS:
        net, nets = names[kind]
        losses = {int(n): v for n, v in data.get("final_train_loss", {}).get(kind, {}).items()
                  if finite(v)}
        if len(losses) < 2:
            verdicts.append(f"unmeasured for {nets}")
            continue
        lo, hi = min(losses), max(losses)
        worse = losses[hi] - losses[lo] > RESNET_MARGIN
        verdicts.append(f"{'yes' if worse else 'no'} for {nets}")
        verb, unit = ("at", "") if numbers else ("ends at", " nats of training loss")
        numbers.append(f"{net}-{6 * hi + 2} {verb} {num(losses[hi])}{unit} against "
                       f"{net}-{6 * lo + 2}'s {num(losses[lo])}")
    if not numbers:
        return sentence("Not measured: each kind lacks its deepest or its shallowest net"
                        + caveat(claims))
    budget = f" ({data['epochs']} epochs, same budget)" if "epochs" in data else ""
    return sentence(", ".join(verdicts) + budget + ": " + ", ".join(numbers) + caveat(claims))


def plot(data: dict, out_dir) -> list[str]:
    """Training loss (log) and test accuracy per epoch, and final loss against depth."""
    fig, axes = figure(3, 1, width=4.4, height=4.2)
    styles = {"plain": ("--", "plain"), "resnet": ("-", "ResNet")}
    for i, n in enumerate(data["depths"]):
        for kind, (ls, label) in styles.items():
            c = data["curves"][kind].get(str(n))
            if c is None:
                continue
            epochs = np.arange(1, len(c["train_loss"]) + 1)
            lab = f"{label}-{6 * n + 2}"
            axes[0, 0].semilogy(epochs, c["train_loss"], ls, color=f"C{i}", label=lab)
            axes[0, 1].plot(epochs, c["test_acc"], ls, color=f"C{i}")
    axes[0, 0].set_title("Training loss: deeper plain nets train worse")
    axes[0, 0].set_xlabel("epoch")
    axes[0, 0].set_ylabel("mean training cross-entropy (nats, log)")
    axes[0, 0].legend(title="dashed plain, solid ResNet", title_fontsize=7, ncol=3,
                      loc="upper center", bbox_to_anchor=(0.5, -0.16))
    axes[0, 1].set_title("Test accuracy (colours and styles as on the left)")
    axes[0, 1].set_xlabel("epoch")
    axes[0, 1].set_ylabel("test accuracy (fraction)")
    axes[0, 1].axhline(0.1, color="grey", lw=0.8, ls=":", label="chance")
    axes[0, 1].legend(loc="lower right")
    ax = axes[0, 2]
    for kind, (ls, label) in styles.items():
        final = data["final_train_loss"][kind]
        ns = [n for n in data["depths"] if str(n) in final]
        ax.semilogy([6 * n + 2 for n in ns], [final[str(n)] for n in ns], "o" + ls,
                    label=label)
    ax.set_title(f"Final training loss after {data['epochs']} epochs")
    ax.set_xlabel("layers (6n + 2)")
    ax.set_ylabel("final training cross-entropy (nats, log)")
    ax.legend()
    fig.suptitle("Degradation (He et al. 2015): same budget, plain vs residual", fontsize=10)
    return [save(fig, out_dir, "degradation.png")]
