"""PyHessian's question on the digits (Yao et al. 2020): how sharp is the loss surface of a
CIFAR-style ResNet with and without batch norm, and with and without skips (Li et al. 2018), at
initialisation and after training? Sharpness is the loss Hessian's top eigenvalue; its trace and
spectral density (stochastic Lanczos quadrature) come from the same Lanczos run."""

from __future__ import annotations

import math

import numpy as np

from miniresnet import inspect
from miniresnet.experiments import degradation, training
from miniresnet.experiments.answers import caveat, finite, num, sentence
from miniresnet.experiments.claims import claim
from miniresnet.experiments.no_batch_norm import CLIP
from miniresnet.experiments.plots import figure, save
from miniresnet.train import DivergenceError

NAME = "loss_landscape"
TITLE = ("Does batch norm make the loss surface smoother (a smaller top Hessian eigenvalue), "
         "only in deep ResNets, and do skips?")
ESTIMATE = {"quick": 6.0, "default": 150.0, "full": 900.0}
SOURCE = "Yao et al. 2020 (PyHessian)"
SKIPS_SOURCE = "Li et al. 2018"
SETUP = (
    "CIFAR-style nets (6n+2 layers) in four variants per depth: ResNet and plain, each with "
    "batch norm (degradation's nets and training budget: SGD lr 0.1 cosine, momentum 0.9, "
    "weight decay 5e-4, batch 128, float32; at n = 3 they are degradation's own nets) and "
    "without it (He init, a bias in every layer, the same budget plus gradient clipping by "
    f"global norm at {CLIP:g}, which no_batch_norm found a He-init no-BN ResNet needs at lr "
    "0.1; a run that still diverges is recorded as such). The loss is the mean cross-entropy "
    "of a float64 copy of each net on one fixed minibatch of 32 training examples, its "
    "Hessian over all parameters; one Lanczos run (full reorthogonalisation) gives the top "
    "eigenvalues, further runs in lockstep the stochastic-Lanczos trace and density. Batch "
    "norm: trained nets in evaluation mode (running statistics, as PyHessian); at "
    "initialisation with the minibatch's statistics held constant (evaluation mode would make "
    "batch norm the identity there). Claims compare trained top eigenvalues; thresholds are "
    "ours; all are pinned to the default scale (n = 3 and 9, ResNet-20 and ResNet-56)."
)

#: name: (label, residual, batch norm)
VARIANTS = {
    "bn": ("ResNet + BN", True, True),
    "nobn": ("ResNet, no BN", True, False),
    "plain_bn": ("plain + BN", False, True),
    "plain_nobn": ("plain, no BN", False, False),
}
STATES = ("init", "trained")
#: the batch-norm mode of each state (see miniresnet.inspect.curvature)
BN_MODE = {"init": "frozen", "trained": "eval"}
#: depths swept, the (shallow, deep) pair the claims compare, Lanczos steps, SLQ runs
_SCALES = {
    "quick": {"depths": (1, 2), "claim_depths": (1, 2), "steps": 10, "runs": 1},
    "default": {"depths": (3, 9), "claim_depths": (3, 9), "steps": 40, "runs": 2},
    "full": {"depths": (3, 9, 18), "claim_depths": (3, 9), "steps": 60, "runs": 3},
}
BATCH = 32        # training examples in the fixed minibatch
TOP_K = 3         # top eigenvalues kept per net
SHALLOW_FACTOR = 0.5  # "BN not clearly smoother": its top eigenvalue above half the no-BN one


def net_config(scale: str, n: int, variant: str, data: str = "digits") -> dict:
    """The training config of ``variant`` (a key of :data:`VARIANTS`) at depth ``n``:
    degradation's config at ``scale`` (the same net where degradation trains it) or, without
    batch norm, the same with ``norm=False`` and clipping at :data:`CLIP`."""
    _, residual, bn = VARIANTS[variant]
    base = degradation.net_config(scale, n, residual, data)
    if bn:
        return base
    return {**base, "model": {**base["model"], "norm": False}, "clip_norm": CLIP}


