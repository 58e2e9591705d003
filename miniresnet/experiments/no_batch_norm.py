"""Training without batch norm (Zhang et al. 2019, Fixup; De & Smith 2020, SkipInit): a deep
ResNet without normalisation, initialised as usual (He), has a gradient that explodes with depth;
Fixup (rescaled, zero-initialised branches) and SkipInit (a branch multiplier α = 0) are meant to
make it trainable as batch norm does; clipping the gradient's global norm (Pascanu et al. 2013)
is the generic remedy for exploding gradients."""

from __future__ import annotations

import math
import warnings

import numpy as np

from miniresnet.experiments import answers, degradation, training
from miniresnet.experiments.claims import claim
from miniresnet.experiments.plots import figure, save
from miniresnet.train import DivergenceError

NAME = "no_batch_norm"
TITLE = ("Without batch norm, does a deep ResNet train from He init, and do Fixup, SkipInit or "
         "gradient clipping make it train?")
ESTIMATE = {"quick": 4.0, "default": 140.0, "full": 600.0}
SOURCE = "Zhang et al. 2019 (Fixup); De & Smith 2020 (SkipInit)"
CLIP = 1.0  # the global-norm clipping threshold of the clipped runs
SETUP = (
    "The deepest net of the degradation experiment (CIFAR-style, same width, data, epochs and "
    "SGD budget: lr 0.1 cosine, momentum 0.9, weight decay 5e-4, batch 128, float32), trained "
    "in these variants: with batch norm (He init, as in degradation, and zero-init-residual, "
    "the last batch norm's scale of each branch at 0) and its plain counterpart; without batch "
    "norm (every layer then has a bias): He init, Fixup, SkipInit (α = 0) and the plain net, "
    f"each once without and once with gradient clipping by global norm at {CLIP:g}. Every "
    "step's minibatch loss and gradient norm (before clipping) are recorded. A run stops when a "
    "loss or gradient becomes non-finite (diverged); for its test accuracy it counts at chance "
    "(1 / classes). All claims are pinned to the default scale (ResNet-44)."
)

#: name: (label, residual, model arguments, batch norm)
VARIANTS = {
    "bn": ("ResNet + BN", True, {}, True),
    "bn_zero_init": ("ResNet + BN, zero-init", True, {"zero_init_residual": True}, True),
    "plain_bn": ("plain + BN", False, {}, True),
    "he": ("ResNet, He", True, {"norm": False}, False),
    "fixup": ("ResNet, Fixup", True, {"norm": False, "init": "fixup"}, False),
    "skipinit": ("ResNet, SkipInit", True, {"norm": False, "skipinit": 0.0}, False),
    "plain": ("plain, He", False, {"norm": False}, False),
}
CHANCE_MARGIN = 0.1   # "does not train": test accuracy below chance + this
BN_MARGIN = 2.0       # "matches batch norm": at most this many percentage points below it


def net_config(scale: str, variant: str, clip_norm: float | None, data: str = "digits"):
    """The training config of ``variant`` (a key of :data:`VARIANTS`) at ``scale``: the
    deepest degradation net's config with the variant's model arguments and ``clip_norm``;
    "bn" and "plain_bn" without clipping are degradation's own nets (shared, trained once)."""
    n = max(c["n"] for c in degradation.deepest_nets(scale, 0, data))
    _, residual, model, _ = VARIANTS[variant]
    base = degradation.net_config(scale, n, residual, data)
    return {**base, "model": {**base["model"], **model}, "clip_norm": clip_norm}


def trials(scale: str, seed: int, data: str = "digits") -> list[dict]:
    """One trial per variant; the variants without batch norm also once with clipping. The
    nets are trained with the seed of degradation's first replicate."""
    [first, *_] = [c for c in degradation.deepest_nets(scale, seed, data)  # checks the scale
                   if c["replicate"] == 0]
    n, train_seed = first["n"], first["train_seed"]
    digest = {} if data == "digits" else {"data_sha256": training.file_digest(data)}
    return [{"variant": v, "clip_norm": clip, "n": n, "train_seed": train_seed,
             "train": net_config(scale, v, clip, data), **digest}
            for v, (_, _, _, bn) in VARIANTS.items()
            for clip in ((None,) if bn else (None, CLIP))]


