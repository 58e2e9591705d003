"""Shattered gradients (Balduzzi et al. 2017): how rough is df/dx of a deep ReLU net at init?

For a net f: ℝ → ℝ (``nn.mlp``, full pre-activation, one layer per block, He init) the exact
input gradient ``df/dx`` is taken at 256 grid points on [−2, 2] (the grid is the batch; batch
norm in training mode with the grid's statistics held fixed, ``batch_stats="frozen"``). Its
lag-1 autocorrelation over the grid says whether neighbouring inputs get related gradients
(≈ 1: smooth, brown-noise-like) or unrelated ones (≈ 0: white noise, "shattered").
"""

from __future__ import annotations

import numpy as np

from miniresnet import inspect, nn
from miniresnet.backend_choice import current_backend
from miniresnet.experiments import plots
from miniresnet.experiments.answers import caveat, finite, num, sentence
from miniresnet.experiments.claims import claim, judge, mean_and_spread

NAME = "shattered_gradients"
TITLE = "Do skip connections keep the input gradient of a deep ReLU net from shattering?"
ESTIMATE = {"quick": 4, "default": 30, "full": 210}
SOURCE = "Balduzzi et al. 2017"
SETUP = (
    "Balduzzi et al.'s setup: f: R -> R, a ReLU MLP (full pre-activation blocks "
    "x <- W relu(BN(x)) feedforward, x <- x + beta W relu(BN(x)) residual, He init), df/dx "
    "exactly at 256 points on [-2, 2] with the grid as the batch and its batch-norm statistics "
    "held fixed. The lag-1 autocorrelation is that of one net's gradient over the grid, "
    "averaged over nets. Without BN every layer has a bias drawn from N(0, 0.1^2). The ACF "
    "reference values are our own simulation of this setup (papers.md 1.7, 'derived'; the "
    "paper states them qualitatively and in a figure). Co-activation is the fraction of units "
    "active for both points of a pair of distinct grid points, averaged over pairs and over "
    "the blocks of the deepest feedforward net. The looks-linear net (CReLU, mirrored "
    "orthogonal weights, no BN) is exactly linear at initialisation, so its ACF is undefined "
    "and its gradient's spread (max - min) / |mean| is reported instead."
)

GRID = 256
#: name -> nn.mlp keyword arguments (beyond depth, width and seed)
VARIANTS = {
    "feedforward_bn": dict(residual=False, norm=True),
    "resnet_bn": dict(residual=True, norm=True),
    "resnet_bn_beta0.1": dict(residual=True, norm=True, beta=0.1),
    "feedforward": dict(residual=False, norm=False, bias_init=0.1),
    "resnet": dict(residual=True, norm=False, bias_init=0.1),
    "resnet_beta0.1": dict(residual=True, norm=False, bias_init=0.1, beta=0.1),
    "looks_linear": dict(residual=False, norm=False, activation="crelu", init="looks_linear"),
}
LABELS = {"feedforward_bn": "feedforward + BN", "resnet_bn": "resnet + BN",
          "resnet_bn_beta0.1": "resnet + BN, β = 0.1", "feedforward": "feedforward, no BN",
          "resnet": "resnet, no BN", "resnet_beta0.1": "resnet, no BN, β = 0.1",
          "looks_linear": "looks-linear (CReLU)"}
#: the variants whose co-activation is profiled at the deepest depth
COACTIVATION = ("feedforward_bn", "feedforward")
SCALES = {
    "quick": dict(width=100, nets=3, depths=[1, 4, 24, 50]),
    "default": dict(width=200, nets=8, depths=[1, 2, 4, 8, 16, 24, 32, 50]),
    "full": dict(width=200, nets=20, depths=[1, 2, 3, 4, 6, 8, 12, 16, 20, 24, 32, 40, 50]),
}
#: the reference lag-1 ACFs (papers.md 1.7, our simulation of the paper's setup, 10 nets)
REFERENCE = {("feedforward_bn", 24): -0.02, ("resnet_bn", 50): 0.54,
             ("resnet_bn_beta0.1", 50): 0.87}
