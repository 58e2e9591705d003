"""Jacobian spectra (Zaeemzadeh et al. 2020; Orhan & Pitkow 2018): do skips keep every
direction alive and every norm near its size?

For dense BN networks (``nn.mlp``, two-layer blocks, He init) the exact Jacobian of each block
and of blocks 1..L together is formed per input sample and its singular values taken. A
singular value near 1 passes a gradient direction on with its norm preserved; one near 0 loses
that direction (a singularity). Batch norm is in evaluation mode, so each sample's Jacobian is
its own; its running statistics are first set to those of a calibration batch (at
construction they are 0 and 1, which would make evaluation-mode BN the identity and leave the
residual stream unnormalised).
"""

from __future__ import annotations

import numpy as np

from miniresnet import inspect, nn
from miniresnet.backend_choice import current_backend
from miniresnet.experiments import plots
from miniresnet.experiments.answers import caveat, finite, measured, num, pct, sentence
from miniresnet.experiments.claims import claim, judge, mean_and_spread
from miniresnet.nn.layers import BatchNorm1d, BatchNorm2d
from miniresnet.tracing import no_grad

NAME = "jacobian_spectra"
TITLE = ("Do residual blocks keep every gradient direction, at its norm, where plain and "
         "post-activation blocks lose some?")
ESTIMATE = {"quick": 2, "default": 15, "full": 140}
SETUP = (
    "Dense BN networks (nn.mlp, width N, blocks of two linear layers, He init, Gaussian "
    "inputs of dimension N) with batch norm in evaluation mode; its running statistics are "
    "first set to the mean and variance of a calibration batch of 256 inputs (at construction "
    "they are 0 and 1, which would make evaluation-mode BN the identity). Block types: the "
    "full pre-activation residual block x + W2 relu(BN(W1 relu(BN(x)))), its plain "
    "counterpart without the skip, the original post-activation residual block "
    "relu(x + BN(W2 relu(BN(W1 x)))) and its plain counterpart. Each Jacobian is the exact "
    "N x N Jacobian of one sample (evaluation-mode BN keeps samples independent), averaged "
    "over a few samples and nets. 'Near zero' means sigma < 1e-10 sigma_max: exact zeros from "
    "inactive ReLUs (float64 leaves them near 1e-16 sigma_max) plus, end to end, values lost "
    "to ill-conditioning. The papers' statements "
    "are qualitative; these quantities are our operationalisation ('derived'): norm "
    "preservation is the median |log sigma| of a block's Jacobian (0 when every direction "
    "keeps its norm; for a plain block over its nonzero values only, its zeros would make it "
    "infinite)."
)
SOURCE_Z = "Zaeemzadeh et al. 2020"
SOURCE_OP = "Orhan & Pitkow 2018"
#: name -> nn.mlp keyword arguments
VARIANTS = {
    "residual_preact": dict(residual=True, order="full_preact"),
    "plain_preact": dict(residual=False, order="full_preact"),
    "residual_post": dict(residual=True, order="post"),
    "plain_post": dict(residual=False, order="post"),
}
LABELS = {"residual_preact": "residual, full pre-activation",
          "plain_preact": "plain, pre-activation order",
          "residual_post": "residual, post-activation (original)",
          "plain_post": "plain, post-activation order"}
SCALES = {
    "quick": dict(width=32, depth=16, nets=2, samples=2, e2e=[1, 4, 16]),
    "default": dict(width=64, depth=32, nets=4, samples=4, e2e=[1, 2, 4, 8, 16, 32]),
    "full": dict(width=128, depth=64, nets=8, samples=4, e2e=[1, 2, 4, 8, 16, 32, 64]),
}
CALIBRATION = 256
#: relative threshold below which a singular value counts as zero (float64 rounding leaves
#: exact zeros near 1e-16·σ_max)
ZERO = 1e-10


