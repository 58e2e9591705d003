"""Veit et al. 2016 (Fig. 6) at the trained weights: the gradient at the stem of a trained
ResNet taken apart exactly by path length, beside the same net at initialisation. Effective
paths are short."""

from __future__ import annotations

import numpy as np

from miniresnet import inspect, nn
from miniresnet.experiments import degradation, training
from miniresnet.experiments.answers import caveat, finite, mean, num, sentence
from miniresnet.experiments.claims import claim, mean_and_spread
from miniresnet.experiments.plots import figure, save

NAME = "paths_trained"
TITLE = "Which path lengths carry the gradient of a trained ResNet, and at initialisation?"
ESTIMATE = {"quick": 1.0, "default": 15.0, "full": 300.0}
SOURCE = "Veit et al. 2016"
STATES = ("trained", "init")
SETUP = (
    "The deepest residual net of the degradation experiment (the shared trained network: "
    "nn.resnet_cifar, 3n blocks, width 0.5, 12 epochs in float32 on the bundled digits at the "
    "default scale) and the same config built with the same seed and not trained, both "
    "converted to float64 for exact derivatives. On a batch of test inputs with their labels, "
    "the gradient of the mean cross-entropy at the stem output is split exactly into g^(k), the "
    "sum over all paths through k residual branches (inspect.path_gradients), with batch norm "
    "in training mode (the batch's statistics, as SGD sees them; nothing is updated). Veit's "
    "measure is C(3n, k) times the mean gradient norm of single sampled paths of length k "
    "(inspect.path_gradients_sampled, every k). The claim is the longest length in the "
    "shortest range holding 90% of Veit's measure at the trained weights; Veit et al. found "
    "5-17 of 54 blocks for a trained ResNet-110 on CIFAR-10, below half the blocks, which is "
    "the rule (pinned to the default scale)."
)

_SCALES = {  # the degradation scale whose deepest net is used; test batch; samples per k
    "quick": {"net_scale": "quick", "batch": 16, "samples": 4},
    "default": {"net_scale": "default", "batch": 32, "samples": 16},
    "full": {"net_scale": "full", "batch": 64, "samples": 64},
}
FRACTION = 0.9


def trials(scale: str, seed: int, data: str = "digits") -> list[dict]:
    """One trial per (replicate, trained or initial weights) of degradation's deepest residual
    net at ``scale`` (its training config and seed, so the trained net is shared)."""
    if scale not in _SCALES:
        raise ValueError(f"paths_trained: unknown scale {scale!r}; valid: {', '.join(_SCALES)}")
    s = _SCALES[scale]
    nets = [c for c in degradation.deepest_nets(s["net_scale"], seed, data)
            if c["kind"] == "resnet"]
    return [{**{k: v for k, v in c.items() if k != "kind"}, "state": state,
             "batch": s["batch"], "samples": s["samples"]}
            for c in nets for state in STATES]


def _model(config: dict, ds):
    """The trained net from the store, or the same config built with the same seed, untrained
    (as training builds it); float64 either way."""
    cfg = config["train"]
    if config["state"] == "trained":
        model = training.trained(cfg, config["train_seed"]).model
    else:
        model = nn.build_model({"in_channels": int(ds.x_train.shape[1]),
                                "num_classes": ds.num_classes, **cfg["model"],
                                "dtype": cfg["dtype"], "seed": int(config["train_seed"])})
    return model.to("float64")


def run_trial(config: dict, seed: int) -> dict:
    """Exact per-length gradients and Veit's sampled measure at every length (samples drawn
    from ``seed``), on the first ``batch`` test inputs."""
    ds = training.load_data(config["train"]["data"], "float64")
    model = _model(config, ds)
    model.train()  # batch statistics; inspect freezes the running ones
    b = config["batch"]
    x, y = ds.x_test[:b, ...], ds.y_test[:b]
    g = inspect.path_gradients(model, x, y)
    blocks = g.shape[0] - 1
    sampled = {k: inspect.path_gradients_sampled(model, x, k, config["samples"], seed=seed + k,
                                                 y=y) for k in range(blocks + 1)}
    summary = inspect.path_summary(g, sampled, FRACTION)
    return {"blocks": blocks, "norm": summary["norm"].tolist(),
            "share": summary["share"].tolist(), "count": summary["count"].tolist(),
            "sampled_norm": summary["sampled_norm"].tolist(), "veit": summary["veit"].tolist(),
            "share_range": list(summary["share_range"]),
            "veit_range": list(summary["veit_range"]),
            "grad_norm": float(np.linalg.norm(g.sum(0)))}