#: depths whose gradient curve (of the first net) is kept for the figure, per variant
CURVES = {"feedforward_bn": (1, 24), "resnet_bn": (50,), "resnet_bn_beta0.1": (50,),
          "feedforward": (50,), "looks_linear": (50,)}


def grid() -> np.ndarray:
    """The inputs: ``GRID`` points on [−2, 2], shape (GRID, 1)."""
    return np.linspace(-2.0, 2.0, GRID).reshape(-1, 1)




def trials(scale: str, seed: int) -> list[dict]:
    """One trial per (variant, depth), each of ``nets`` independently initialised networks;
    the deepest feedforward trials also profile the co-activation. The looks-linear net is
    one trial at the deepest depth."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; valid: {', '.join(SCALES)}")
    s = SCALES[scale]
    deepest = max(s["depths"])
    out = [{"variant": v, "depth": d, "width": s["width"], "nets": s["nets"],
            "coactive": v in COACTIVATION and d == deepest}
           for v in VARIANTS if v != "looks_linear" for d in s["depths"]]
    out.append({"variant": "looks_linear", "depth": deepest, "width": s["width"], "nets": 1,
                "coactive": False})
    return out


def _net_seed(seed: int, i: int) -> int:
    return int(np.random.SeedSequence([seed, i]).generate_state(1)[0])


def run_trial(config: dict, seed: int) -> dict:
    """Per net: the lag-1 ACF of df/dx over the grid (None where the gradient is constant)
    and, for the looks-linear net, its spread (max − min) / |mean|; the first net's gradient
    curve at the depths of :data:`CURVES`; with ``config["coactive"]``, each net's per-block
    co-active fraction."""
    variant, depth, width = config["variant"], config["depth"], config["width"]
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
    x = current_backend().asarray(grid(), "float64")
    acf1, spread, coactive, curve = [], [], [], None
    for i in range(config["nets"]):
        model = nn.mlp(depth, width, order="full_preact", layers=1, in_features=1,
                       out_features=1, seed=_net_seed(seed, i), **VARIANTS[variant])
        g = inspect.input_gradients(model, x, batch_stats="frozen")[:, 0]
        r = inspect.autocorrelation(g, 1)[1]
        acf1.append(float(r) if np.isfinite(r) else None)
        if variant == "looks_linear":  # its ACF is undefined: the gradient is constant
            spread.append(float((g.max() - g.min()) / abs(g.mean())))
        if i == 0 and depth in CURVES.get(variant, ()):
            curve = g.tolist()
        if config["coactive"]:
            p = inspect.profile(model, x)
            blocks = [k for k, name in enumerate(p.activations) if name.startswith("blocks.")]
            coactive.append(p.coactive[blocks].tolist())
    return {"acf1": acf1, "spread": spread, "curve": curve, "coactive": coactive}


def _finite(values) -> list[float]:
    return [v for v in values if v is not None]


def summarise(results: list, scale: str) -> dict:
    """ACF(1) against depth per variant, the kept curves, co-activation per block, and the
    claims."""
    acf, curves, coact, ll_spread = {}, {}, {}, []
    for config, data in results:
        v, d = config["variant"], config["depth"]
        if v == "looks_linear":
            ll_spread += data["spread"]
        else:
            mean, sd, n = mean_and_spread(_finite(data["acf1"]))
            acf.setdefault(v, {})[d] = {"mean": mean, "spread": sd, "n": n}
        if data["curve"] is not None:
            curves.setdefault(v, {})[str(d)] = data["curve"]
        if data["coactive"]:
            per_block = np.array(data["coactive"])
            coact[v] = {"depth": d, "mean": per_block.mean(axis=0).tolist(),
                        "spread": per_block.std(axis=0).tolist(), "nets": len(per_block),
                        "net_mean": per_block.mean(axis=1).tolist(),
                        "block20": per_block[:, 19].tolist() if d >= 20 else None}
    acf_data = {v: {"depths": sorted(by), "mean": [by[d]["mean"] for d in sorted(by)],
                    "spread": [by[d]["spread"] for d in sorted(by)]} for v, by in acf.items()}
    claims = []

    def acf_claim(cid, variant, depth, text, rule, holds_at):
        got = acf.get(variant, {}).get(depth)
        if got is None:
            return
        claims.append(judge(claim(
            cid, source=SOURCE, claim=text, measured=got["mean"], n=got["n"],
            spread=got["spread"], paper=REFERENCE[(variant, depth)], paper_status="derived",
            rule=rule, holds_at=holds_at), scale))

    acf_claim("shattered_acf1_ff_L24", "feedforward_bn", 24,
              "the gradient of a 24-layer feedforward BN net is white noise: lag-1 ACF near 0",
              {"op": "lt", "value": 0.2}, "quick")
    acf_claim("shattered_acf1_resnet_bn_L50", "resnet_bn", 50,
              "a 50-block BN resnet keeps its gradient correlated (lag-1 ACF about 0.5 in the "
              "authors' figure, 0.54 in our simulation)",
              {"op": "between", "value": [0.4, 0.7]}, "default")
    acf_claim("shattered_acf1_resnet_bn_beta0.1_L50", "resnet_bn_beta0.1", 50,
              "with branches scaled by beta = 0.1 a 50-block BN resnet's gradient resembles "
              "brown noise (lag-1 ACF about 0.87)", {"op": "gt", "value": 0.8}, "quick")
    if "feedforward_bn" in coact:
        c = coact["feedforward_bn"]
        mean, sd, n = mean_and_spread(c["net_mean"])
        claims.append(judge(claim(
            "coactivation_bn", source=SOURCE, measured=mean, n=n, spread=sd, paper=0.25,
            claim=f"with BN a pair of inputs is co-active in a quarter of the units at every "
                  f"depth (mean over the {c['depth']} blocks of a deep feedforward net)",
            rule={"op": "abs_err_le", "value": 0.02}, holds_at="quick"), scale))
    if coact.get("feedforward", {}).get("block20"):
        mean, sd, n = mean_and_spread(coact["feedforward"]["block20"])
        claims.append(judge(claim(
            "coactivation_nobn_L20", source=SOURCE, measured=mean, n=n, spread=sd, paper=0.44,
            paper_status="derived",
            claim="without BN (random biases) the co-active fraction climbs with depth, above "
                  "0.4 by block 20", rule={"op": "gt", "value": 0.4}, holds_at="quick"), scale))
    if ll_spread:
        mean, sd, n = mean_and_spread(ll_spread)
        claims.append(judge(claim(
            "looks_linear_constant_gradient", source=SOURCE, measured=mean, n=n, spread=sd,
            paper=0.0, claim="a looks-linear initialised CReLU net is linear at initialisation: "
                             "its gradient is the same at every input ((max - min) / |mean|)",
            rule={"op": "lt", "value": 1e-10}, holds_at="quick"), scale))
    return {"claims": claims,
            "data": {"grid": [-2.0, 2.0, GRID], "acf1": acf_data, "curves": curves,
                     "coactive": coact, "looks_linear_spread": ll_spread,
                     "reference": [{"variant": v, "depth": d, "acf1": r}
                                   for (v, d), r in REFERENCE.items()],
                     "labels": LABELS}}


WHITE = 0.2  # lag-1 ACF below this: white noise, shattered (the rule of shattered_acf1_ff_L24)


def answer(data: dict, claims: list[dict]) -> str:
    """Whether, with batch norm, the feedforward net's gradient is white noise (lag-1 ACF below
    ``WHITE``) and the resnet's is not, at the deepest depth both were measured at."""
    acf = data.get("acf1", {})

    def at(variant: str) -> dict:
        v = acf.get(variant, {})
        return {d: m for d, m in zip(v.get("depths", []), v.get("mean", [])) if finite(m)}

    ff, res, beta = at("feedforward_bn"), at("resnet_bn"), at("resnet_bn_beta0.1")
    common = sorted(set(ff) & set(res))
    if not common:
        return sentence("Not measured: the feedforward or the resnet BN gradients are missing"
                        + caveat(claims))
    depth = common[-1]
    ff_white, res_white = ff[depth] < WHITE, res[depth] < WHITE
    lead = ("yes, with batch norm" if ff_white and not res_white else
            "no: both shatter" if ff_white else "no: the resnet's shatters, the feedforward's "
            "does not" if res_white else "not at this depth: neither shatters")
    with_beta = f" ({num(beta[depth])} with β = 0.1)" if depth in beta else ""
    grid = data.get("grid", [None, None, GRID])[2]
    white = f"white noise (ACF < {WHITE:g})" if ff_white else f"not white noise (ACF ≥ {WHITE:g})"
    return sentence(
        f"{lead}: at {depth} blocks the lag-1 autocorrelation of df/dx over {grid} inputs is "
        f"{num(res[depth])} for a BN resnet{with_beta} against {num(ff[depth])} for the "
        f"feedforward BN net, whose gradient is {white}" + caveat(claims))