def _finite_or_none(values) -> list:
    return [float(v) if math.isfinite(v) else None for v in values]


def run_trial(config: dict, seed: int) -> dict:
    """The net's per-epoch curves and per-step loss and gradient norm, trained (or loaded from
    the store) until the end or until it diverged. ``seed`` is unused: the net's seed is
    ``config["train_seed"]``."""
    try:
        with warnings.catch_warnings():  # a diverging run overflows on its way: that is data
            warnings.simplefilter("ignore", RuntimeWarning)
            net = training.trained(config["train"], config["train_seed"])
        records, steps, diverged = net.history, net.steps, None
    except DivergenceError as e:
        h = e.history
        records, diverged = h.records, {"epoch": e.epoch, "step": e.step}
        steps = {"loss": h.step_loss, "grad_norm": h.step_grad_norm}
    return {**{name: [r[name] for r in records]
               for name in ("train_loss", "train_acc", "test_loss", "test_acc")},
            "step_loss": _finite_or_none(steps["loss"]),
            "step_grad_norm": _finite_or_none(steps["grad_norm"]),
            "diverged": diverged}


def run_name(variant: str, clip_norm: float | None) -> str:
    """The key of one run in the summary's data, e.g. "he" or "he+clip"."""
    return variant if clip_norm is None else f"{variant}+clip"


def final_test_acc(d: dict, chance: float) -> float:
    """The last epoch's test accuracy; ``chance`` for a run that diverged."""
    return chance if d["diverged"] is not None or not d["test_acc"] else d["test_acc"][-1]


def summarise(results: list, scale: str) -> dict:
    """Claims on divergence, the first step's gradient norm and the final test accuracies;
    data: every run's curves."""
    chance = 1.0 / training.load_data(results[0][0]["train"]["data"], "float32").num_classes
    runs = {}
    for c, d in results:
        label, _, _, bn = VARIANTS[c["variant"]]
        runs[run_name(c["variant"], c["clip_norm"])] = {
            **d, "label": label + ("" if c["clip_norm"] is None else f", clip {CLIP:g}"),
            "batch_norm": bn, "clip_norm": c["clip_norm"], "final_test_acc":
            final_test_acc(d, chance)}
    n = results[0][0]["n"]
    layers = 6 * n + 2
    acc = {k: r["final_test_acc"] for k, r in runs.items()}
    first = {k: r["step_grad_norm"][0] for k, r in runs.items()}
    epochs = results[0][0]["train"]["epochs"]
    budget = f"after {epochs} epochs at lr 0.1"
    claims = [
        claim("no_bn_he_resnet_does_not_train", source=SOURCE, paper_status="derived",
              claim=f"without batch norm and without clipping, the He-initialised ResNet-"
                    f"{layers} does not train {budget}: its final test accuracy (a diverged "
                    f"run counts at chance, {chance:.2f}) stays below chance + "
                    f"{CHANCE_MARGIN:g} (Zhang et al.: with standard initialisation and no "
                    f"normalisation the gradient explodes with depth; margin ours)",
              measured=acc["he"], rule={"op": "lt", "value": chance + CHANCE_MARGIN},
              holds_at="default"),
        claim("no_bn_he_first_gradient_vs_bn", source=SOURCE, paper_status="derived",
              claim=f"at the first step, the gradient's global norm of the He-initialised "
                    f"ResNet-{layers} without batch norm divided by that with batch norm "
                    f"(> 1; Zhang et al.: without normalisation the gradient norm at "
                    f"initialisation grows with depth)",
              measured=_ratio(first["he"], first["bn"]), rule={"op": "gt", "value": 1.0},
              holds_at="default"),
        claim("no_bn_fixup_matches_bn", source="Zhang et al. 2019 (Fixup)",
              paper_status="derived",
              claim=f"Fixup trains the ResNet-{layers} without batch norm and without "
                    f"clipping: batch norm's final test accuracy minus Fixup's, in percentage "
                    f"points (Zhang et al.: Fixup matches batch norm on CIFAR-10; at most "
                    f"{BN_MARGIN:g} points, bound ours)",
              measured=100 * (acc["bn"] - acc["fixup"]), rule={"op": "lt", "value": BN_MARGIN},
              holds_at="default"),
        claim("no_bn_skipinit_matches_bn", source="De & Smith 2020 (SkipInit)",
              paper_status="derived",
              claim=f"SkipInit (α = 0) trains the ResNet-{layers} without batch norm and "
                    f"without clipping: batch norm's final test accuracy minus SkipInit's, in "
                    f"percentage points (De & Smith: SkipInit trains deep ResNets without "
                    f"normalisation; at most {BN_MARGIN:g} points, bound ours)",
              measured=100 * (acc["bn"] - acc["skipinit"]),
              rule={"op": "lt", "value": BN_MARGIN}, holds_at="default"),
        claim("no_bn_clipping_rescues_he", source="Pascanu et al. 2013", paper_status="derived",
              claim=f"clipping the gradient's global norm at {CLIP:g} lets the He-initialised "
                    f"ResNet-{layers} without batch norm train: its final test accuracy minus "
                    f"the unclipped run's (> 0.5; Pascanu et al.: clipping the norm tames "
                    f"exploding gradients; bound ours)",
              measured=acc["he+clip"] - acc["he"], rule={"op": "gt", "value": 0.5},
              holds_at="default"),
    ]
    data = {"n": n, "layers": layers, "epochs": epochs, "clip": CLIP, "chance": chance,
            "runs": runs, "final_test_acc": acc, "first_grad_norm": first,
            "steps_per_epoch": _steps_per_epoch(runs)}
    return {"claims": claims, "data": data}


