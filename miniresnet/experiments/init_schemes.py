"""Experiment 6: without batch norm, how do He, Fixup, SkipInit and zero-init-residual keep the
forward signal and the gradient bounded through depth?

Residual MLPs (``nn.mlp``, two linear layers per block, identity shortcuts, He weights unless
the scheme says otherwise), one :func:`miniresnet.inspect.profile` each: the variance of the
residual stream ``Var(h_l)`` (``forward_std²``, over every entry of the batch) and
‖∂s/∂h_l‖ through depth. Pre-activation blocks (``h + W₂ act(N₂ W₁ act(N₁ h))``, De & Smith
2020's setting) and post-activation blocks (``act(h + N₂ W₂ act(N₁ W₁ h))``, He et al. 2015)
side by side.
"""

from __future__ import annotations

import numpy as np

from miniresnet import inspect, nn
from miniresnet.backend_choice import current_backend
from miniresnet.experiments import claims as cl
from miniresnet.experiments.answers import caveat, finite, mean, num, sentence, signed

NAME = "init_schemes"
TITLE = ("Without batch norm, how do He, Fixup, SkipInit and zero-init-residual keep the signal "
         "and the gradient bounded through depth?")
ESTIMATE = {"quick": 1.5, "default": 6.0, "full": 120.0}
SETUP = (
    "Residual MLPs with identity shortcuts and two He-initialised linear layers per block, at "
    "initialisation, Gaussian inputs, a random linear loss. De & Smith 2020's recursions are "
    "pinned to pre-activation blocks h + W₂ ReLU(W₁ ReLU(h)) (variance doubling, no "
    "normalisation) and h + W₂ ReLU(BN(W₁ ReLU(BN(h)))) (about one unit per block): the doubling "
    "is the geometric-mean ratio Var(h_L)/Var(h_0) per block, the linear growth the least-squares "
    "slope of Var(h_l) against l. SkipInit (α = 0), Fixup (last branch layer zero) and "
    "zero-init-residual (last BN scale zero, relu_preact order) make every pre-activation block "
    "the identity at initialisation, so the stream's variance is Var(h_0) exactly. The "
    "post-activation block (ReLU after the addition) is shown beside them without a paper "
    "number. Fixup also zeroes the classifier, which makes every ∂s/∂h_l exactly zero; for the "
    "gradient curve its classifier keeps the He weights it was drawn with."
)

#: name -> (nn.mlp keyword arguments, label)
SCHEMES = {
    "he": (dict(norm=False, order="full_preact"), "He, pre-act., no BN"),
    "he_bn": (dict(norm=True, order="full_preact"), "He, pre-act., BN"),
    "skipinit": (dict(norm=False, order="full_preact", skipinit=0.0), "SkipInit α=0, pre-act."),
    "fixup": (dict(norm=False, order="full_preact", init="fixup"), "Fixup, pre-act."),
    "zero_init_bn": (dict(norm=True, order="relu_preact", zero_init_residual=True),
                     "zero-init last BN, pre-act."),
    "he_post": (dict(norm=False, order="post"), "He, post-act., no BN"),
    "he_post_bn": (dict(norm=True, order="post"), "He, post-act., BN"),
    "fixup_post": (dict(norm=False, order="post", init="fixup"), "Fixup, post-act."),
}

_SCALES = {
    "quick": dict(depth=30, width=64, batch=32, seeds=2),
    "default": dict(depth=100, width=128, batch=64, seeds=3),
    "full": dict(depth=300, width=256, batch=128, seeds=5),
}


def _settings(scale: str) -> dict:
    if scale not in _SCALES:
        raise ValueError(f"unknown scale {scale!r}; valid: {', '.join(_SCALES)}")
    return _SCALES[scale]


def trials(scale: str, seed: int) -> list[dict]:
    """One trial per (scheme, rep): ``rep`` numbers the independent networks of a scheme."""
    s = _settings(scale)
    return [{"scheme": name, "depth": s["depth"], "width": s["width"], "batch": s["batch"],
             "rep": rep} for name in SCHEMES for rep in range(s["seeds"])]


def build(config: dict, seed: int):
    """The trial's network; a Fixup network gets back its classifier's He weights (drawn
    identically by ``init="he"``, which Fixup zeroes) so that a gradient reaches the stream."""
    if config["scheme"] not in SCHEMES:
        raise ValueError(f"{NAME}: unknown scheme {config['scheme']!r}; valid: "
                         f"{', '.join(SCHEMES)}")
    kwargs = SCHEMES[config["scheme"]][0]
    width = config["width"]
    common = dict(in_features=width, residual=True, layers=2, seed=seed)
    model = nn.mlp(config["depth"], width, **common, **kwargs)
    if kwargs.get("init") == "fixup":
        he = nn.mlp(config["depth"], width, **common, **{**kwargs, "init": "he"})
        last = len(model.head) - 1
        model.head[last].weight.data = he.head[last].weight.raw
    return model


