"""Experiment 1: do gradients vanish or explode through depth at initialisation?

Three measurements, each with :func:`miniresnet.inspect.profile` (one forward and one backward
pass, ``s = sum(out * c)`` for a fixed random cotangent ``c``, batch norm in training mode):

``depth``
    ‖∂s/∂h_l‖ for every block of fully connected networks (``nn.mlp``, full pre-activation,
    one layer per block: ``h_l = [h_{l-1} +] W act(BN(h_{l-1}))``), plain vs residual, with vs
    without batch norm, for ReLU, tanh and sigmoid, He initialisation throughout.
``yang``
    Yang et al. 2019's setting: a plain BN MLP of 60 layers, B Gaussian inputs of dimension
    equal to the width; λ is the geometric-mean ratio of successive squared gradient norms over
    layers 5–45, compared with the infinite-width formula :func:`yang_lambda`.
``conv``
    He et al. 2015's plain CIFAR nets (``nn.resnet_cifar(residual=False)``, post-activation,
    BN) beside their residual counterparts, for the "healthy norms with BN" remark.
"""

from __future__ import annotations

import math

import numpy as np

from miniresnet import inspect, nn
from miniresnet.backend_choice import current_backend
from miniresnet.experiments import claims as cl
from miniresnet.experiments.answers import caveat, finite, num, sentence

NAME = "vanishing_exploding"
TITLE = ("Do gradients vanish or explode through depth at initialisation, with and without "
         "skips and batch norm?")
ESTIMATE = {"quick": 3.0, "default": 30.0, "full": 900.0}
SETUP = (
    "Gradient norms ‖∂s/∂h_l‖ at initialisation (He weights, training-mode batch norm, a random "
    "linear loss s = Σ out·c). Yang et al.'s rates are pinned to their setting: a plain MLP "
    "h_l = W φ(BN(h_{l-1})) of 60 layers (nn.mlp, order full_preact, one layer per block), B "
    "Gaussian inputs whose dimension equals the width, λ = the geometric-mean growth of the "
    "squared gradient norm per layer over layers 5–45, measured at the widest width run (their "
    "formula is for infinite width; the second figure also shows λ at a narrower width, to show "
    "how finite width moves it). He et al. 2015's 'healthy norms with BN' is pinned to their "
    "plain CIFAR net (3×3 conv–BN–ReLU, 16/32/64 channels, 2n conv layers per stage) on Gaussian "
    "images; 'healthy' is our rule: ‖∂s/∂h_0‖/‖∂s/∂h_L‖ within a factor of 10."
)

ACTIVATIONS = ("relu", "tanh", "sigmoid")
YANG_DEPTH, YANG_LAYERS = 60, (5, 45)
#: Yang et al. 2019's tabulated ReLU rates (the paper's own numbers, from its formula)
YANG_TABLE_RELU = {4: 3.08, 8: 1.788, 16: 1.590, 32: 1.522, 64: 1.493, 128: 1.480}
HEALTHY = (0.1, 10.0)  # our rule for "healthy": the gradient changes by less than 10x end to end

_SCALES = {
    "quick": dict(depth=24, width=64, batch=16, seeds=2, yang_widths=(128,),
                  yang_batches=(8, 16, 32), yang_seeds=2, conv_n=3, conv_size=8, conv_batch=8,
                  conv_seeds=1),
    "default": dict(depth=100, width=128, batch=32, seeds=3, yang_widths=(128, 512),
                    yang_batches=(8, 16, 32), yang_seeds=6, conv_n=9, conv_size=16,
                    conv_batch=8, conv_seeds=3),
    "full": dict(depth=200, width=256, batch=64, seeds=5, yang_widths=(64, 128, 256, 512, 1024),
                 yang_batches=(4, 8, 16, 32, 64, 128), yang_seeds=10, conv_n=18, conv_size=32,
                 conv_batch=16, conv_seeds=5),
}


