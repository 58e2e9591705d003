"""He et al. 2016 (Eq. 4-8): a shortcut scaled by λ multiplies the gradient through L blocks by
λ^L, exactly when the branches are zero and the shortcut is the identity; with live branches,
batch norm after the addition, projections, orderings and residual scaling β, measured."""

from __future__ import annotations

import math

import numpy as np

from miniresnet import inspect, nn
from miniresnet.backend_choice import current_backend
from miniresnet.experiments.answers import caveat, finite, num, sentence
from miniresnet.experiments.claims import claim, mean_and_spread
from miniresnet.experiments.plots import figure, save

NAME = "shortcut_scaling"
TITLE = "How does scaling the shortcut by λ (or the branch by β) scale the gradient through depth?"
ESTIMATE = {"quick": 1.0, "default": 4.0, "full": 60.0}
SOURCE = "He et al. 2016"
SETUP = (
    "Dense residual networks (nn.mlp, width 32, one linear layer per block, He init, batch 16 "
    "of Gaussian inputs of dimension 32, batch norm in training mode, scalar sum(out * c)) at "
    "initialisation; the gradient ratio is ||ds/dh_l|| / ||ds/dh_L||, the gradient at the input "
    "of the last L - l blocks relative to their output (inspect.profile). shortcut_lambda_exact "
    "is pinned to He et al.'s exact setting: identity shortcuts, zero branches (skipinit=0 sets "
    "the branch scalar alpha to 0) and nothing after the addition (orders relu_before_add, "
    "relu_preact, full_preact), where Eq. 8 says the ratio is lambda^L. It cannot hold where "
    "something follows the addition: 'post' (a ReLU zeroes part of the gradient once; the ratio "
    "is then a constant times lambda^L) and 'bn_after_add', whose training-mode batch norm "
    "undoes any scaling of its input, lambda included (measured at depths up to 16: a chain of "
    "ReLU(BN(.)) with zero branches collapses onto few active samples beyond that), nor through "
    "projection shortcuts (a CIFAR ResNet's stage transitions). With live branches Eq. 8's "
    "lambda^L is only the skip-only term: the claims on the per-block gradient growth rate "
    "measure whether the whole gradient follows it at initialisation. The five orderings and "
    "the residual scaling beta (Inception-v4's 0.1-0.3, Balduzzi et al.'s beta) are shown at "
    "lambda = 1, live branches."
)

LAMBDAS = (0.5, 0.9, 1.0, 1.1)
EXACT_ORDERS = ("relu_before_add", "relu_preact", "full_preact")
ORDERS = ("post", "bn_after_add", "relu_before_add", "relu_preact", "full_preact")
BETAS = (1.0, 0.3, 0.1)
_WIDTH, _BATCH = 32, 16
_SCALES = {  # depth of the deep nets, depth of the bn_after_add chains, seeds
    "quick": {"depth": 16, "bn_depth": 8, "seeds": 1},
    "default": {"depth": 64, "bn_depth": 16, "seeds": 3},
    "full": {"depth": 200, "bn_depth": 16, "seeds": 10},
}


def trials(scale: str, seed: int) -> list[dict]:
    """Zero-branch chains per order, live-branch nets per seed (with and without BN), the five
    orderings and the β sweep per seed, and a CIFAR ResNet with projection shortcuts."""
    s = _SCALES[scale]
    out = [{"kind": "zero", "order": o, "depth": s["depth"]} for o in ORDERS if o != "bn_after_add"]
    out.append({"kind": "zero", "order": "bn_after_add", "depth": s["bn_depth"]})
    for i in range(s["seeds"]):
        out += [{"kind": "live", "norm": norm, "depth": s["depth"], "net": i}
                for norm in (True, False)]
        out.append({"kind": "orders", "depth": s["depth"], "net": i})
        out += [{"kind": "beta", "norm": norm, "depth": s["depth"], "net": i}
                for norm in (True, False)]
    out.append({"kind": "projection", "n": 2})
    return out


def _ratios(model, x) -> list[float]:
    """‖∂s/∂h_l‖ / ‖∂s/∂h_L‖ for l = 0..L."""
    g = inspect.profile(model, x).grad_norm
    return (g / g[-1]).tolist()


def _mlp(depth, seed, **kw):
    return nn.mlp(depth, _WIDTH, in_features=_WIDTH, out_features=10, residual=True, seed=seed,
                  **kw)