def run_trial(config: dict, seed: int) -> dict:
    """The stream's variance and the gradient norm at every block of one network."""
    model = build(config, seed)
    x = np.random.default_rng([seed, 1]).standard_normal((config["batch"], config["width"]))
    p = inspect.profile(model, current_backend().asarray(x, "float64"))
    return {"variance": (p.forward_std ** 2).tolist(), "grad_norm": p.grad_norm.tolist()}


def _geomean(curves) -> list:
    a = np.asarray(curves, dtype=float)
    return np.exp(np.mean(np.log(a), axis=0)).tolist()


def _per_net(results, scheme, fn) -> list:
    return [fn(np.asarray(d["variance"]), np.asarray(d["grad_norm"]))
            for c, d in results if c["scheme"] == scheme]


def _doubling(v, g) -> float:
    return float((v[-1] / v[0]) ** (1.0 / (len(v) - 1)))


def _slope(v, g) -> float:
    return float(np.polyfit(np.arange(len(v)), v, 1)[0])


def _identity_error(v, g) -> float:
    return float(np.max(np.abs(v / v[0] - 1.0)))


def _gradient_identity_error(v, g) -> float:
    return float(np.max(np.abs(g / g[-1] - 1.0)))


def summarise(results: list, scale: str) -> dict:
    """Per scheme the geometric-mean curves, growth rates and identity errors; the claims."""
    s = dict(_settings(scale))
    if results:  # the sizes the trials ran at
        s.update({k: results[0][0][k] for k in ("depth", "width", "batch")})
    curves, stats = [], {}
    for name, (_, label) in SCHEMES.items():
        runs = [d for c, d in results if c["scheme"] == name]
        if not runs:
            continue
        curves.append({"scheme": name, "label": label, "n": len(runs),
                       "post": SCHEMES[name][0]["order"] == "post",
                       "variance": _geomean([r["variance"] for r in runs]),
                       "grad_norm": _geomean([r["grad_norm"] for r in runs])})
        stats[name] = {
            "ratio_per_block": _per_net(results, name, _doubling),
            "slope": _per_net(results, name, _slope),
            "variance_identity_error": _per_net(results, name, _identity_error),
            "gradient_identity_error": _per_net(results, name, _gradient_identity_error)}
    data = {"curves": curves, "stats": stats, "depth": s["depth"], "width": s["width"],
            "batch": s["batch"]}
    return {"claims": _claims(stats, s), "data": data}


def _claims(stats: dict, s: dict) -> list:
    out = []
    depth = s["depth"]

    def add(scheme, key, cid, **kw):
        if scheme in stats:
            mean, spread, n = cl.mean_and_spread(stats[scheme][key])
            out.append(cl.claim(cid, measured=mean, spread=spread, n=n, **kw))

    add("he", "ratio_per_block", "de_smith_variance_doubling", source="De & Smith 2020",
        claim=(f"Without normalisation (He init, pre-activation blocks), the residual stream's "
               f"variance doubles per block: (Var(h_L)/Var(h_0))^(1/L), L = {depth}"),
        paper=2.0, paper_status="paper", rule={"op": "rel_err_le", "value": 0.1},
        holds_at="default")
    add("he_bn", "slope", "de_smith_bn_linear_growth", source="De & Smith 2020",
        claim=(f"With batch norm heading each branch (pre-activation), the stream's variance "
               f"grows by about one unit per block: slope of Var(h_l) against l over {depth} "
               f"blocks"),
        paper=1.0, paper_status="paper", rule={"op": "rel_err_le", "value": 0.1},
        holds_at="default")
    add("skipinit", "variance_identity_error", "skipinit_identity_exact",
        source="De & Smith 2020",
        claim=(f"SkipInit (α = 0) makes every block the identity at initialisation: "
               f"max_l |Var(h_l)/Var(h_0) − 1| over {depth} blocks is 0"),
        paper=0.0, paper_status="derived", rule={"op": "abs_err_le", "value": 1e-12})
    add("fixup", "variance_identity_error", "fixup_identity_exact", source="Zhang et al. 2019",
        claim=(f"Fixup (zero last layer per branch) makes every block the identity at "
               f"initialisation: max_l |Var(h_l)/Var(h_0) − 1| over {depth} blocks is 0"),
        paper=0.0, paper_status="derived", rule={"op": "abs_err_le", "value": 1e-12})
    add("zero_init_bn", "variance_identity_error", "zero_init_residual_identity_exact",
        source="Goyal et al. 2017",
        claim=(f"Zero-initialising each branch's last BN scale makes every block the identity "
               f"at initialisation: max_l |Var(h_l)/Var(h_0) − 1| over {depth} blocks is 0"),
        paper=0.0, paper_status="derived", rule={"op": "abs_err_le", "value": 1e-12})
    return out


IDENTITY = {"skipinit": "SkipInit", "fixup": "Fixup", "zero_init_bn": "zero-init-residual"}
EXACT = 1e-12  # |Var(h_l)/Var(h_0) - 1| and the gradient's below this: exactly the identity


