"""Srivastava et al. 2015: a highway network's gates after training (how much each block
carries its input, how much it transforms it), and its accuracy beside the residual network of
the same depth trained with the same budget."""

from __future__ import annotations

import numpy as np

from miniresnet import nn
from miniresnet.creation import to_numpy
from miniresnet.experiments import training
from miniresnet.experiments.answers import caveat, finite, mean, num, sentence, signed
from miniresnet.experiments.claims import claim, mean_and_spread
from miniresnet.experiments.plots import figure, save
from miniresnet.nn.blocks import HighwayBlock
from miniresnet.tracing import no_grad

NAME = "highway_vs_residual"
TITLE = "Do a highway net's gates open when it is trained, and does it match a ResNet?"
ESTIMATE = {"quick": 1.0, "default": 30.0, "full": 260.0}
SOURCE = "Srivastava et al. 2015"
SETUP = (
    "CIFAR-style networks (nn.resnet_cifar, 6n+2 layers) with highway blocks "
    "y = T(x)·H(x) + (1 − T(x))·C(x), T = sigmoid(conv3x3(x) + b_T), b_T = −2 at "
    "initialisation (H the post-activation two-convolution branch, C the identity or, at the "
    "stage transitions, the projection), and the residual net of the same depth (the "
    "degradation experiment's, shared), trained in float32 on the bundled 8x8 digits (or the "
    "--data file) with the same budget: SGD with momentum 0.9, weight decay 5e-4, batch 128, "
    "learning rate 0.1 on a cosine schedule. The gate's opening of a block is the mean of T "
    "over the whole test set (every sample, channel and position), measured in float32 in "
    "evaluation mode by forward hooks on the gate convolutions, after training and, for the "
    "same weights seed, at initialisation; the carry fraction is 1 − T. The claims are pinned "
    "to the default scale (n = 3, width 0.5, 12 epochs, two seeds)."
)

_SCALES = {
    "quick": {"n": 1, "width": 0.25, "epochs": 2, "seeds": 1},
    "default": {"n": 3, "width": 0.5, "epochs": 12, "seeds": 2},
    "full": {"n": 18, "width": 0.5, "epochs": 20, "seeds": 3},
}
KINDS = ("highway", "resnet")
GATE_BIAS = -2.0
CARRY = 0.5          # mean T below one half: the blocks carry more than they transform
GATED_MARGIN = -3.0  # pp: the highway net at most 3 pp below the ResNet
HE2016_GATING = 6.61 - 8.70  # pp, He et al. 2016 Table 1: exclusive gating vs the original


def net_config(scale: str, kind: str, data: str = "digits") -> dict:
    """The training config of the ``kind`` net at ``scale`` (the residual one is the
    degradation experiment's net of the same depth and budget)."""
    s = _SCALES[scale]
    extra = {"block": "highway", "gate_bias": GATE_BIAS} if kind == "highway" else {}
    return training.config(s["n"], width=s["width"], epochs=s["epochs"], data=data, **extra)


def trials(scale: str, seed: int, data: str = "digits") -> list[dict]:
    """One trial per (replicate, highway or residual); ``data`` is "digits" or an .npz path."""
    if scale not in _SCALES:
        raise ValueError(f"highway_vs_residual: unknown scale {scale!r}; valid: "
                         f"{', '.join(_SCALES)}")
    s = _SCALES[scale]
    digest = {} if data == "digits" else {"data_sha256": training.file_digest(data)}
    return [{"kind": kind, "replicate": r, "train_seed": training.net_seed(seed, r),
             "train": net_config(scale, kind, data), **digest}
            for r in range(s["seeds"]) for kind in KINDS]


def gate_openings(model, x) -> list[float]:
    """Per highway block, the mean gate opening T = sigmoid(gate(x_in)) over every entry (all
    samples, channels and positions) when ``model`` runs on ``x`` in its current mode."""
    gates = {id(b.gate): i for i, b in enumerate(model.blocks) if isinstance(b, HighwayBlock)}
    if not gates:
        raise ValueError("gate_openings: the model has no highway blocks")
    means: dict[int, float] = {}

    def hook(module, args, out):
        z = to_numpy(out).astype(np.float64)
        means[gates[id(module)]] = float(np.mean(1.0 / (1.0 + np.exp(-z))))

    handles = [b.gate.register_forward_hook(hook) for b in model.blocks
               if isinstance(b, HighwayBlock)]
    try:
        with no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return [means[i] for i in sorted(means)]


