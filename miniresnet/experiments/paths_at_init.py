"""Veit et al. 2016 at initialisation: the gradient at the stem of a deep ResNet taken apart
exactly by path length, beside Veit's sampled per-path estimator."""

from __future__ import annotations

import math

import numpy as np

from miniresnet import inspect, nn, ops
from miniresnet.backend_choice import current_backend
from miniresnet.creation import to_numpy
from miniresnet.experiments.answers import caveat, finite, mean, num, sentence
from miniresnet.experiments.claims import claim, mean_and_spread
from miniresnet.experiments.plots import figure, save
from miniresnet.nn import frozen_stats
from miniresnet.tracing import as_tensor
from miniresnet.transforms import vjp

NAME = "paths_at_init"
TITLE = "Which path lengths carry the gradient of a 54-block ResNet at initialisation?"
ESTIMATE = {"quick": 1.0, "default": 25.0, "full": 1500.0}
SOURCE = "Veit et al. 2016"
SETUP = (
    "A CIFAR ResNet (He et al. 2015, original post-activation blocks, batch norm in training "
    "mode, projection shortcuts) with n blocks per stage, 3n in all (54 at the default and full "
    "scales, as Veit et al.'s ResNet-110), on a batch of 8 Gaussian 8x8 one-channel images, at "
    "initialisation; the scalar is sum(out * c) with c standard normal. The gradient at the "
    "stem output is split exactly into g^(k), the sum over all C(n, k) paths through k residual "
    "branches (inspect.path_gradients, dynamic programming); paths_sum_exact checks that these "
    "add up to the gradient computed independently by one reverse pass. Veit's measure is "
    "C(n, k) times the mean gradient norm of single sampled paths of length k "
    "(inspect.path_gradients_sampled). Veit et al.'s 5-17 modules is for a TRAINED "
    "ResNet-110 on CIFAR-10; here the net is untrained, so the range may differ: the claims on "
    "it use papers.md check 5's rules (mean length below n/2 - sqrt(n); log mean norm linear "
    "in k with R^2 > 0.95), which are uncalibrated proposals, not the paper's numbers. The "
    "binomial fraction 0.4537% is exact arithmetic for n = 54."
)

_SCALES = {  # blocks per stage, channels x width, networks, samples per length k
    "quick": {"n": 2, "width": 0.25, "nets": 1, "samples": 16},
    "default": {"n": 18, "width": 1.0, "nets": 2, "samples": 16},
    "full": {"n": 18, "width": 1.0, "nets": 3, "samples": 1000},
}
_BATCH, _SIZE, _CLASSES = 8, 8, 10


def trials(scale: str, seed: int) -> list[dict]:
    """One trial per network: every path length k is sampled."""
    s = _SCALES[scale]
    return [{"n": s["n"], "width": s["width"], "batch": _BATCH, "size": _SIZE,
             "samples": s["samples"], "net": i} for i in range(s["nets"])]


def _gradient_at_stem(model, x, c) -> np.ndarray:
    """∂s/∂h_0 by one reverse pass through blocks and head (not by paths), host NumPy."""
    with frozen_stats(model):
        h0 = as_tensor(model.stem(x)).raw
        s, pull = vjp(lambda h: ops.sum(model.head(model.blocks(h)) * c), h0)
        out = pull(ops.ones_like(as_tensor(s)).raw)[0]
    return to_numpy(out)


def run_trial(config: dict, seed: int) -> dict:
    """Exact per-length gradients, Veit's sampled measure at every length, and the check."""
    be = current_backend()
    rng = np.random.default_rng(seed)
    model = nn.resnet_cifar(config["n"], width=config["width"], in_channels=1, seed=seed)
    model.train()
    x = be.asarray(rng.normal(size=(config["batch"], 1, config["size"], config["size"])),
                   "float64")
    c = be.asarray(rng.normal(size=(config["batch"], _CLASSES)), "float64")
    g = inspect.path_gradients(model, x, cotangent=c)
    direct = _gradient_at_stem(model, x, c)
    rel_err = float(np.linalg.norm(g.sum(0) - direct) / np.linalg.norm(direct))
    blocks = g.shape[0] - 1
    sampled = {k: inspect.path_gradients_sampled(model, x, k, config["samples"], seed=seed + k,
                                                 cotangent=c) for k in range(blocks + 1)}
    summary = inspect.path_summary(g, sampled)
    return {"blocks": blocks, "sum_rel_err": rel_err,
            "norm": summary["norm"].tolist(), "share": summary["share"].tolist(),
            "count": summary["count"].tolist(), "sampled_norm": summary["sampled_norm"].tolist(),
            "veit": summary["veit"].tolist(), "share_range": list(summary["share_range"]),
            "veit_range": list(summary["veit_range"])}