def run_trial(config: dict, seed: int) -> dict:
    """Gradient ratios through depth; every λ (or β, or order) of a trial shares its weights."""
    be = current_backend()
    rng = np.random.default_rng(seed)
    kind, depth = config["kind"], config.get("depth")
    if kind == "projection":
        x = be.asarray(rng.normal(size=(8, 1, 8, 8)), "float64")
        models = {lam: nn.resnet_cifar(config["n"], width=0.25, in_channels=1, lam=lam,
                                       order="full_preact", skipinit=0.0, seed=seed)
                  for lam in LAMBDAS}
        out = {}
        for lam, m in models.items():
            g = inspect.profile(m, x).grad_norm
            out[str(lam)] = (g[:-1] / g[1:]).tolist()  # per block: ‖g_{l-1}‖ / ‖g_l‖
        shortcuts = [type(b.shortcut).__name__ for b in m.blocks]
        return {"per_block": out, "projection": [s != "Identity" for s in shortcuts]}
    x = be.asarray(rng.normal(size=(_BATCH, _WIDTH)), "float64")
    if kind == "zero":
        return {str(lam): _ratios(_mlp(depth, seed, lam=lam, order=config["order"],
                                       skipinit=0.0), x) for lam in LAMBDAS}
    if kind == "live":
        return {str(lam): _ratios(_mlp(depth, seed, lam=lam, norm=config["norm"]), x)
                for lam in LAMBDAS}
    if kind == "orders":
        return {o: _ratios(_mlp(depth, seed, order=o), x) for o in ORDERS}
    if kind == "beta":
        return {str(b): _ratios(_mlp(depth, seed, beta=b, norm=config["norm"]), x)
                for b in BETAS}
    raise ValueError(f"shortcut_scaling: unknown trial kind {kind!r}")


def lambda_error(ratios: dict) -> float:
    """The largest relative error of ‖∂s/∂h_l‖/‖∂s/∂h_L‖ against λ^(L-l), over λ and l."""
    worst = 0.0
    for lam, r in ratios.items():
        r = np.asarray(r)
        expected = float(lam) ** np.arange(r.size - 1, -1, -1)
        worst = max(worst, float(np.max(np.abs(r - expected) / expected)))
    return worst


def surviving_fraction(ratios: dict) -> float:
    """How much of λ^L survives: max over λ ≠ 1 of |ln(ratio_λ / ratio_1)| / |L ln λ| at the
    input (1 for identity shortcuts with zero branches, 0 if the λ-dependence is cancelled)."""
    base = ratios["1.0"][0]
    depth = len(ratios["1.0"]) - 1
    return max(abs(math.log(r[0] / base)) / abs(depth * math.log(float(lam)))
               for lam, r in ratios.items() if float(lam) != 1.0)


def rate(ratios: list) -> float:
    """The per-block growth rate of the gradient: (‖∂s/∂h_0‖/‖∂s/∂h_L‖)^(1/L)."""
    return ratios[0] ** (1 / (len(ratios) - 1))


def _mean_curves(datas: list[dict]) -> dict:
    """Geometric mean of the ratio curves over seeds, per key."""
    return {key: np.exp(np.mean([np.log(d[key]) for d in datas], axis=0)).tolist()
            for key in datas[0]}