def trials(scale: str, seed: int, data: str = "digits") -> list[dict]:
    """One trial per (variant, depth, state); every net trained with the seed of
    degradation's first replicate, every curvature on the same minibatch and start vectors
    (both from ``seed``)."""
    if scale not in _SCALES:
        raise ValueError(f"loss_landscape: unknown scale {scale!r}; valid: {', '.join(_SCALES)}")
    s = _SCALES[scale]
    digest = {} if data == "digits" else {"data_sha256": training.file_digest(data)}
    return [{"variant": v, "n": n, "state": state, "train_seed": training.net_seed(seed, 0),
             "train": net_config(scale, n, v, data), "batch": BATCH, "batch_seed": int(seed),
             "steps": s["steps"], "runs": s["runs"], **digest}
            for n in s["depths"] for v in VARIANTS for state in STATES]


def minibatch(data: str, size: int, seed: int):
    """The fixed minibatch: ``size`` training examples drawn without replacement with
    ``seed`` (float64), as ``(x, y)`` on the data's backend."""
    ds = training.load_data(data, "float64")
    idx = np.sort(np.random.default_rng([int(seed), 13]).choice(ds.n_train, size, replace=False))
    xp = ds.backend.xp
    at = ds.backend.asarray(idx, "int64")
    return xp.take(ds.x_train, at, axis=0), xp.take(ds.y_train, at, axis=0)


def curvature(model, x, y, *, steps: int, runs: int, seed: int, bn: str) -> dict:
    """The loss Hessian's top eigenvalues (run 0), SLQ trace and density (all runs) of
    ``model`` on ``(x, y)`` from one :func:`~miniresnet.inspect.hessian_density` call."""
    run = inspect.hessian_density(model, x, y, steps=steps, runs=runs, seed=seed, bn=bn)
    top = run.top(min(TOP_K, len(run.alphas[0])))
    trace = run.trace()
    return {"top": top.values.tolist(), "residuals": top.residuals.tolist(),
            "trace": trace.value, "trace_stderr": trace.stderr if runs > 1 else None,
            "nodes": [t.tolist() for t in run.nodes],
            "weights": [w.tolist() for w in run.weights], "params": run.dim}


def run_trial(config: dict, seed: int) -> dict:
    """The curvature of the net at initialisation or trained (loaded from the store when
    another experiment trained it). ``seed`` is unused: the net's seed is
    ``config["train_seed"]``, the minibatch's and probes' ``config["batch_seed"]``."""
    cfg, state = config["train"], config["state"]
    out = {"bn_mode": BN_MODE[state], "diverged": None, "final_test_acc": None,
           "final_train_loss": None}
    if state == "init":
        model = training.snapshot(cfg, config["train_seed"], 0)
    else:
        try:
            net = training.trained(cfg, config["train_seed"])
        except DivergenceError as e:
            return {**out, "diverged": {"epoch": e.epoch, "step": e.step}}
        model = net.model
        out.update(final_test_acc=net.history[-1]["test_acc"],
                   final_train_loss=net.history[-1]["train_loss"])
    x, y = minibatch(cfg["data"], config["batch"], config["batch_seed"])
    model.to("float64")
    return {**out, **curvature(model, x, y, steps=config["steps"], runs=config["runs"],
                               seed=config["batch_seed"], bn=BN_MODE[state])}


# ---------------------------------------------------------------------------- summary

def _top(tops: dict, variant: str, n: int) -> float:
    v = tops.get(variant, {}).get(str(n), {}).get("trained")
    return float(v) if finite(v) else math.nan