def binomial_fraction(n: int, lo: int, hi: int) -> float:
    """The fraction of the 2^n paths whose length is in lo..hi (exact integer arithmetic)."""
    return sum(math.comb(n, k) for k in range(lo, hi + 1)) / 2 ** n


def log_linear_fit(k, values) -> tuple[float, float]:
    """(slope, R²) of the least-squares line through (k, ln values)."""
    k, y = np.asarray(k, dtype=float), np.log(np.asarray(values, dtype=float))
    slope, intercept = np.polyfit(k, y, 1)
    resid = y - (slope * k + intercept)
    return float(slope), float(1 - resid @ resid / ((y - y.mean()) @ (y - y.mean())))


def _weighted_mean(weights) -> float:
    w = np.asarray(weights, dtype=float)
    return float(np.arange(w.size) @ w / w.sum())


def summarise(results: list, scale: str) -> dict:
    """Claims: Σ_k g^(k) = gradient, Veit's binomial 0.45%, the centre of Veit's measure and the
    exponential fall-off of single-path gradients; data: per-length curves (mean over nets)."""
    datas = [d for _, d in results]
    n = datas[0]["blocks"]
    fits = [log_linear_fit(range(n + 1), d["sampled_norm"]) for d in datas]
    centres = [_weighted_mean(d["veit"]) for d in datas]
    err = max(d["sum_rel_err"] for d in datas)
    threshold = n / 2 - math.sqrt(n)
    frac = 100 * binomial_fraction(54, 5, 17)
    slope, slope_sd, nn_ = mean_and_spread(f[0] for f in fits)
    r2, r2_sd, _ = mean_and_spread(f[1] for f in fits)
    centre, centre_sd, _ = mean_and_spread(centres)
    exact_centres = [_weighted_mean(np.abs(d["share"])) for d in datas]
    exact, exact_sd, _ = mean_and_spread(exact_centres)
    claims = [
        claim("paths_sum_exact", source=SOURCE, paper_status="derived", n=len(datas),
              claim=f"the {n + 1} per-length gradients g^(k) add up to the gradient at the stem "
                    f"(max relative error over nets)",
              measured=err, rule={"op": "lt", "value": 1e-12}),
        claim("veit_binomial_5_17", source=SOURCE, paper=0.45,
              claim="paths of length 5-17 are 0.45% of the 2^54 paths of a 54-block ResNet "
                    "(exact binomial, in %)",
              measured=frac, rule={"op": "abs_err_le", "value": 0.005}),
        claim("veit_log_norm_linear", source=SOURCE, n=nn_, spread=r2_sd, holds_at="default",
              claim="the log of the mean single-path gradient norm falls linearly with the path "
                    "length k (R^2 of the line, papers.md check 5)",
              measured=r2, rule={"op": "gt", "value": 0.95}),
        claim("veit_log_norm_slope", source=SOURCE, n=nn_, spread=slope_sd, holds_at="default",
              claim="a single path's gradient norm decreases exponentially with its length "
                    "(slope of ln mean norm per branch)",
              measured=slope, rule={"op": "lt", "value": 0.0}),
        claim("veit_mean_length_at_init", source=SOURCE, paper_status="derived", n=nn_,
              spread=centre_sd, holds_at="default",
              claim=f"the gradient comes from short paths: the mean length under Veit's measure "
                    f"is below n/2 - sqrt(n) = {threshold:.2f} for n = {n} (papers.md check 5; "
                    f"untrained net)",
              measured=centre, rule={"op": "lt", "value": threshold}),
        claim("exact_share_mean_length_at_init", source=SOURCE, paper_status="derived",
              n=nn_, spread=exact_sd, holds_at="default",
              claim=f"with cancellations counted (the exact shares |<g^(k), g>|/||g||^2), the "
                    f"mean path length is below n/2 - sqrt(n) = {threshold:.2f}",
              measured=exact, rule={"op": "lt", "value": threshold}),
    ]
    mean = lambda key: np.mean([d[key] for d in datas], axis=0).tolist()  # noqa: E731
    data = {"blocks": n, "nets": len(datas), "length": list(range(n + 1)),
            "count": datas[0]["count"], "norm": mean("norm"), "share": mean("share"),
            "sampled_norm": mean("sampled_norm"), "veit": mean("veit"),
            "share_range": [d["share_range"] for d in datas],
            "veit_range": [d["veit_range"] for d in datas],
            "veit_centre": centres, "share_centre": exact_centres,
            "slope": [f[0] for f in fits], "r2": [f[1] for f in fits],
            "sum_rel_err": [d["sum_rel_err"] for d in datas], "binomial_5_17_percent": frac,
            "paper_range": [5, 17]}
    return {"claims": claims, "data": data}