def _ratio(a, b) -> float:
    return math.nan if a is None or b is None or b == 0 else a / b


def _steps_per_epoch(runs: dict) -> int:
    r = next(r for r in runs.values() if r["diverged"] is None)
    return len(r["step_grad_norm"]) // max(1, len(r["train_loss"]))


_ORDER = ("bn", "bn_zero_init", "plain_bn", "he", "he+clip", "fixup", "fixup+clip",
          "skipinit", "skipinit+clip", "plain", "plain+clip")
_COLOURS = {"bn": "k", "bn_zero_init": "0.5", "plain_bn": "0.75", "he": "C3", "fixup": "C0",
            "skipinit": "C2", "plain": "C1"}


def plot(data: dict, out_dir) -> list[str]:
    """Per-step gradient norms without and with clipping, training loss per epoch, and the
    final test accuracy of every run."""
    fig, axes = figure(2, 2, width=5.4, height=3.7)
    runs = data["runs"]
    spe = data["steps_per_epoch"]
    finite = [v for r in runs.values() if r["diverged"] is None
              for v in r["step_grad_norm"] if v is not None]
    cap = 30 * max(finite, default=1.0)  # a diverging run's last norms would squash the rest
    for j, clipped in enumerate((False, True)):
        ax = axes[0, j]
        for name in _ORDER:  # clipped panel: the clipped runs beside batch norm's
            r = runs.get(name)
            if r is None or not ((r["clip_norm"] is not None) == clipped
                                 or clipped and name == "bn"):
                continue
            g = np.array([np.nan if v is None else v for v in r["step_grad_norm"]])
            x = np.arange(1, len(g) + 1) / spe
            colour = _COLOURS[name.split("+")[0]]
            ax.semilogy(x, np.minimum(g, cap), lw=0.9, color=colour, label=r["label"])
            if r["diverged"] is not None:
                last = np.flatnonzero(np.isfinite(g))
                if last.size:
                    i = last[-1]
                    ax.plot(x[i], min(g[i], cap), "x", ms=9, mew=2, color=colour)
                    ax.annotate(f"{g[i]:.0e}", (x[i], min(g[i], cap)), fontsize=7,
                                color=colour, xytext=(5, -10), textcoords="offset points")
        if clipped:
            ax.axhline(data["clip"], color="grey", lw=0.8, ls=":",
                       label=f"clip threshold ({data['clip']:g})")
        ax.set_title(f"Gradient norm per step, {'with' if clipped else 'without'} clipping"
                     + ("" if clipped else " (x: diverged; its last norm)"))
        ax.set_xlabel("epoch (steps / steps per epoch)")
        ax.set_ylabel("global gradient norm before clipping (log)")
        ax.legend(fontsize=7, loc="best")
    ax = axes[1, 0]
    for name in _ORDER:
        r = runs.get(name)
        if r is None or not r["train_loss"]:
            continue
        ls = "--" if r["clip_norm"] is not None else "-"
        ax.semilogy(np.arange(1, len(r["train_loss"]) + 1), r["train_loss"], ls, lw=1.1,
                    color=_COLOURS[name.split("+")[0]], label=r["label"])
    ax.axhline(math.log(1 / data["chance"]), color="grey", lw=0.8, ls=":",
               label="chance (log #classes)")
    ax.set_title("Training loss per epoch (dashed: clipped; diverged runs end early)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean training cross-entropy (nats, log)")
    ax.legend(fontsize=6, ncol=2, loc="lower left")
    ax = axes[1, 1]
    names = [n for n in _ORDER if n in runs]
    accs = [runs[n]["final_test_acc"] for n in names]
    colours = [_COLOURS[n.split("+")[0]] for n in names]
    bars = ax.barh(np.arange(len(names)), accs, color=colours, edgecolor="k", linewidth=0.5)
    for bar, n in zip(bars, names):
        if runs[n]["clip_norm"] is not None:
            bar.set_hatch("//")
        if runs[n]["diverged"] is not None:
            ax.text(bar.get_width() + 0.01, bar.get_y() + bar.get_height() / 2, "diverged",
                    va="center", fontsize=7)
    ax.set_yticks(np.arange(len(names)), [runs[n]["label"] for n in names], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(data["chance"], color="grey", lw=0.8, ls=":", label="chance")
    ax.set_xlim(0, 1.08)
    ax.set_xlabel("final test accuracy (hatched: clipped; diverged: chance)")
    ax.set_title("Final test accuracy")
    ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Without batch norm: ResNet-{data['layers']} and its plain counterpart, "
                 f"{data['epochs']} epochs, same budget", fontsize=10)
    return [save(fig, out_dir, "no_batch_norm.png")]