def _untrained(cfg: dict, seed: int, ds):
    """The net ``cfg`` at initialisation with training seed ``seed`` (as training builds it)."""
    return nn.build_model({"in_channels": ds.x_train.shape[1], "num_classes": ds.num_classes,
                           **cfg["model"], "dtype": cfg["dtype"], "seed": int(seed)}).eval()


def run_trial(config: dict, seed: int) -> dict:
    """The net's curves; for a highway net also its gate openings per block after training and
    at initialisation. ``seed`` is unused: the net's seed is ``config["train_seed"]``."""
    cfg = config["train"]
    net = training.trained(cfg, config["train_seed"])
    out = {name: [r[name] for r in net.history]
           for name in ("train_loss", "train_acc", "test_loss", "test_acc")}
    if config["kind"] == "highway":
        ds = training.load_data(cfg["data"], cfg["dtype"])
        out["gate"] = gate_openings(net.model, ds.x_test)
        out["gate_init"] = gate_openings(_untrained(cfg, config["train_seed"], ds), ds.x_test)
    return out


def _mean(values) -> list:
    return np.mean(np.asarray(values, dtype=float), axis=0).tolist()


def summarise(results: list, scale: str) -> dict:
    """Claims on the mean gate opening and the accuracy gap; data: gates, curves, accuracies."""
    high = [d for c, d in results if c["kind"] == "highway"]
    kinds = [k for k in KINDS if any(c["kind"] == k for c, _ in results)]
    curves = {k: {m: _mean([d[m] for c, d in results if c["kind"] == k])
                  for m in ("train_loss", "test_acc")} for k in kinds}
    finals: dict[int, dict[str, float]] = {}
    for c, d in results:
        finals.setdefault(c["replicate"], {})[c["kind"]] = d["test_acc"][-1]
    gap = mean_and_spread(100 * (f["highway"] - f["resnet"]) for f in finals.values()
                          if len(f) == 2)
    opening = mean_and_spread(float(np.mean(d["gate"])) for d in high)
    c0 = results[0][0]["train"]
    layers, epochs = 6 * c0["model"]["n"] + 2, c0["epochs"]
    claims = [
        claim("highway_gates_mostly_carry", source=SOURCE, paper_status="figure",
              claim=f"after training, the gates of a {layers}-layer highway net mostly carry: "
                    f"the mean transform-gate opening T over blocks and test inputs "
                    f"(Srivastava et al. 2015, Fig. 2: most mean gate outputs stay low, the "
                    f"negative gate bias b_T = {GATE_BIAS:g} starting them at about "
                    f"sigmoid({GATE_BIAS:g}) = {1 / (1 + np.exp(-GATE_BIAS)):.2f}; rule: "
                    f"below {CARRY}, more carry than transform)",
              measured=opening[0], n=opening[2], spread=opening[1],
              rule={"op": "lt", "value": CARRY}, holds_at="default"),
        claim("highway_accuracy_vs_residual", source=SOURCE, paper_status="paper",
              paper=HE2016_GATING,
              claim=f"the highway net nearly matches the ResNet of the same depth: final test "
                    f"accuracy of highway minus residual, percentage points, {layers} layers, "
                    f"{epochs} epochs (Srivastava et al. train highway nets as deep as plain "
                    f"ones fail to; He et al. 2016 Table 1, exclusive gating in ResNet-110 on "
                    f"CIFAR-10: 8.70 % against 6.61 % error; rule: above {GATED_MARGIN} pp)",
              measured=gap[0], n=gap[2], spread=gap[1],
              rule={"op": "gt", "value": GATED_MARGIN}, holds_at="default"),
    ]
    data = {"layers": layers, "n": c0["model"]["n"], "epochs": epochs,
            "gate_bias": GATE_BIAS, "gate_bias_sigmoid": float(1 / (1 + np.exp(-GATE_BIAS))),
            "gate": _mean([d["gate"] for d in high]),
            "gate_spread": np.std([d["gate"] for d in high], axis=0).tolist(),
            "gate_init": _mean([d["gate_init"] for d in high]),
            "final_test_acc": {k: [f[k] for f in finals.values() if k in f] for k in kinds},
            "curves": curves, "replicates": len(high)}
    return {"claims": claims, "data": data}