def summarise(results: list, scale: str) -> dict:
    """Claims: λ^L exact (zero branches, identity shortcuts, nothing after the addition), batch
    norm after the addition cancels λ, and the live-branch growth rates; data: the curves."""
    by_kind: dict[str, list] = {}
    for config, data in results:
        by_kind.setdefault(config["kind"], []).append((config, data))
    zero = {c["order"]: d for c, d in by_kind.get("zero", [])}
    exact_err = max(lambda_error(zero[o]) for o in EXACT_ORDERS)
    bn_frac = surviving_fraction(zero["bn_after_add"])
    post_factor = [r[0] / float(lam) ** (len(r) - 1) for lam, r in zero["post"].items()]
    live_bn = [d for c, d in by_kind["live"] if c["norm"]]
    live_plain = [d for c, d in by_kind["live"] if not c["norm"]]
    rates = {lam: mean_and_spread(rate(d[str(lam)]) for d in live_bn) for lam in LAMBDAS}
    depth = len(zero["full_preact"]["1.0"]) - 1
    bn_depth = len(zero["bn_after_add"]["1.0"]) - 1
    claims = [
        claim("shortcut_lambda_exact", source=SOURCE, paper_status="derived",
              claim=f"with zero branches and identity shortcuts, the gradient through L blocks "
                    f"is exactly lambda^L times the output's (Eq. 8; max relative error over "
                    f"lambda in {list(LAMBDAS)}, L = 1..{depth} and three orderings)",
              measured=exact_err, rule={"op": "lt", "value": 1e-12}),
        claim("bn_after_add_cancels_lambda", source=SOURCE, paper_status="derived",
              claim=f"batch norm after the addition (training mode) cancels lambda: the fraction "
                    f"of lambda^L left in the gradient through {bn_depth} zero-branch blocks "
                    f"(1 with identity-shortcut orders; batch norm depends on lambda only through "
                    f"its epsilon)",
              measured=bn_frac, rule={"op": "lt", "value": 0.01}),
        claim("shortcut_live_rate_lam1.1", source=SOURCE, n=rates[1.1][2], spread=rates[1.1][1],
              claim=f"lambda = 1.1 > 1 with live branches (BN, full pre-activation): the "
                    f"gradient grows exponentially (per-block rate over {depth} blocks)",
              measured=rates[1.1][0], rule={"op": "gt", "value": 1.0}),
        claim("shortcut_live_rate_lam0.5", source=SOURCE, n=rates[0.5][2], spread=rates[0.5][1],
              claim=f"lambda = 0.5 < 1 with live branches (BN, full pre-activation): the "
                    f"gradient is exponentially small (per-block rate over {depth} blocks; "
                    f"Eq. 8's factor lambda^L is only the skip-only term)",
              measured=rates[0.5][0], rule={"op": "lt", "value": 1.0}),
    ]
    proj = by_kind["projection"][0][1]
    data = {
        "lambdas": list(LAMBDAS), "orders": list(ORDERS), "betas": list(BETAS),
        "depth": depth, "zero": zero, "exact_error": exact_err, "bn_surviving": bn_frac,
        "post_factor": post_factor,
        "live_bn": _mean_curves(live_bn), "live_plain": _mean_curves(live_plain),
        "live_bn_rate": {str(lam): rates[lam][0] for lam in LAMBDAS},
        "live_plain_rate": {str(lam): mean_and_spread(rate(d[str(lam)]) for d in live_plain)[0]
                            for lam in LAMBDAS},
        "orders_curves": _mean_curves([d for _, d in by_kind["orders"]]),
        "beta_bn": _mean_curves([d for c, d in by_kind["beta"] if c["norm"]]),
        "beta_plain": _mean_curves([d for c, d in by_kind["beta"] if not c["norm"]]),
        "projection": proj,
    }
    return {"claims": claims, "data": data}


def _blocks_back(curve) -> np.ndarray:
    """x-axis: the number of blocks the gradient went back through (L - l)."""
    return np.arange(len(curve))[::-1]


EXACT = 1e-12  # relative error below this: exactly lambda^L (shortcut_lambda_exact's rule)


def answer(data: dict, claims: list[dict]) -> str:
    """Whether zero-branch nets follow λ^L exactly, and whether with live BN branches the
    gradient still grows for λ > 1 and shrinks for λ < 1, as λ^L would make it."""
    err, depth = data.get("exact_error"), data.get("depth", "?")
    rates = {float(lam): r for lam, r in data.get("live_bn_rate", {}).items() if finite(r)}
    live = {lam: rates[lam] for lam in (1.1, 0.5) if lam in rates}
    follows = all((r > 1) == (lam > 1) for lam, r in live.items())
    if not finite(err):
        text = "unmeasured with zero branches"
    elif err < EXACT:
        text = (f"exactly as λ^L {'' if follows else 'only '}with zero branches (relative "
                f"error {num(err)} over {depth} blocks)")
    else:
        text = (f"not exactly as λ^L even with zero branches (relative error {num(err)} over "
                f"{depth} blocks)")
    if live:
        said = " and ".join(f"{'grows' if r > 1 else 'shrinks'} ×{num(r)}"
                            f"{'' if i else ' per block'} at λ = {lam:g}"
                            for i, (lam, r) in enumerate(live.items()))
        text += f"; with live BN branches the gradient {said}"
        wrong = [lam for lam, r in live.items() if (r > 1) != (lam > 1)]
        if wrong:
            text += (f", where λ^L would {'shrink' if wrong[0] < 1 else 'grow'} it "
                     f"(He et al.'s Eq. 8)")
    return sentence(text + caveat(claims, skip={"shortcut_live_rate_lam1.1",
                                                "shortcut_live_rate_lam0.5"}))