def answer(data: dict, claims: list[dict]) -> str:
    """The measured answer in one sentence: how each run without batch norm ended (final test
    accuracy, or where it diverged), with every claim that does not reproduce named."""
    runs, chance = data.get("runs", {}), data.get("chance", math.nan)

    def outcome(name: str) -> str:
        r = runs.get(name)
        if r is None:
            return "did not run"
        if r["diverged"] is not None:
            return f"diverged in epoch {r['diverged']['epoch'] + 1}"
        acc = r["final_test_acc"]
        return f"stayed at chance ({acc:.3f})" if acc < chance + CHANCE_MARGIN else f"{acc:.3f}"

    he = runs.get("he")
    trains = he is not None and he["final_test_acc"] >= chance + CHANCE_MARGIN
    bn = runs.get("bn", {}).get("final_test_acc")
    return answers.sentence(
        f"{'Yes' if trains else 'No'}: without batch norm the He-initialised "
        f"ResNet-{data.get('layers', '?')} {outcome('he')} (clipped at "
        f"{answers.num(data.get('clip'))}: {outcome('he+clip')} test accuracy), Fixup "
        f"{outcome('fixup')}, SkipInit {outcome('skipinit')} (clipped: "
        f"{outcome('skipinit+clip')}), plain {outcome('plain')}; batch norm {answers.num(bn)}"
        + answers.caveat(claims))