def answer(data: dict, claims: list[dict]) -> str:
    """Whether the mean gate opening rose or fell in training and stays below ``CARRY``, and
    whether the highway net's accuracy is within ``GATED_MARGIN`` points of the ResNet's."""
    trained, init = mean(data.get("gate")), mean(data.get("gate_init"))
    accs = data.get("final_test_acc", {})
    gap = 100 * (mean(accs.get("highway")) - mean(accs.get("resnet")))
    when = f"{data['epochs']} epochs" if finite(data.get("epochs")) else "training"
    where = f" in the {data['layers']}-layer highway net" if finite(data.get("layers")) else ""
    parts = []
    if finite(trained, init):
        moved = ("open (mean T rises" if trained > init else "close (mean T falls"
                 if trained < init else "stay put (mean T stays")
        mostly = (f"mostly carrying (T < {CARRY:g})" if trained < CARRY
                  else f"mostly transforming (T ≥ {CARRY:g})")
        parts.append(f"the gates {moved} from {num(init)} at initialisation to {num(trained)} "
                     f"after {when}{where}), {mostly}")
    if finite(gap):
        matches = "matches" if gap > GATED_MARGIN else "does not match"
        parts.append(f"the net {matches} the ResNet of the same depth ({signed(gap)} points of "
                     f"test accuracy)")
    return sentence(("; ".join(parts) or "Not measured: the highway trials failed")
                    + caveat(claims))


def plot(data: dict, out_dir) -> list[str]:
    """Gate opening per block (after training, at initialisation, sigmoid(b_T)), and the test
    accuracy of both nets per epoch."""
    fig, axes = figure(2, 1, width=4.8, height=3.8)
    ax = axes[0, 0]
    gate = np.asarray(data["gate"])
    blocks = np.arange(1, len(gate) + 1)
    ax.bar(blocks - 0.2, data["gate_init"], 0.4, color="C7", label="at initialisation")
    ax.bar(blocks + 0.2, gate, 0.4, yerr=data["gate_spread"], color="C0",
           label=f"after {data['epochs']} epochs")
    ax.axhline(data["gate_bias_sigmoid"], color="k", ls=":", lw=1,
               label=f"sigmoid(b_T = {data['gate_bias']:g})")
    ax.axhline(0.5, color="C3", ls="--", lw=1, label="carry = transform (0.5)")
    ax.set_xticks(blocks)
    ax.set_ylim(0, 1)
    ax.set_title("Mean transform-gate opening T per block")
    n = data["n"]
    ax.set_xlabel(f"highway block (stages start at 1, {n + 1}, {2 * n + 1})")
    ax.set_ylabel("mean T over test inputs (carry = 1 − T)")
    ax.legend(fontsize=7, loc="upper right")
    ax = axes[0, 1]
    for i, (kind, label) in enumerate((("highway", "highway"), ("resnet", "ResNet"))):
        if kind not in data["curves"]:
            continue
        acc = data["curves"][kind]["test_acc"]
        final = np.mean(data["final_test_acc"][kind])
        ax.plot(np.arange(1, len(acc) + 1), acc, color=f"C{i}",
                label=f"{label}-{data['layers']}: final {final:.3f}")
    ax.set_title(f"Test accuracy (mean of {data['replicates']} seed(s))")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (fraction)")
    ax.legend(loc="lower right")
    fig.suptitle("Highway vs residual (Srivastava et al. 2015): do the gates open?", fontsize=10)
    return [save(fig, out_dir, "highway_vs_residual.png")]