def plot(data: dict, out_dir) -> list[str]:
    """Two figures: the λ sweep (exact, bn_after_add, live, projection) and orders / β."""
    fig, axes = figure(2, 2, width=4.6, height=3.5)
    lams = [str(float(v)) for v in data["lambdas"]]
    ax = axes[0, 0]
    for i, lam in enumerate(lams):
        r = np.asarray(data["zero"]["full_preact"][lam])
        steps = _blocks_back(r)
        ax.semilogy(steps[::4], r[::4], "o", ms=3, color=f"C{i}", label=f"λ = {lam} measured")
        ax.semilogy(steps, float(lam) ** steps, "-", lw=0.8, color=f"C{i}")
        p = np.asarray(data["zero"]["post"][lam])
        ax.semilogy(_blocks_back(p)[2::4], p[2::4], "x", ms=4, color=f"C{i}")
    ax.set_title("Zero branches: ratio = λ^L exactly (lines)")
    ax.set_xlabel("blocks back-propagated through, L")
    ax.set_ylabel("‖∂s/∂h_in‖ / ‖∂s/∂h_out‖ (log)")
    ax.legend(title="o full_preact, x post", fontsize=7, title_fontsize=7)
    ax = axes[0, 1]
    for i, lam in enumerate(lams):
        r = np.asarray(data["zero"]["bn_after_add"][lam])
        steps = _blocks_back(r)
        ax.semilogy(steps, r, "o-", ms=3, color=f"C{i}", label=f"λ = {lam}")
        ax.semilogy(steps, float(lam) ** steps, ":", lw=0.8, color=f"C{i}")
    ax.set_title("bn_after_add: BN cancels λ (dotted: λ^L)")
    ax.set_xlabel("blocks back-propagated through, L")
    ax.set_ylabel("gradient ratio (log)")
    ax.legend(fontsize=7)
    ax = axes[1, 0]
    for i, lam in enumerate(lams):
        for key, style in (("live_bn", "-"), ("live_plain", "--")):
            r = np.asarray(data[key][lam])
            ax.semilogy(_blocks_back(r), r, style, color=f"C{i}",
                        label=f"λ = {lam}" if key == "live_bn" else None)
        ax.semilogy(_blocks_back(r), float(lam) ** _blocks_back(r), ":", lw=0.8, color=f"C{i}")
    ax.set_title("Live branches: solid BN, dashed no BN, dotted λ^L")
    ax.set_xlabel("blocks back-propagated through, L")
    ax.set_ylabel("gradient ratio (log)")
    ax.legend(fontsize=7)
    ax = axes[1, 1]
    proj = data["projection"]
    blocks = np.arange(1, len(proj["projection"]) + 1)
    for i, lam in enumerate(lams):
        r = np.asarray(proj["per_block"][lam]) / float(lam)
        ax.plot(blocks, r, "o-", ms=4, color=f"C{i}", label=f"λ = {lam}")
    for b, is_proj in zip(blocks, proj["projection"]):
        if is_proj:
            ax.axvspan(b - 0.4, b + 0.4, color="grey", alpha=0.2)
    ax.set_yscale("log")
    ax.set_title("CIFAR ResNet, zero branches: per-block ratio / λ\n"
                 "(1 for identity shortcuts; grey: projection)")
    ax.set_xlabel("block")
    ax.set_ylabel("‖∂s/∂h_(l-1)‖ / (λ ‖∂s/∂h_l‖) (log)")
    ax.legend(fontsize=7)
    names = [save(fig, out_dir, "shortcut_lambda.png")]

    fig, axes = figure(2, 1, width=4.8, height=3.6)
    ax = axes[0, 0]
    for i, order in enumerate(data["orders"]):
        r = np.asarray(data["orders_curves"][order])
        ax.semilogy(_blocks_back(r), r, "-", color=f"C{i}", label=order)
    ax.set_title("Five orderings (BN, λ = β = 1)")
    ax.set_xlabel("blocks back-propagated through, L")
    ax.set_ylabel("‖∂s/∂h_in‖ / ‖∂s/∂h_out‖ (log)")
    ax.legend(fontsize=7)
    ax = axes[0, 1]
    for i, beta in enumerate(str(float(b)) for b in data["betas"]):
        for key, style in (("beta_bn", "-"), ("beta_plain", "--")):
            r = np.asarray(data[key][beta])
            ax.semilogy(_blocks_back(r), r, style, color=f"C{i}",
                        label=f"β = {beta}, {'BN' if key == 'beta_bn' else 'no BN'}")
    ax.set_title("Residual scaling β (full pre-activation)")
    ax.set_xlabel("blocks back-propagated through, L")
    ax.set_ylabel("gradient ratio (log)")
    ax.legend(fontsize=7)
    names.append(save(fig, out_dir, "shortcut_orders_beta.png"))
    return names