def yang_lambda(batch: int, activation: str = "relu") -> float:
    """Yang et al. 2019's per-layer growth of the squared gradient norm in a plain BN MLP at
    infinite width: for ReLU ``[J'(c) + B−1] / [(B−3)(1−J(c))] − 1/(B−3)`` with
    ``c = −1/(B−1)``, ``J(c) = (√(1−c²) + (π−arccos c)c)/π``, ``J'(c) = (π−arccos c)/π``; for
    the identity activation ``(B−2)/(B−3)``. Needs B ≥ 4."""
    if batch < 4:
        raise ValueError(f"yang_lambda: the formula needs a batch B >= 4, got {batch}")
    b = float(batch)
    if activation == "identity":
        return (b - 2) / (b - 3)
    if activation != "relu":
        raise ValueError(f"yang_lambda: a formula for 'relu' and 'identity' only, got "
                         f"{activation!r}")
    c = -1.0 / (b - 1)
    j = (math.sqrt(1 - c * c) + (math.pi - math.acos(c)) * c) / math.pi
    dj = (math.pi - math.acos(c)) / math.pi
    return (dj + b - 1) / ((b - 3) * (1 - j)) - 1 / (b - 3)


def _settings(scale: str) -> dict:
    if scale not in _SCALES:
        raise ValueError(f"unknown scale {scale!r}; valid: {', '.join(_SCALES)}")
    return _SCALES[scale]


def trials(scale: str, seed: int) -> list[dict]:
    """The depth sweep, Yang's rate at each (activation, B, width) and the conv nets; ``rep``
    numbers the independent networks of one setting."""
    s = _settings(scale)
    out = [{"kind": "depth", "residual": residual, "norm": norm, "activation": act,
            "depth": s["depth"], "width": s["width"], "batch": s["batch"], "rep": rep}
           for norm in (True, False) for residual in (False, True) for act in ACTIVATIONS
           for rep in range(s["seeds"])]
    out += [{"kind": "yang", "activation": act, "batch": b, "width": w, "depth": YANG_DEPTH,
             "rep": rep}
            for act in ("relu", "identity") for b in s["yang_batches"] for w in s["yang_widths"]
            for rep in range(s["yang_seeds"])]
    out += [{"kind": "conv", "residual": residual, "n": s["conv_n"], "size": s["conv_size"],
             "batch": s["conv_batch"], "rep": rep}
            for residual in (False, True) for rep in range(s["conv_seeds"])]
    return out


def _gaussian(seed: int, shape: tuple) -> object:
    """Standard normal inputs (drawn on the host from ``seed``, then put on the backend)."""
    x = np.random.default_rng([seed, 1]).standard_normal(shape)
    return current_backend().asarray(x, "float64")


def run_trial(config: dict, seed: int) -> dict:
    """One network, one profile: its per-block gradient norms (and for ``yang`` its λ)."""
    kind = config["kind"]
    if kind == "conv":
        model = nn.resnet_cifar(config["n"], residual=config["residual"], shortcut="zero_pad",
                                seed=seed)
        size = config["size"]
        p = inspect.profile(model, _gaussian(seed, (config["batch"], 3, size, size)))
        return {"grad_norm": p.grad_norm.tolist()}
    if kind not in ("depth", "yang"):
        raise ValueError(f"{NAME}: unknown trial kind {kind!r}")
    width = config["width"]
    model = nn.mlp(config["depth"], width, in_features=width, order="full_preact", layers=1,
                   residual=config.get("residual", False), norm=config.get("norm", True),
                   activation=config["activation"], seed=seed)
    p = inspect.profile(model, _gaussian(seed, (config["batch"], width)))
    if kind == "depth":
        return {"grad_norm": p.grad_norm.tolist()}
    lo, hi = YANG_LAYERS
    sq = p.grad_norm ** 2
    return {"lambda": float((sq[lo] / sq[hi]) ** (1.0 / (hi - lo))),
            "grad_norm": p.grad_norm.tolist()}