def answer(data: dict, claims: list[dict]) -> str:
    """Which of SkipInit, Fixup and zero-init-residual keep the variance and the gradient
    exactly constant (largest identity error below ``EXACT``), beside He init's growth per
    block without and with BN."""
    stats = data.get("stats", {})
    errors = {name: max((e for key in ("variance_identity_error", "gradient_identity_error")
                         for e in stats[s].get(key, []) if finite(e)), default=None)
              for s, name in IDENTITY.items() if s in stats}
    exact = [name for name, e in errors.items() if e is not None and e < EXACT]
    drift = [f"{name} drifts by up to {num(e)}" for name, e in errors.items()
             if e is not None and e >= EXACT]
    where = f" over {data.get('depth', '?')} blocks (width {data.get('width', '?')})"
    parts = []
    if exact:
        parts.append(f"{', '.join(exact[:-1])}{' and ' if len(exact) > 1 else ''}{exact[-1]} "
                     f"keep the stream's variance and gradient exactly constant{where}")
        where = ""
    parts += drift
    he = mean(stats.get("he", {}).get("ratio_per_block"))
    bn = mean(stats.get("he_bn", {}).get("slope"))
    if finite(he):
        tail = f" (linearly, {signed(bn)} per block, with BN branches)" if finite(bn) else ""
        parts.append(f"{'while ' if parts else ''}plain He init lets the variance "
                     f"{'grow' if he > 1 else 'shrink'} ×{num(he)} per block{where}{tail}")
    if not parts:
        return sentence("Not measured: no scheme's trials finished" + caveat(claims))
    lead = ("by making every block the identity at initialisation: " if exact and not drift
            else "not all of them do: " if drift else "")
    return sentence(lead + ", ".join(parts) + caveat(claims))


# -- figures ----------------------------------------------------------------------------------

_STYLE = {"he": ("tab:red", "-"), "he_bn": ("tab:blue", "-"), "skipinit": ("tab:green", "-"),
          "fixup": ("tab:olive", ":"), "zero_init_bn": ("tab:purple", "--"),
          "he_post": ("tab:red", "--"), "he_post_bn": ("tab:blue", "--"),
          "fixup_post": ("tab:olive", "-.")}


def plot(data: dict, out_dir) -> list[str]:
    """Two figures: the stream's variance and the gradient norm against depth, per scheme."""
    from miniresnet.experiments import plots

    names = []
    for key, ylabel, title, fname in (
            ("variance", "Var(h_l) (geometric mean over nets)",
             "Does the residual stream's variance stay bounded through depth?", "variance"),
            ("grad_norm", "‖∂s/∂h_l‖ (geometric mean over nets)",
             "Does the gradient stay bounded through depth?", "gradient")):
        fig, axes = plots.figure(ncols=3 if key == "variance" else 2, width=4.6, height=4.0)
        for ax, post in zip(axes[0], (False, True)):
            for c in data["curves"]:
                if c["post"] != post:
                    continue
                colour, ls = _STYLE.get(c["scheme"], ("black", "-"))
                ax.plot(np.arange(len(c[key])), c[key], ls=ls, color=colour, label=c["label"])
            if key == "variance":
                _paper_lines(ax, data, post)
            ax.set_yscale("log")
            ax.set_xlabel("block l")
            ax.set_ylabel(ylabel)
            ax.set_title(("post-activation blocks: act(h + F(h))" if post
                          else "pre-activation blocks: h + F(h)") +
                         f", width {data['width']}")
            ax.legend(fontsize=7)
        if key == "variance":
            _plot_bounded(axes[0][2], data)
        fig.suptitle(title, fontsize=11)
        names.append(plots.save(fig, out_dir, f"{NAME}_{fname}.png"))
    return names


def _plot_bounded(ax, data):
    """The bounded schemes on a linear scale, where De & Smith's Var(h_0) + l is a line."""
    for c in data["curves"]:
        if c["scheme"] in ("he", "he_post"):
            continue
        colour, ls = _STYLE.get(c["scheme"], ("black", "-"))
        ax.plot(np.arange(len(c["variance"])), c["variance"], ls=ls, color=colour,
                label=c["label"])
    _paper_lines(ax, data, False, doubling=False)
    ax.set_xlabel("block l")
    ax.set_ylabel("Var(h_l)")
    ax.set_title("the bounded ones, linear scale")
    ax.legend(fontsize=7)


def _paper_lines(ax, data, post, doubling=True):
    """De & Smith's recursions from the measured Var(h_0): 2^l and Var(h_0) + l."""
    if post:
        return
    v0 = {c["scheme"]: c["variance"][0] for c in data["curves"]}
    ls = np.arange(data["depth"] + 1)
    if "he" in v0 and doubling:
        ax.plot(ls, v0["he"] * 2.0 ** ls, color="black", lw=0.9, ls=(0, (1, 2)),
                label="De & Smith: Var(h_0)·2^l")
    if "he_bn" in v0:
        ax.plot(ls, v0["he_bn"] + ls, color="gray", lw=0.9, ls=(0, (4, 2)),
                label="De & Smith: Var(h_0) + l")
