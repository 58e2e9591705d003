"""Zaeemzadeh et al. (norm preservation): a residual block with an identity skip passes the
gradient back with its norm nearly unchanged, ‖∂L/∂h_{l-1}‖ / ‖∂L/∂h_l‖ ≈ 1, and training
keeps it so; a plain layer need not."""

from __future__ import annotations

import numpy as np

from miniresnet import inspect
from miniresnet.experiments import degradation, training
from miniresnet.experiments.answers import caveat, finite, num, sentence
from miniresnet.experiments.claims import claim
from miniresnet.experiments.plots import figure, save

NAME = "norm_preservation"
TITLE = "Do residual blocks preserve the gradient's norm through training, unlike plain ones?"
ESTIMATE = {"quick": 1.0, "default": 10.0, "full": 200.0}
SOURCE = "Zaeemzadeh et al. 2018"
SETUP = (
    "The residual and plain nets of the degradation experiment (shared trained networks, "
    "float32 training) at one depth, taken at initialisation, after a few epochs and at the end "
    "(weight snapshots of the same training run). A float64 copy of each in evaluation mode is "
    "profiled (inspect.profile) on the whole test set with its labels; per block l the ratio "
    "‖∂L/∂h_{l-1}‖ / ‖∂L/∂h_l‖ of the mean cross-entropy's gradient norms is reported, and "
    "|log ratio| averaged over blocks measures how far a net is from norm preservation. The "
    "comparison at initialisation holds at every scale; the claims on the trained nets are "
    "pinned to the default scale (n = 3, 20 layers, after 12 epochs)."
)

_SCALES = {"quick": {"n": 2, "epochs": (0, 1, 2)},
           "default": {"n": 3, "epochs": (0, 1, 3, 12)},
           "full": {"n": 7, "epochs": (0, 1, 3, 20)}}
KINDS = ("plain", "resnet")
BOUND = float(np.log(1.5))  # mean |log ratio| below log 1.5: a typical block changes ‖g‖ < 1.5x


def trials(scale: str, seed: int, data: str = "digits") -> list[dict]:
    """One trial per (plain or residual, snapshot epoch) of degradation's net of depth n."""
    if scale not in _SCALES:
        raise ValueError(f"norm_preservation: unknown scale {scale!r}; valid: "
                         f"{', '.join(_SCALES)}")
    s = _SCALES[scale]
    digest = {} if data == "digits" else {"data_sha256": training.file_digest(data)}
    return [{"kind": kind, "n": s["n"], "epoch": e, "train_seed": training.net_seed(seed, 0),
             "train": degradation.net_config(scale, s["n"], kind == "resnet", data), **digest}
            for kind in KINDS for e in s["epochs"]]


def block_ratios(model, data: str) -> dict:
    """Per block, ‖∂L/∂h_{l-1}‖ / ‖∂L/∂h_l‖ at a float64 copy of ``model`` in evaluation mode
    on the whole test set (L: mean cross-entropy)."""
    ds = training.load_data(data, "float64")
    model.to("float64").eval()
    g = inspect.profile(model, ds.x_test, ds.y_test).grad_norm
    return {"ratio": (g[:-1] / g[1:]).tolist(), "grad_norm": g.tolist()}


def run_trial(config: dict, seed: int) -> dict:
    """The block ratios of the net's snapshot after ``config["epoch"]`` epochs. ``seed`` is
    unused: the net's seed is ``config["train_seed"]`` (shared nets)."""
    model = training.snapshot(config["train"], config["train_seed"], config["epoch"])
    return block_ratios(model, config["train"]["data"])


def mean_abs_log(ratio) -> float:
    """Mean over blocks of |log ratio| (0: every block preserves the gradient's norm)."""
    return float(np.mean(np.abs(np.log(np.asarray(ratio, dtype=float)))))