def summarise(results: list, scale: str) -> dict:
    """Claims on the trained nets' top eigenvalues; data: per variant, depth and state the top
    eigenvalue, the trace and the SLQ nodes and weights."""
    depths = sorted({c["n"] for c, _ in results})
    per: dict = {}
    for c, d in results:
        per.setdefault(c["variant"], {}).setdefault(str(c["n"]), {})[c["state"]] = d
    tops, traces, spectra, diverged, acc = {}, {}, {}, {}, {}
    for v, by_n in per.items():
        for n, by_state in by_n.items():
            for state, d in by_state.items():
                top = d.get("top")
                tops.setdefault(v, {}).setdefault(n, {})[state] = top[0] if top else None
                traces.setdefault(v, {}).setdefault(n, {})[state] = (
                    {"value": d["trace"], "stderr": d["trace_stderr"]} if top else None)
                spectra.setdefault(v, {}).setdefault(n, {})[state] = (
                    {"nodes": d["nodes"], "weights": d["weights"]} if top else None)
                if state == "trained":
                    diverged.setdefault(v, {})[n] = d["diverged"]
                    acc.setdefault(v, {})[n] = d["final_test_acc"]
    claim_depths = _SCALES.get(scale, _SCALES["default"])["claim_depths"]
    lo, hi = (claim_depths if all(n in depths for n in claim_depths)
              else (depths[0], depths[-1]))
    bn_lo, nobn_lo = _top(tops, "bn", lo), _top(tops, "nobn", lo)
    bn_hi, nobn_hi = _top(tops, "bn", hi), _top(tops, "nobn", hi)
    plain_hi = _top(tops, "plain_bn", hi)
    L_lo, L_hi = 6 * lo + 2, 6 * hi + 2
    trained = "trained, evaluation mode, fixed minibatch of 32"
    claims = [
        claim("hessian_top_bn_n3", source=SOURCE, paper_status="derived",
              claim=f"batch norm does not clearly smooth the shallow net: top Hessian "
                    f"eigenvalue of the ResNet-{L_lo} with batch norm ({trained}), above "
                    f"{SHALLOW_FACTOR:g} × that of the ResNet-{L_lo} without it (the rule's "
                    f"value, computed from that measurement; Yao et al.: batch norm does not "
                    f"necessarily make the loss surface smoother in shallow nets; factor ours)",
              measured=bn_lo, rule={"op": "gt", "value": SHALLOW_FACTOR * nobn_lo},
              holds_at="default"),
        claim("hessian_top_nobn_n3", source=SOURCE, paper_status="derived",
              claim=f"without batch norm the loss surface sharpens with depth: top Hessian "
                    f"eigenvalue of the ResNet-{L_lo} without batch norm ({trained}), below "
                    f"that of the ResNet-{L_hi} without it (the rule's value; derived from Yao et "
                    f"al.: the smoothing by batch norm becomes evident only in deep nets, so "
                    f"without it the surface sharpens with depth)",
              measured=nobn_lo, rule={"op": "lt", "value": nobn_hi}, holds_at="default"),
        claim("hessian_top_bn_n9", source=SOURCE, paper_status="derived",
              claim=f"batch norm smooths the deep net: top Hessian eigenvalue of the "
                    f"ResNet-{L_hi} with batch norm ({trained}), below that of the "
                    f"ResNet-{L_hi} without it (the rule's value; Yao et al.: the smoothing "
                    f"by batch norm is evident in deeper nets)",
              measured=bn_hi, rule={"op": "lt", "value": nobn_hi}, holds_at="default"),
        claim("hessian_top_nobn_n9", source=SOURCE, paper_status="derived",
              claim=f"the smoothing by batch norm grows with depth: top Hessian eigenvalue of "
                    f"the ResNet-{L_hi} without batch norm ({trained}), above that with batch "
                    f"norm times the shallow nets' no-BN / BN ratio (the rule's value, "
                    f"bn_{L_hi} × nobn_{L_lo} / bn_{L_lo}; Yao et al.: the smoothing becomes "
                    f"evident only in deeper nets)",
              measured=nobn_hi, rule={"op": "gt", "value": _ratio(bn_hi * nobn_lo, bn_lo)},
              holds_at="default"),
        claim("hessian_top_plain_n9", source=SKIPS_SOURCE, paper_status="derived",
              claim=f"skips keep the deep net smooth: top Hessian eigenvalue of the plain "
                    f"{L_hi}-layer net with batch norm ({trained}), above that of the "
                    f"ResNet-{L_hi} with batch norm (the rule's value; Li et al.: without skip "
                    f"connections deep nets' loss surfaces turn sharp and chaotic)",
              measured=plain_hi, rule={"op": "gt", "value": bn_hi}, holds_at="default"),
    ]
    first = results[0][0]
    data = {"depths": depths, "layers": [6 * n + 2 for n in depths], "claim_depths": [lo, hi],
            "variants": {v: VARIANTS[v][0] for v in VARIANTS if v in per},
            "epochs": first["train"]["epochs"], "width": first["train"]["model"]["width"],
            "batch": first["batch"], "steps": first["steps"], "runs": first["runs"],
            "clip": CLIP, "bn_mode": dict(BN_MODE), "top": tops, "trace": traces,
            "spectra": spectra, "diverged": diverged, "final_test_acc": acc,
            "bn_over_nobn": {str(n): _ratio(_top(tops, "bn", n), _top(tops, "nobn", n))
                             for n in depths}}
    return {"claims": claims, "data": data}