def _log_stats(curves) -> tuple[list, list, list]:
    """Geometric mean, min and max over curves (pointwise; a zero gives NaN, not -inf)."""
    a = np.asarray(curves, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.where(a > 0, np.log(np.where(a > 0, a, 1.0)), np.nan)
    return np.exp(np.mean(logs, axis=0)).tolist(), a.min(axis=0).tolist(), a.max(axis=0).tolist()


def _group(results, kind, keys):
    groups: dict = {}
    for config, data in results:
        if config["kind"] == kind:
            groups.setdefault(tuple(config[k] for k in keys), []).append(data)
    return groups


def summarise(results: list, scale: str) -> dict:
    """Curves per setting, λ per (activation, B, width) beside the formula, and the claims."""
    s = _settings(scale)
    depth_curves = []
    for (residual, norm, act), runs in _group(results, "depth",
                                              ("residual", "norm", "activation")).items():
        mean, lo, hi = _log_stats([r["grad_norm"] for r in runs])
        depth_curves.append({"residual": residual, "norm": norm, "activation": act,
                             "grad_norm": mean, "min": lo, "max": hi, "n": len(runs)})
    yang = []
    for (act, b, w), runs in sorted(_group(results, "yang",
                                           ("activation", "batch", "width")).items()):
        mean, spread, n = cl.mean_and_spread(r["lambda"] for r in runs)
        yang.append({"activation": act, "batch": b, "width": w, "lambda": mean,
                     "spread": spread, "n": n, "formula": yang_lambda(b, act)})
    conv = {}
    for (residual,), runs in _group(results, "conv", ("residual",)).items():
        mean, lo, hi = _log_stats([r["grad_norm"] for r in runs])
        ratios = [r["grad_norm"][0] / r["grad_norm"][-1] for r in runs]
        conv["residual" if residual else "plain"] = {"grad_norm": mean, "min": lo, "max": hi,
                                                     "ratios": ratios}
    data = {"depth": {"curves": depth_curves, "depth": s["depth"], "width": s["width"],
                      "batch": s["batch"], "yang_lambda": yang_lambda(s["batch"])},
            "yang": {"measured": yang, "depth": YANG_DEPTH, "layers": list(YANG_LAYERS),
                     "table_relu": {str(b): v for b, v in YANG_TABLE_RELU.items()}},
            "conv": {**conv, "n": s["conv_n"], "size": s["conv_size"],
                     "batch": s["conv_batch"]}}
    return {"claims": _claims(yang, conv, s), "data": data}


def _claims(yang: list, conv: dict, s: dict) -> list:
    out = []
    widest = max((r["width"] for r in yang), default=None)
    for act, b, tol, cid in (("relu", 8, 0.03, "yang_lambda_relu_B8"),
                             ("relu", 16, 0.03, "yang_lambda_relu_B16"),
                             ("relu", 32, 0.03, "yang_lambda_relu_B32"),
                             ("identity", 8, 0.02, "yang_lambda_linear_B8")):
        row = next((r for r in yang if (r["activation"], r["batch"], r["width"])
                    == (act, b, widest)), None)
        if row is None:
            continue
        name = "ReLU" if act == "relu" else "linear (identity activation)"
        out.append(cl.claim(
            cid, source="Yang et al. 2019",
            claim=(f"In a deep plain {name} MLP with batch norm at initialisation, the squared "
                   f"gradient norm grows by λ(B={b}) per layer (measured at width {widest}, "
                   f"{YANG_DEPTH} layers, layers {YANG_LAYERS[0]}–{YANG_LAYERS[1]})"),
            paper=yang_lambda(b, act), paper_status="paper", measured=row["lambda"],
            n=row["n"], spread=row["spread"], rule={"op": "rel_err_le", "value": tol},
            holds_at="default"))
    plain = conv.get("plain")
    if plain is not None:
        mean, spread, n = cl.mean_and_spread(plain["ratios"])
        out.append(cl.claim(
            "he_healthy_norms_bn", source="He et al. 2015",
            claim=(f"A plain BN conv net (plain-{6 * s['conv_n'] + 2}) has 'healthy' backward "
                   f"gradient norms: ‖∂s/∂h_0‖/‖∂s/∂h_L‖ (mean over nets) within a "
                   f"factor of 10 (our rule; the paper gives no number)"),
            paper=None, paper_status="paper", measured=mean, n=n,
            spread=spread, rule={"op": "between", "value": list(HEALTHY)},
            holds_at="default"))
    return out


def _fate(ratio: float) -> str:
    """What ``‖∂s/∂h_0‖ / ‖∂s/∂h_L‖`` says, by the ``HEALTHY`` factor of 10 either way."""
    return ("explode" if ratio > HEALTHY[1] else "vanish" if ratio < HEALTHY[0]
            else "stay within 10×")


def answer(data: dict, claims: list[dict]) -> str:
    """Input-over-output gradient ratios of the BN ReLU MLPs, plain and residual (their fate
    by the ``HEALTHY`` factor), and of the plain BN conv nets against He et al.'s "healthy"."""
    d = data.get("depth", {})
    ratio = {}
    for c in d.get("curves", []):
        g = c.get("grad_norm") or [None]
        if c.get("norm") and c.get("activation") == "relu" and finite(g[0], g[-1]) and g[-1]:
            ratio[bool(c.get("residual"))] = g[0] / g[-1]
    parts = []
    if False in ratio:
        plain = ratio[False]
        lead = f"with batch norm they {_fate(plain)} without skips"
        numbers = (f"the gradient {'grows' if plain >= 1 else 'shrinks'} ×{num(plain)} toward "
                   f"the input of a plain ReLU MLP")
        if True in ratio:
            res = ratio[True]
            # closer to 1 on a log scale: less explosion (or vanishing) with skips
            fewer = res > 0 and plain > 0 and abs(math.log(res)) < abs(math.log(plain))
            lead += f", {'less' if fewer else 'not less'} with them"
            numbers += f", ×{num(res)} with skips"
        parts.append(f"{lead}: over {d.get('depth', '?')} blocks at He init (width "
                     f"{d.get('width', '?')}) {numbers}")
    conv = data.get("conv", {})
    healthy = cl.mean_and_spread(conv.get("plain", {}).get("ratios") or [])[0]
    if finite(healthy):
        within = HEALTHY[0] <= healthy <= HEALTHY[1]
        net = f"plain-{6 * conv['n'] + 2}" if finite(conv.get("n")) else "plain"
        subject = "" if parts else f"the gradient {'grows' if healthy >= 1 else 'shrinks'} "
        parts.append(f"{subject}×{num(healthy)} through {net} BN conv nets, "
                     f"{'within' if within else 'beyond'} He et al.'s 'healthy' 10×")
    return sentence((", ".join(parts) or "Not measured: the gradient profiles are missing")
                    + caveat(claims, skip={"he_healthy_norms_bn"}))


# -- figures ----------------------------------------------------------------------------------

_COLOURS = {"relu": "tab:blue", "tanh": "tab:orange", "sigmoid": "tab:green",
            "identity": "tab:purple"}


def plot(data: dict, out_dir) -> list[str]:
    """Two figures: gradient norm vs block (MLPs and conv nets) and λ against B."""
    from miniresnet.experiments import plots

    return [_plot_depth(data, out_dir, plots), _plot_yang(data["yang"], out_dir, plots)]


def _plot_depth(data, out_dir, plots) -> str:
    d = data["depth"]
    fig, axes = plots.figure(ncols=3, width=4.6, height=3.8)
    for ax, norm in zip(axes[0], (False, True)):
        for c in sorted(d["curves"], key=lambda c: (c["residual"], c["activation"])):
            if c["norm"] != norm:
                continue
            x = np.arange(len(c["grad_norm"]))
            style = "-" if c["residual"] else "--"
            label = f"{'residual' if c['residual'] else 'plain'}, {c['activation']}"
            ax.plot(x, c["grad_norm"], style, color=_COLOURS[c["activation"]], label=label)
            if c["n"] > 1:
                ax.fill_between(x, c["min"], c["max"], color=_COLOURS[c["activation"]],
                                alpha=0.12, lw=0)
            if norm and not c["residual"] and c["activation"] == "relu":
                depth = len(c["grad_norm"]) - 1
                ref = c["grad_norm"][-1] * d["yang_lambda"] ** ((depth - x) / 2)
                ax.plot(x, ref, ":", color="black", lw=1.2,
                        label=f"Yang: λ(B={d['batch']})^((L−l)/2)")
        ax.set_yscale("log")
        ax.set_xlabel("block l (0 = after the stem)")
        ax.set_ylabel("‖∂s/∂h_l‖ (geometric mean over nets)")
        ax.set_title(f"MLP, width {d['width']}, {'with' if norm else 'without'} batch norm")
        ax.legend(ncol=2, fontsize=6.5)
    ax = axes[0][2]
    conv = data["conv"]
    for key, style in (("plain", "--"), ("residual", "-")):
        if key in conv:
            x = np.arange(len(conv[key]["grad_norm"]))
            ax.plot(x, conv[key]["grad_norm"], style, color="tab:red" if key == "plain"
                    else "tab:blue", label=f"{key}-{6 * conv['n'] + 2} (BN, post-act.)")
            ax.fill_between(x, conv[key]["min"], conv[key]["max"], alpha=0.12, lw=0,
                            color="tab:red" if key == "plain" else "tab:blue")
    ax.set_yscale("log")
    ax.set_xlabel("block l (two 3×3 conv layers each)")
    ax.set_ylabel("‖∂s/∂h_l‖")
    ax.set_title(f"He et al.'s CIFAR nets, {conv['size']}×{conv['size']} Gaussian inputs")
    ax.legend(fontsize=7)
    fig.suptitle("Does the gradient vanish or explode through depth at initialisation?",
                 fontsize=11)
    return plots.save(fig, out_dir, f"{NAME}_depth.png")


def _plot_yang(y, out_dir, plots) -> str:
    fig, axes = plots.figure(ncols=1, width=5.6, height=4.2)
    ax = axes[0][0]
    rows = y["measured"]
    batches = sorted({r["batch"] for r in rows} | {4, 128})
    grid = np.geomspace(4, max(batches), 200)
    grid = np.unique(np.round(grid).astype(int))
    widths = sorted({r["width"] for r in rows})
    markers = "osD^v<>"
    for act in ("relu", "identity"):
        ax.plot(grid, [yang_lambda(int(b), act) for b in grid], "-", color=_COLOURS[act],
                lw=1, label=f"Yang et al. formula, {act}")
        for wi, w in enumerate(widths):
            pts = [r for r in rows if r["activation"] == act and r["width"] == w]
            if not pts:
                continue
            shift = 1 + 0.04 * (wi - (len(widths) - 1) / 2)  # side by side, not on top
            ax.errorbar([r["batch"] * shift for r in pts], [r["lambda"] for r in pts],
                        yerr=[r["spread"] for r in pts], fmt=markers[wi % len(markers)],
                        color=_COLOURS[act], mfc="none" if wi < len(widths) - 1 else None,
                        ms=5, capsize=2, label=f"measured, {act}, width {w}")
    table = {int(b): v for b, v in y["table_relu"].items()}
    ax.plot(list(table), list(table.values()), "x", color="black", ms=6,
            label="Yang et al.'s table (ReLU)")
    ax.axhline(math.pi / (math.pi - 1), color="gray", lw=0.8, ls=":",
               label="π/(π−1), B → ∞ (ReLU)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size B")
    ax.set_ylabel("λ: growth of ‖∂s/∂h‖² per layer")
    ax.set_title(f"Plain BN MLP ({y['depth']} layers): how fast\ndoes the gradient explode?")
    ax.legend(fontsize=6.5)
    return plots.save(fig, out_dir, f"{NAME}_yang_lambda.png")