def summarise(results: list, scale: str) -> dict:
    """Claim: the top of the 90% range of Veit's measure at the trained weights is below half
    the blocks; data: per-length curves and ranges, trained and at init."""
    by_state = {s: [d for c, d in results if c["state"] == s] for s in STATES}
    first = next(d for ds in by_state.values() for d in ds)
    n = first["blocks"]
    top, top_sd, count = mean_and_spread(d["veit_range"][1] for d in by_state["trained"])
    claims = [
        claim("paths_trained_90pct_max", source=SOURCE, paper_status="paper", paper=17,
              n=count, spread=top_sd, holds_at="default",
              claim=f"at the trained weights the gradient comes from short paths: the longest "
                    f"length in the shortest range holding 90% of Veit's measure, of {n} blocks "
                    f"(Veit et al.: 5-17 of 54 for a trained ResNet-110, i.e. below n/2; rule: "
                    f"below {n / 2:g})",
              measured=top, rule={"op": "lt", "value": n / 2}),
    ]
    states = {}
    for s, ds in by_state.items():
        if not ds:
            continue
        states[s] = {**{key: np.mean([d[key] for d in ds], axis=0).tolist()
                        for key in ("norm", "share", "sampled_norm", "veit")},
                     "share_range": [d["share_range"] for d in ds],
                     "veit_range": [d["veit_range"] for d in ds],
                     "grad_norm": [d["grad_norm"] for d in ds]}
    data = {"blocks": n, "length": list(range(n + 1)), "count": first["count"],
            "fraction": FRACTION, "states": states, "paper_range": [5, 17], "paper_blocks": 54}
    return {"claims": claims, "data": data}


def answer(data: dict, claims: list[dict]) -> str:
    """The 90% range of Veit's measure at the trained weights against half the blocks and
    against the range at initialisation (means over replicates)."""
    n = data.get("blocks")
    ranges = {s: [mean(r[i] for r in st.get("veit_range", [])) for i in (0, 1)]
              for s, st in data.get("states", {}).items()}
    lo, hi = ranges.get("trained", [None, None])
    if not finite(n, lo, hi):
        return sentence("Not measured: the trained net's path gradients are missing"
                        + caveat(claims))
    short = hi < n / 2
    text = (f"{'short' if short else 'not only short'} ones: at the trained weights of the "
            f"{n}-block ResNet, {round(100 * data.get('fraction', 0.9))}% of Veit's measure "
            f"comes from paths of length {num(lo)}–{num(hi)}, {'below' if short else 'not below'}"
            f" half the blocks ({num(n / 2)})")
    init = ranges.get("init", [None, None])
    if finite(*init):
        than = ("shorter than" if hi < init[1] else "longer than" if hi > init[1]
                else "as long as")
        text += f", {than} at initialisation ({num(init[0])}–{num(init[1])})"
    paper = data.get("paper_range")
    if paper:
        text += f"; Veit et al. found {paper[0]}–{paper[1]} of {data.get('paper_blocks')}"
    return sentence(text + caveat(claims))


def plot(data: dict, out_dir) -> list[str]:
    """Veit's measure and the exact shares per path length, trained vs init, with 90% ranges."""
    k = np.asarray(data["length"])
    n = data["blocks"]
    fig, axes = figure(2, 1, width=5.0, height=3.8)
    styles = {"trained": ("C0", "-", "trained"), "init": ("C1", "--", "at init")}
    pct = round(100 * data["fraction"])
    for ax, key in ((axes[0, 0], "veit"), (axes[0, 1], "share")):
        for state, (color, ls, label) in styles.items():
            st = data["states"].get(state)
            if st is None:
                continue
            v = np.asarray(st[key])
            ax.plot(k, v / np.abs(v).sum(), "o" + ls, ms=3, color=color, label=label)
            lo, hi = st[f"{key}_range"][0]
            ax.axvspan(lo - 0.5, hi + 0.5, color=color, alpha=0.13,
                       label=f"{label}: {pct}% in {lo}-{hi}")
        ax.axvline(n / 2, color="grey", ls=":", lw=1, label="n/2 (claim's bound)")
        ax.set_xlabel(f"path length k (residual branches traversed, of {n})")
        ax.set_ylabel("fraction of the total (sums to 1)")
        ax.legend(fontsize=7, loc="upper right", framealpha=0.9)
    lo, hi = data["paper_range"]
    axes[0, 0].set_title(f"Veit's measure (paper: {lo}-{hi} of {data['paper_blocks']}, "
                         f"trained)")
    axes[0, 1].set_title("Exact per-length shares (cancellation counted)")
    fig.suptitle(f"Which path lengths carry the gradient? {n}-block ResNet, trained vs init",
                 fontsize=10)
    return [save(fig, out_dir, "paths_trained.png")]