def _ratio(a, b) -> float:
    return a / b if finite(a, b) and b != 0 else math.nan


# ---------------------------------------------------------------------------- answer

def answer(data: dict, claims: list[dict]) -> str:
    """Whether we see PyHessian's finding (batch norm not clearly smoother in the shallow
    ResNet, smoother in the deep one), from the trained top eigenvalues, with the plain
    deep net's beside them."""
    tops = data.get("top", {})
    lo, hi = (data.get("claim_depths") or [None, None])[:2]

    def top(v, n):
        x = tops.get(v, {}).get(str(n), {}).get("trained")
        return x if finite(x) else None

    def shown(v, n):
        x = top(v, n)
        if x is not None:
            return num(x)
        return "diverged" if data.get("diverged", {}).get(v, {}).get(str(n)) else "n/a"

    def ratio(n):
        r = _ratio(top("bn", n), top("nobn", n))
        return f" (×{num(r, 2)})" if finite(r) else ""

    r_lo, r_hi = _ratio(top("bn", lo), top("nobn", lo)), _ratio(top("bn", hi), top("nobn", hi))
    if not finite(r_lo, r_hi):
        lead = "Undecided (a net is missing or diverged)"
    elif r_hi < 1 and r_lo > SHALLOW_FACTOR:
        lead = "Yes"
    elif r_hi < 1:
        lead = "No, batch norm already smooths the shallow net"
    else:
        lead = "No, batch norm does not smooth the deep net"
    plain, res = top("plain_bn", hi), top("bn", hi)
    skips = ("" if plain is None or res is None else
             ", above the ResNet's" if plain > res else ", not above the ResNet's")
    L = {n: "?" if n is None else 6 * n + 2 for n in (lo, hi)}
    return sentence(
        f"{lead}: trained, in eval mode, the ResNet's top Hessian eigenvalue with/without batch "
        f"norm is {shown('bn', lo)}/{shown('nobn', lo)} at {L[lo]} layers{ratio(lo)}, "
        f"{shown('bn', hi)}/{shown('nobn', hi)} at {L[hi]}{ratio(hi)}; plain-{L[hi]} with "
        f"batch norm: {shown('plain_bn', hi)}{skips}" + caveat(claims))


# ---------------------------------------------------------------------------- figures

_COLOURS = {"bn": "C0", "nobn": "C3", "plain_bn": "C2", "plain_nobn": "C1"}


def smoothed_density(nodes: list, weights: list, grid: np.ndarray, sigma: float) -> np.ndarray:
    """The SLQ density on ``grid``: the runs' weighted Gaussians of width ``sigma`` at the
    nodes, averaged over the runs (integrates to 1)."""
    t = np.concatenate([np.asarray(r, dtype=float) for r in nodes])
    w = np.concatenate([np.asarray(r, dtype=float) for r in weights]) / len(nodes)
    z = (np.asarray(grid)[:, None] - t[None, :]) / sigma
    return np.exp(-0.5 * z * z) @ w / (sigma * math.sqrt(2 * math.pi))