def answer(data: dict, claims: list[dict]) -> str:
    """The centre of Veit's measure and of the exact shares against n/2, the centre of the path
    count (the mean length of a path picked at random)."""
    n = data.get("blocks")
    veit, exact = mean(data.get("veit_centre")), mean(data.get("share_centre"))
    if not finite(n, veit):
        return sentence("Not measured: the per-length gradients are missing" + caveat(claims))
    shorter = veit < n / 2
    text = (f"{'shorter' if shorter else 'no shorter'} paths than average: in a {n}-block "
            f"ResNet at initialisation Veit's measure centres on length {num(veit)}")
    if finite(exact):
        text += f" ({num(exact)} counting cancellations)"
    text += f", against {num(n / 2)} for a path drawn at random"
    return sentence(text + caveat(claims))


def plot(data: dict, out_dir) -> list[str]:
    """Per path length: the exact norm, the share, the path count and Veit's measure."""
    k = np.asarray(data["length"])
    n = data["blocks"]
    fig, axes = figure(2, 1, width=5.0, height=3.8)
    ax = axes[0, 0]
    norm, sampled = np.asarray(data["norm"]), np.asarray(data["sampled_norm"])
    ax.semilogy(k, norm, "o-", ms=3, label="exact ‖g^(k)‖ (all paths of length k)")
    ax.semilogy(k, sampled, "s-", ms=3, label="mean ‖gradient‖ of one sampled path")
    ax.set_xlabel("path length k (residual branches traversed)")
    ax.set_ylabel("gradient norm at the stem (log)")
    ax.set_title(f"Per-length gradients, {n} blocks at init")
    ax.legend()
    ax = axes[0, 1]
    share = np.asarray(data["share"])
    count = np.asarray(data["count"])
    veit = np.asarray(data["veit"])
    ax.plot(k, share / np.abs(share).sum(), "o-", ms=3, label="exact share ⟨g^(k), g⟩/‖g‖²")
    ax.plot(k, veit / veit.sum(), "s-", ms=3, label="Veit's measure C(n,k)·mean norm")
    ax.plot(k, count / count.sum(), ":", color="grey", label="path count C(n,k) / 2^n")
    for (lo, hi), color in ((data["veit_range"][0], "C1"), (data["share_range"][0], "C0")):
        ax.axvspan(lo - 0.5, hi + 0.5, color=color, alpha=0.12)
    if n == 54:
        lo, hi = data["paper_range"]
        ax.axvspan(lo - 0.5, hi + 0.5, fill=False, hatch="//", edgecolor="C3",
                   label="Veit et al.: 5-17 (trained net)")
    ax.set_xlabel("path length k")
    ax.set_ylabel("fraction (each curve sums to 1)")
    ax.set_title("Where the gradient lies (shaded: 90% ranges)")
    ax.legend(loc="upper right", fontsize=7, framealpha=0.9)
    return [save(fig, out_dir, "paths_at_init.png")]