def trials(scale: str, seed: int) -> list[dict]:
    """One trial per (block type, net)."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; valid: {', '.join(SCALES)}")
    s = SCALES[scale]
    return [{"variant": v, "net": i, "width": s["width"], "depth": s["depth"],
             "samples": s["samples"], "e2e": s["e2e"]}
            for v in VARIANTS for i in range(s["nets"])]


def calibrate(model, x) -> None:
    """Set every batch norm's running statistics to those of the batch ``x`` (one
    training-mode forward pass with momentum 1), then put ``model`` in evaluation mode."""
    norms = [m for m in model.modules() if isinstance(m, BatchNorm1d | BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 1.0
    model.train()
    try:
        with no_grad():
            model(x)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
    model.eval()


def _spectra(jac: np.ndarray) -> np.ndarray:
    """Per sample, the singular values (descending) of its diagonal block of a batch
    Jacobian of shape (S, N, S, N): shape (S, N)."""
    return np.stack([np.linalg.svd(jac[b, :, b, :], compute_uv=False)
                     for b in range(jac.shape[0])])


def _describe(s: np.ndarray) -> dict:
    """Per-sample statistics of spectra ``s`` (S, N), averaged over samples."""
    alive = s > ZERO * s[:, :1]
    logs = np.abs(np.log(np.where(alive, s, 1.0)))
    return {"zero_fraction": float(1.0 - alive.mean()),
            "median_abs_log": float(np.mean([np.median(lg[a]) for lg, a in zip(logs, alive)])),
            "log10_cond": float(np.mean([np.log10(r[0] / r[a][-1]) for r, a in zip(s, alive)])),
            "spectrum": np.median(s, axis=0).tolist()}


def run_trial(config: dict, seed: int) -> dict:
    """For one net: each block's Jacobian spectrum statistics (blocks 1..L) and those of the
    end-to-end Jacobian of blocks 1..d for each d of ``config["e2e"]``."""
    variant, width, depth = config["variant"], config["width"], config["depth"]
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
    if max(config["e2e"]) > depth:
        raise ValueError(f"e2e depths {config['e2e']} go past the net's {depth} blocks")
    rng = np.random.default_rng(seed)
    model = nn.mlp(depth, width, in_features=width, out_features=width, layers=2, norm=True,
                   seed=int(rng.integers(2**31)), **VARIANTS[variant])
    be = current_backend()
    calibrate(model, be.asarray(rng.standard_normal((CALIBRATION, width)), "float64"))
    x = be.asarray(rng.standard_normal((config["samples"], width)), "float64")
    blocks = [_describe(_spectra(inspect.block_jacobian(model, x, i)))
              for i in range(1, depth + 1)]
    e2e = [_describe(_spectra(inspect.stream_jacobian(model, x, 1, d))) for d in config["e2e"]]
    return {"blocks": blocks, "e2e": e2e}


def _per_net(results, variant: str, pick) -> list[float]:
    return [pick(data) for config, data in results if config["variant"] == variant]


def summarise(results: list, scale: str) -> dict:
    """Per block type: statistics against block index and end-to-end depth (mean over nets),
    the spectra for the figures, and the claims."""
    variants = [v for v in VARIANTS if any(c["variant"] == v for c, _ in results)]
    data = {"zero_threshold": ZERO, "labels": LABELS, "variants": {}}
    for v in variants:
        runs = [d for c, d in results if c["variant"] == v]
        config = next(c for c, _ in results if c["variant"] == v)

        def mean(part, key, runs=runs):
            return np.mean([[item[key] for item in r[part]] for r in runs], axis=0).tolist()

        data["variants"][v] = {
            "nets": len(runs), "width": config["width"],
            "block": list(range(1, config["depth"] + 1)), "e2e_depth": config["e2e"],
            **{f"block_{k}": mean("blocks", k) for k in ("zero_fraction", "median_abs_log")},
            **{f"e2e_{k}": mean("e2e", k) for k in ("zero_fraction", "median_abs_log",
                                                     "log10_cond")},
            # median over nets of the per-net median spectra
            "spectrum_first": np.median([r["blocks"][0]["spectrum"] for r in runs],
                                        axis=0).tolist(),
            "spectrum_last": np.median([r["blocks"][-1]["spectrum"] for r in runs],
                                       axis=0).tolist(),
            "e2e_spectra": np.median([[e["spectrum"] for e in r["e2e"]] for r in runs],
                                     axis=0).tolist(),
        }
    claims = []

    def add(cid, source, text, values, rule, holds_at):
        m, sd, n = mean_and_spread(values)
        claims.append(judge(claim(cid, source=source, claim=text, measured=m, n=n, spread=sd,
                                  paper_status="derived", rule=rule, holds_at=holds_at), scale))

    def block_mean(r, key):
        return float(np.mean([b[key] for b in r["blocks"]]))

    if {"residual_preact", "plain_preact"} <= set(variants):
        res = _per_net(results, "residual_preact", lambda r: block_mean(r, "median_abs_log"))
        plain = _per_net(results, "plain_preact", lambda r: block_mean(r, "median_abs_log"))
        add("residual_block_norm_preservation", SOURCE_Z,
            "identity skips preserve the gradient's norm: a full pre-activation residual "
            "block's median |log sigma| over its plain counterpart's (nonzero sigma only; "
            "per-net ratios of the means over blocks)",
            [a / b for a, b in zip(res, plain)], {"op": "lt", "value": 0.5}, "quick")
    if "residual_preact" in variants:
        add("residual_norm_preservation_with_depth", SOURCE_Z,
            "as residual blocks are stacked, each preserves norms better: median |log sigma| "
            "of the last block over that of the first",
            _per_net(results, "residual_preact",
                     lambda r: r["blocks"][-1]["median_abs_log"]
                     / r["blocks"][0]["median_abs_log"]),
            {"op": "lt", "value": 0.6}, "default")
        add("preact_residual_zero_directions", SOURCE_OP,
            "a full pre-activation residual block loses no direction: fraction of near-zero "
            "sigma (largest over blocks)",
            _per_net(results, "residual_preact",
                     lambda r: max(b["zero_fraction"] for b in r["blocks"])),
            {"op": "lt", "value": 1e-3}, "quick")
        add("residual_end_to_end_zero_directions", SOURCE_OP,
            "blocks 1..L of a full pre-activation resnet together lose no direction: fraction "
            "of near-zero sigma of the end-to-end Jacobian at the deepest L",
            _per_net(results, "residual_preact", lambda r: r["e2e"][-1]["zero_fraction"]),
            {"op": "lt", "value": 1e-3}, "quick")
    if "residual_post" in variants:
        add("post_activation_zero_directions", SOURCE_OP,
            "the original post-activation block's ReLU after the addition zeroes directions: "
            "fraction of near-zero sigma (mean over blocks)",
            _per_net(results, "residual_post", lambda r: block_mean(r, "zero_fraction")),
            {"op": "gt", "value": 0.05}, "quick")
    if "plain_preact" in variants:
        add("plain_end_to_end_zero_directions", SOURCE_OP,
            "a deep plain BN ReLU net is singular: fraction of near-zero sigma of the "
            "end-to-end Jacobian of blocks 1..L at the deepest L",
            _per_net(results, "plain_preact", lambda r: r["e2e"][-1]["zero_fraction"]),
            {"op": "gt", "value": 0.5}, "quick")
    return {"claims": claims, "data": data}


def _floored(s, floor):
    return np.maximum(np.asarray(s, dtype=float), floor)


LOSES_NONE = 1e-3  # near-zero fraction below this: no direction lost (the claims' rule)


def answer(data: dict, claims: list[dict]) -> str:
    """Whether the residual stack loses fewer directions end to end than the plain one and
    than post-activation blocks, and distorts norms less than plain blocks (ratio below 1)."""
    res, plain = (measured(claims, "residual_end_to_end_zero_directions"),
                  measured(claims, "plain_end_to_end_zero_directions"))
    post = measured(claims, "post_activation_zero_directions")
    norm = measured(claims, "residual_block_norm_preservation")
    v = data.get("variants", {}).get("residual_preact", {})
    depth = (v.get("e2e_depth") or ["?"])[-1]
    found = []
    if finite(res, plain):
        keeps = res < plain
        lost = ("no direction is lost" if res < LOSES_NONE
                else f"{pct(res)} of the directions are lost")
        found.append((keeps, f"end to end through {depth} full pre-activation residual blocks "
                             f"(width {v.get('width', '?')}) {lost}, against {pct(plain)} "
                             f"through plain ones"))
    if finite(res, post):
        found.append((res < post, f"post-activation blocks lose {pct(post)} per block"))
    if finite(norm):
        found.append((norm < 1, f"a residual block distorts norms {num(norm)}× as much as a "
                                f"plain one"))
    if not found:
        return sentence("Not measured: the Jacobians are missing" + caveat(claims))
    yes = [k for k, _ in found]
    lead = "yes" if all(yes) else "no" if not any(yes) else "partly"
    texts = [t for _, t in found]
    listed = ", ".join(texts[:-1]) + (", and " if len(texts) > 1 else "") + texts[-1]
    return sentence(f"{lead}: {listed}" + caveat(claims))


def plot(data: dict, out_dir) -> list[str]:
    """Three figures: single-block spectra per block type, end-to-end spectra against depth,
    and the near-zero fraction and norm distortion against block index and depth."""
    variants, labels, zero = data["variants"], data["labels"], data["zero_threshold"]
    floor = 1e-18
    names = []
    fig, axes = plots.figure(2, 1, width=4.6, height=3.8)
    for ax, key, which in ((axes[0, 0], "spectrum_first", "block 1"),
                           (axes[0, 1], "spectrum_last", "last block")):
        for v, d in variants.items():
            s = _floored(d[key], floor)
            ax.semilogy(np.arange(1, len(s) + 1), s, marker=".", ms=3, label=labels[v])
        ax.axhline(1.0, color="k", lw=0.8, ls=":", label="σ = 1 (norm kept)")
        ax.set_xlabel("index (sorted, descending)")
        ax.set_ylabel(f"singular value (zeros drawn at {floor:g})")
        ax.set_title(which)
    axes[0, 1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle("Which block types keep every direction at its norm?\n(one block's Jacobian "
                 "spectrum, median over samples and nets)", fontsize=11)
    names.append(plots.save(fig, out_dir, "jacobian_spectra_blocks.png"))

    fig, axes = plots.figure(len(variants), 1, width=3.4, height=3.4)
    for ax, (v, d) in zip(axes.flat, variants.items()):
        colors = plots.plt.cm.viridis(np.linspace(0, 0.9, len(d["e2e_depth"])))
        for depth, s, c in zip(d["e2e_depth"], d["e2e_spectra"], colors):
            s = _floored(s, floor)
            ax.semilogy(np.arange(1, len(s) + 1), s, color=c, lw=1, label=f"L = {depth}")
        ax.axhline(zero * max(_floored(d["e2e_spectra"][-1], floor)), color="r", lw=0.8,
                   ls="--", label=f"{zero:g}·σ_max at the deepest L")
        ax.set_title(labels[v])
        ax.set_xlabel("index (sorted, descending)")
        ax.set_ylabel(f"σ of blocks 1..L (zeros at {floor:g})")
    axes.flat[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle("How does the end-to-end Jacobian's spectrum change with depth L? (median "
                 "over samples and nets)", fontsize=11)
    names.append(plots.save(fig, out_dir, "jacobian_spectra_depth.png"))

    fig, axes = plots.figure(4, 1, width=3.6, height=3.4)
    for v, d in variants.items():
        axes[0, 0].plot(d["block"], d["block_median_abs_log"], marker=".", label=labels[v])
        axes[0, 1].plot(d["block"], d["block_zero_fraction"], marker=".", label=labels[v])
        axes[0, 2].plot(d["e2e_depth"], d["e2e_zero_fraction"], marker="o", label=labels[v])
        axes[0, 3].plot(d["e2e_depth"], d["e2e_log10_cond"], marker="o", label=labels[v])
    axes[0, 0].set_ylabel("median |log σ| (nonzero σ)")
    axes[0, 0].set_title("Norm distortion of block l")
    axes[0, 1].set_ylabel(f"fraction of σ < {zero:g}·σ_max")
    axes[0, 1].set_title("Directions block l zeroes")
    axes[0, 2].set_ylabel(f"fraction of σ < {zero:g}·σ_max")
    axes[0, 2].set_title("Directions blocks 1..L lose")
    axes[0, 3].set_ylabel("log10(σ_max / smallest nonzero σ)")
    axes[0, 3].set_title("Condition of blocks 1..L")
    for ax in axes[0, 2:]:
        ax.set_xscale("log", base=2)
    for ax, label in zip(axes.flat, ("block l", "block l", "depth L (blocks)",
                                     "depth L (blocks)")):
        ax.set_xlabel(label)
    axes[0, 3].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle("Where do skips keep directions and norms that plain and post-activation "
                 "blocks lose? (mean over nets)", fontsize=11)
    names.append(plots.save(fig, out_dir, "jacobian_spectra_summary.png"))
    return names