def plot(data: dict, out_dir) -> list[str]:
    """Three figures: the gradient curves (as the paper's Fig. 1), lag-1 ACF against depth,
    and co-activation per block with and without BN."""
    names = []
    lo, hi, m = data["grid"]
    xs = np.linspace(lo, hi, int(m))
    labels = data["labels"]
    panels = [(v, d) for v, by in data["curves"].items() for d in sorted(by, key=int)]
    if panels:
        cols = min(3, len(panels))
        rows = -(-len(panels) // cols)
        fig, axes = plots.figure(cols, rows, width=3.6, height=2.6)
        for ax, (v, d) in zip(axes.flat, panels):
            ax.plot(xs, data["curves"][v][d], lw=0.8)
            ax.set_title(f"{labels[v]}, depth {d}")
            ax.set_xlabel("input x")
            ax.set_ylabel("df/dx")
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        fig.suptitle("Does df/dx stay smooth in x as depth grows? (one net each)", fontsize=11)
        names.append(plots.save(fig, out_dir, "shattered_gradients_curves.png"))
    fig, axes = plots.figure(1, 1, width=7.5, height=4.0)
    ax = axes[0, 0]
    colors = {}
    for v, series in data["acf1"].items():
        line = ax.errorbar(series["depths"], series["mean"], yerr=series["spread"], marker="o",
                           ms=3, capsize=2, lw=1, label=labels[v],
                           ls="-" if "_bn" in v else "--")
        colors[v] = line[0].get_color()
    for r in data["reference"]:
        ax.plot(r["depth"], r["acf1"], "x", color=colors.get(r["variant"], "k"), ms=9, mew=2.5)
    ax.plot([], [], "kx", ms=9, mew=2.5, label="reference (our simulation, papers.md §1.7)")
    ax.axhline(0.0, color="gray", lw=0.8)
    ax.set_xlabel("depth (blocks)")
    ax.set_ylabel("lag-1 autocorrelation of df/dx")
    fig.suptitle("How fast does the input gradient decorrelate with depth?\n(lag-1 ACF over "
                 "the 256-point grid, mean ± sd over nets)", fontsize=11)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0))
    names.append(plots.save(fig, out_dir, "shattered_gradients_acf.png"))
    if data["coactive"]:
        fig, axes = plots.figure(1, 1, width=6.0, height=3.6)
        ax = axes[0, 0]
        for v, c in data["coactive"].items():
            layer = np.arange(1, len(c["mean"]) + 1)
            mean, sd = np.array(c["mean"]), np.array(c["spread"])
            ax.plot(layer, mean, marker=".", label=f"{labels[v]} (depth {c['depth']})")
            ax.fill_between(layer, mean - sd, mean + sd, alpha=0.2)
        ax.axhline(0.25, color="k", ls=":", label="paper: 1/4 with BN")
        ax.axhspan(0.23, 0.27, color="k", alpha=0.07)
        ax.set_xlabel("block")
        ax.set_ylabel("co-active fraction (mean over input pairs)")
        ax.set_title("Are two inputs co-active in a quarter of the units at every depth?")
        ax.legend()
        names.append(plots.save(fig, out_dir, "shattered_gradients_coactivation.png"))
    return names