def summarise(results: list, scale: str) -> dict:
    """Claims on the final nets' mean |log ratio|; data: ratios per kind and epoch."""
    per = {k: {str(c["epoch"]): d["ratio"] for c, d in results if c["kind"] == k}
           for k in KINDS}
    epochs = sorted({c["epoch"] for c, _ in results})
    first, last = str(epochs[0]), str(epochs[-1])
    dev = {k: {e: mean_abs_log(r) for e, r in per[k].items()} for k in KINDS}
    n = results[0][0]["n"]
    res, plain = dev["resnet"][last], dev["plain"][last]
    claims = [
        claim("norm_preservation_resnet", source=SOURCE, paper_status="derived",
              claim=f"the trained ResNet-{6 * n + 2} (after {last} epochs) nearly preserves the "
                    f"gradient's norm block to block: mean over blocks of |log(‖∂L/∂h_(l-1)‖ / "
                    f"‖∂L/∂h_l‖)| below log 1.5 = {BOUND:.3f} (Zaeemzadeh et al.: identity-skip "
                    f"blocks are norm-preserving, ratio -> 1; bound ours)",
              measured=res, rule={"op": "lt", "value": BOUND}, holds_at="default"),
        claim("norm_preservation_plain_minus_resnet_init", source=SOURCE,
              paper_status="derived",
              claim=f"at initialisation the plain {6 * n + 2}-layer net is further from norm "
                    f"preservation than the ResNet: its mean |log ratio| minus the ResNet's "
                    f"(> 0; Zaeemzadeh et al.: the identity skip is what preserves the norm)",
              measured=dev["plain"][first] - dev["resnet"][first], rule={"op": "gt", "value": 0.0},
              holds_at="quick"),
        claim("norm_preservation_plain_minus_resnet", source=SOURCE, paper_status="derived",
              claim=f"after training ({last} epochs) the plain {6 * n + 2}-layer net is still "
                    f"further from norm preservation than the ResNet: its mean |log ratio| minus "
                    f"the ResNet's (> 0; Zaeemzadeh et al.: training keeps residual nets "
                    f"norm-preserving, not plain ones)",
              measured=plain - res, rule={"op": "gt", "value": 0.0}, holds_at="default"),
    ]
    data = {"n": n, "layers": 6 * n + 2, "epochs": epochs, "ratio": per,
            "downsampling": [n + 1, 2 * n + 1],  # blocks with a projection shortcut
            "mean_abs_log": dev, "bound": BOUND}
    return {"claims": claims, "data": data}


def answer(data: dict, claims: list[dict]) -> str:
    """Whether the ResNet is closer to norm preservation (smaller mean |log ratio|) than the
    plain net at initialisation and at the last epoch."""
    dev = data.get("mean_abs_log", {})
    epochs = sorted(int(e) for e in dev.get("resnet", {}) if e in dev.get("plain", {}))
    if not epochs:
        return sentence("Not measured: the plain or the residual profiles are missing"
                        + caveat(claims))
    first, last = str(epochs[0]), str(epochs[-1])
    res, plain = dev["resnet"], dev["plain"]
    closer = {e: res[e] < plain[e] for e in (first, last) if finite(res[e], plain[e])}
    lead = ("yes" if closer.get(first) and closer.get(last) else
            "only at initialisation" if closer.get(first) else
            "only after training" if closer.get(last) else "no")
    layers = data.get("layers", "?")
    start = "at initialisation" if first == "0" else f"at epoch {first}"
    end = (f", {num(res[last])} against {num(plain[last])} after {last} epochs"
           if last != first else "")
    return sentence(
        f"{lead}: the mean |log| of the block-to-block gradient-norm ratio is {num(res[first])} "
        f"for ResNet-{layers} against {num(plain[first])} for plain-{layers} {start}{end}"
        + caveat(claims))


def plot(data: dict, out_dir) -> list[str]:
    """Ratio per block at each epoch (plain, residual) and mean |log ratio| against epoch."""
    fig, axes = figure(3, 1, width=4.2, height=3.6)
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    labels = {"plain": "plain", "resnet": "ResNet"}
    values = [v for k in data["ratio"].values() for r in k.values() for v in r]
    for j, kind in enumerate(("resnet", "plain")):
        ax = axes[0, j]
        for i, e in enumerate(data["epochs"]):
            r = data["ratio"][kind].get(str(e))
            if r is not None:
                ax.semilogy(np.arange(1, len(r) + 1), r, "o-", ms=3, color=f"C{i}",
                            label=f"epoch {e}")
        ax.axhline(1.0, color="grey", lw=0.8, ls=":", label="norm preserved (1)")
        for i, b in enumerate(data["downsampling"]):
            ax.axvline(b, color="k", lw=0.6, ls="--",
                       label="downsampling block" if i == 0 else None)
        lo, hi = 0.9 * min(values), 1.1 * max(values)
        ax.set_ylim(lo, hi)
        ax.set_yticks([t for t in (0.25, 0.35, 0.5, 0.7, 1.0, 1.4, 2.0, 2.8, 4.0)
                       if lo <= t <= hi])
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{labels[kind]}-{data['layers']}: gradient ratio per block")
        ax.set_xlabel("block l")
        ax.set_ylabel("‖∂L/∂h_(l-1)‖ / ‖∂L/∂h_l‖ (log)")
        ax.legend(fontsize=7, loc="best")
    ax = axes[0, 2]
    for kind, ls in (("plain", "--"), ("resnet", "-")):
        dev = data["mean_abs_log"][kind]
        es = [e for e in data["epochs"] if str(e) in dev]
        ax.plot(es, [dev[str(e)] for e in es], "o" + ls, label=labels[kind])
    ax.axhline(data["bound"], color="grey", lw=0.8, ls=":", label="claim bound (log 1.5)")
    ax.set_title("Distance from norm preservation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean over blocks of |log ratio|")
    ax.legend()
    fig.suptitle("Norm preservation (Zaeemzadeh et al.): residual vs plain through training",
                 fontsize=10)
    return [save(fig, out_dir, "norm_preservation.png")]