def plot(data: dict, out_dir) -> list[str]:
    """The top eigenvalue per variant and depth at initialisation and trained (log y), and the
    SLQ densities of the deepest nets (log density)."""
    depths, tops, variants = data["depths"], data["top"], data["variants"]
    fig, axes = figure(len(depths), 1, width=4.4, height=3.6)
    names = list(variants)
    values = [x for v in tops.values() for s in v.values() for x in s.values() if finite(x)]
    positive = [x for x in values if x > 0]
    for j, n in enumerate(depths):
        ax = axes[0, j]
        for i, v in enumerate(names):
            for k, state in enumerate(STATES):
                x = tops.get(v, {}).get(str(n), {}).get(state)
                pos = i + (k - 0.5) * 0.38
                if finite(x) and x > 0:
                    ax.bar(pos, x, width=0.36, color=_COLOURS[v], alpha=0.35 if k == 0 else 1,
                           edgecolor="k", linewidth=0.5, hatch="//" if k == 0 else None)
                elif state == "trained":
                    why = "diverged" if data["diverged"].get(v, {}).get(str(n)) else "n/a"
                    ax.text(pos, min(positive or [1.0]), why, rotation=90, ha="center",
                            va="bottom", fontsize=7)
        ax.set_yscale("log")
        if positive:
            ax.set_ylim(min(positive) / 3, max(positive) * 3)
        acc = data.get("final_test_acc", {})
        ax.set_xticks(range(len(names)), [
            variants[v] + ("" if not finite(acc.get(v, {}).get(str(n))) else
                           f"\ntest acc {acc[v][str(n)]:.2f}") for v in names], fontsize=7)
        ax.set_title(f"{6 * n + 2} layers (n = {n})")
        ax.set_ylabel("top Hessian eigenvalue (log)")
        ax.bar(0, 0, color="w", edgecolor="k", hatch="//", alpha=0.35,
               label=f"initialisation (bn {data['bn_mode']['init']})")
        ax.bar(0, 0, color="0.4", edgecolor="k", label=f"trained (bn {data['bn_mode']['trained']})")
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Is batch norm or a skip smoother? Top eigenvalue of the loss Hessian "
                 f"({data['batch']} training examples, {data['steps']} Lanczos steps, "
                 f"{data['epochs']} epochs)", fontsize=10)
    files = [save(fig, out_dir, "loss_landscape.png")]

    deep = depths[-1]
    fig, axes = figure(len(names), 2, width=3.4, height=2.9)
    for j, v in enumerate(names):
        for i, state in enumerate(STATES):
            ax = axes[i, j]
            s = data["spectra"].get(v, {}).get(str(deep), {}).get(state)
            if s is None:
                ax.text(0.5, 0.5, "diverged" if state == "trained" else "n/a",
                        transform=ax.transAxes, ha="center")
            else:
                t = np.concatenate([np.asarray(r, dtype=float) for r in s["nodes"]])
                span = float(t.max() - t.min()) or max(1.0, abs(float(t.max())))
                sigma = 0.01 * span
                grid = np.linspace(t.min() - 0.05 * span, t.max() + 0.05 * span, 800)
                rho = smoothed_density(s["nodes"], s["weights"], grid, sigma)
                ax.semilogy(grid, np.maximum(rho, 1e-300), color=_COLOURS[v], lw=1)
                ax.set_ylim(max(rho.max() * 1e-7, 1e-300), rho.max() * 3)
                ax.axvline(0, color="grey", lw=0.6, ls=":")
            ax.set_title(f"{variants[v]}, {'initialisation' if i == 0 else 'trained'}",
                         fontsize=9)
            ax.set_xlabel("eigenvalue")
            ax.set_ylabel("density (log)")
    fig.suptitle(f"Hessian spectral density (stochastic Lanczos quadrature, {data['runs']} "
                 f"run(s), Gaussian width 1% of the range) of the {6 * deep + 2}-layer nets",
                 fontsize=10)
    files.append(save(fig, out_dir, "loss_landscape_density.png"))
    return files
