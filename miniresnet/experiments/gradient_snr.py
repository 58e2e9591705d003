"""Balduzzi et al. 2017 (shattered gradients) seen through the minibatch gradient's
signal-to-noise ratio: is the gradient of a plain net's early blocks mostly noise from one
minibatch to the next, unlike a ResNet's, at initialisation and through training?"""

from __future__ import annotations

import numpy as np

from miniresnet import inspect
from miniresnet.backend_choice import current_backend
from miniresnet.data import batches as minibatches
from miniresnet.experiments import answers, degradation, training
from miniresnet.experiments.claims import claim, mean_and_spread
from miniresnet.experiments.plots import figure, save

NAME = "gradient_snr"
TITLE = ("Is the minibatch gradient of a plain net's early blocks mostly noise, unlike a "
         "ResNet's, at initialisation and through training?")
ESTIMATE = {"quick": 1.0, "default": 80.0, "full": 80.0}  # default trains 2 more net pairs
SOURCE = "Balduzzi et al. 2017"
SETUP = (
    "The deepest plain and residual nets of the degradation experiment (shared trained "
    "networks, float32 training; n = 7, ResNet-44 and its plain counterpart, 12 epochs at the "
    "default scale), trained three times with different seeds at the default and full scales "
    "(the first pair is degradation's own), at initialisation, after 1 and 3 epochs and at the "
    "end (weight snapshots of the same training run). A float64 copy of each in training mode "
    "(each minibatch normalised with its own statistics, as SGD sees it; nothing is updated) "
    "gets the gradient of the mean cross-entropy on B fixed, disjoint minibatches of the "
    "training set (the same for both nets of a replicate at every epoch); per block the "
    "signal-to-noise ratio ‖ḡ‖² / mean_b ‖g_b − ḡ‖² of its parameters' gradient is reported "
    "(inspect.gradient_snr). The claims compare the mean log10 SNR of the first stage's blocks "
    "(those before the first downsampling block), plain minus ResNet, averaged over the "
    "replicates: at initialisation (pinned to every scale), averaged over the snapshots taken "
    "during training, and for the trained nets (both pinned to the default scale)."
)

#: minibatches (B) and their size; the nets and snapshot epochs are degradation's at that scale
#: replicates: independently trained pairs of nets (the first is degradation's own; one trained
#: float32 net is a single draw of a chaotic trajectory, so the claims average over several)
_SCALES = {"quick": {"batches": 8, "batch_size": 32, "replicates": 1},
           "default": {"batches": 16, "batch_size": 64, "replicates": 3},
           "full": {"batches": 16, "batch_size": 64, "replicates": 3}}
KINDS = ("plain", "resnet")


def epochs(last: int) -> tuple[int, ...]:
    """The snapshot epochs of a net trained ``last`` epochs: 0 (initialisation), the stored
    snapshot epochs before the end, and ``last``."""
    return (0, *(e for e in training.SNAPSHOT_EPOCHS if 0 < e < last), last)


def trials(scale: str, seed: int, data: str = "digits") -> list[dict]:
    """One trial per (replicate, plain or residual, snapshot epoch) of degradation's deepest
    nets at ``scale``: their training configs, with the seed of each replicate (replicate 0's
    nets are degradation's own, shared)."""
    if scale not in _SCALES:
        raise ValueError(f"gradient_snr: unknown scale {scale!r}; valid: {', '.join(_SCALES)}")
    s = _SCALES[scale]
    first = [c for c in degradation.deepest_nets(scale, seed, data) if c["replicate"] == 0]
    nets = [{**c, "replicate": r, "train_seed": training.net_seed(seed, r)}
            for r in range(s["replicates"]) for c in first]
    return [{**c, "epoch": e, "batches": s["batches"], "batch_size": s["batch_size"]}
            for c in nets for e in epochs(c["train"]["epochs"])]


def fixed_batches(ds, count: int, size: int, seed: int) -> list[tuple]:
    """``count`` disjoint minibatches of ``size`` training examples, drawn by a permutation
    seeded ``seed`` (the same for every net that passes the same seed)."""
    if count * size > ds.n_train:
        raise ValueError(f"gradient_snr: {count} minibatches of {size} need {count * size} "
                         f"training examples; the data has {ds.n_train}")
    xp = current_backend().xp
    order = minibatches(ds.n_train, size, np.random.default_rng(seed), drop_last=True)
    return [(xp.take(ds.x_train, idx, axis=0), xp.take(ds.y_train, idx, axis=0))
            for _, idx in zip(range(count), order, strict=False)]


def run_trial(config: dict, seed: int) -> dict:
    """The gradient SNR per block (and of the stem, the head and all parameters) of the net's
    snapshot after ``config["epoch"]`` epochs. ``seed`` is unused: the net's seed and the
    minibatches' come from ``config["train_seed"]``, so plain and residual nets of a replicate
    see the same minibatches at every epoch."""
    cfg = config["train"]
    ds = training.load_data(cfg["data"], "float64")
    model = training.snapshot(cfg, config["train_seed"], config["epoch"]).to("float64")
    model.train()  # each minibatch normalised with its own statistics, as during training
    r = inspect.gradient_snr(model, fixed_batches(ds, config["batches"], config["batch_size"],
                                                  config["train_seed"]))
    return {"blocks": r.blocks.tolist(), "stem": r.stem, "head": r.head, "total": r.total,
            "batches": r.batches}


def stage_log_snr(blocks, n: int) -> list[float]:
    """Mean log10 SNR of each stage's blocks (stage s: blocks s·n + 1 .. (s + 1)·n; the first
    stage is the one before the first downsampling block)."""
    logs = np.log10(np.asarray(blocks, dtype=float))
    return [float(np.mean(logs[s * n:(s + 1) * n])) for s in range(len(logs) // n)]


def _geometric_mean(rows) -> list:
    """Per entry, the geometric mean over replicates (SNRs multiply, so average their logs)."""
    return (10 ** np.mean(np.log10(np.asarray(rows, dtype=float)), axis=0)).tolist()


def summarise(results: list, scale: str) -> dict:
    """Claims on the first stage's mean log10 SNR, plain minus ResNet, at initialisation, during
    and after training; data: SNR per block per kind and epoch (geometric mean over replicates)."""
    n = results[0][0]["n"]
    eps = sorted({c["epoch"] for c, _ in results})
    first, last = eps[0], eps[-1]
    snr: dict = {k: {} for k in KINDS}
    groups: dict = {k: {} for k in KINDS}
    stages: dict = {k: {} for k in KINDS}
    for kind in KINDS:
        for e in eps:
            rows = [d for c, d in results if c["kind"] == kind and c["epoch"] == e]
            if not rows:
                continue
            snr[kind][str(e)] = _geometric_mean([d["blocks"] for d in rows])
            groups[kind][str(e)] = dict(zip(("stem", "head", "total"), _geometric_mean(
                [[d["stem"], d["head"], d["total"]] for d in rows])))
            stages[kind][str(e)] = np.mean([stage_log_snr(d["blocks"], n) for d in rows],
                                           axis=0).tolist()

    def gap(which: list) -> tuple[float, float, int]:
        """Mean ± spread over replicates of plain − ResNet first-stage mean log10 SNR, each
        replicate's averaged over the epochs ``which``."""
        by: dict = {}
        for c, d in results:
            if c["epoch"] in which:
                by.setdefault(c.get("replicate", 0), {}).setdefault(c["kind"], []).append(
                    stage_log_snr(d["blocks"], n)[0])
        return mean_and_spread([np.mean(v["plain"]) - np.mean(v["resnet"])
                                for v in by.values() if len(v) == 2])

    middle = eps[1:-1]  # the snapshots taken during training (1 and 3 at the default scale)
    init, during, end = gap([first]), gap(middle), gap([last])

    def upper(g) -> float:
        """Mean plus one standard error over replicates: below 0 only if noisier beyond noise."""
        return g[0] + g[1] / np.sqrt(g[2]) if g[2] else float("nan")

    layers = 6 * n + 2
    stage1 = (f"mean over blocks 1..{n} of log10 SNR, plain minus ResNet, averaged over the "
              f"replicates plus one standard error")
    claims = [
        claim("gradient_snr_plain_below_resnet_init", source=SOURCE, paper_status="derived",
              claim=f"at initialisation the minibatch gradient of the plain {layers}-layer "
                    f"net's first-stage blocks is noisier than the ResNet-{layers}'s: {stage1} "
                    f"(< 0; Balduzzi et al.: a deep plain net's gradients shatter into noise, "
                    f"skip connections keep them coherent)",
              measured=upper(init), n=init[2], spread=init[1],
              rule={"op": "lt", "value": 0.0},
              holds_at="quick"),
        claim("gradient_snr_plain_below_resnet_training", source=SOURCE,
              paper_status="derived",
              claim=f"during training (averaged over the snapshots after epochs "
                    f"{', '.join(map(str, middle))}) the plain {layers}-layer net's first-stage "
                    f"gradient is noisier than the ResNet-{layers}'s: {stage1} (< 0; "
                    f"Balduzzi et al.'s picture carried into training)",
              measured=upper(during), n=during[2], spread=during[1],
              rule={"op": "lt", "value": 0.0}, holds_at="default"),
        claim("gradient_snr_plain_below_resnet_trained", source=SOURCE, paper_status="derived",
              claim=f"after training ({last} epochs) the plain {layers}-layer net's first-stage "
                    f"gradient is still noisier than the ResNet-{layers}'s: {stage1} (< 0; "
                    f"Balduzzi et al.'s picture carried to the trained nets)",
              measured=upper(end), n=end[2], spread=end[1], rule={"op": "lt", "value": 0.0},
              holds_at="default"),
    ]
    data = {"n": n, "layers": layers, "epochs": eps, "snr": snr, "groups": groups,
            "stage_log10_snr": stages,
            "downsampling": [n + 1, 2 * n + 1],  # blocks with a projection shortcut
            "batches": results[0][1]["batches"], "batch_size": results[0][0].get("batch_size")}
    return {"claims": claims, "data": data}


def plot(data: dict, out_dir) -> list[str]:
    """SNR per block at each epoch (plain, residual; log scale) and each stage's mean log10 SNR
    against epoch (the first stage, the claims' measure, in bold)."""
    from matplotlib.ticker import FuncFormatter

    def tick(v, _pos) -> str:  # plain numbers; of the minor ticks only 2 and 5 x 10^k
        mantissa = round(v / 10 ** np.floor(np.log10(v)), 6)
        return f"{v:g}" if mantissa in (1, 2, 5) else ""

    fig, axes = figure(3, 1, width=4.4, height=4.2)
    labels = {"plain": "plain", "resnet": "ResNet"}
    values = [v for k in data["snr"].values() for r in k.values() for v in r
              if np.isfinite(v) and v > 0]
    lo, hi = min(values) / 1.5, max(values) * 1.5
    for j, kind in enumerate(("plain", "resnet")):
        ax = axes[0, j]
        for i, e in enumerate(data["epochs"]):
            r = data["snr"][kind].get(str(e))
            if r is not None:
                ax.semilogy(np.arange(1, len(r) + 1), r, "o-", ms=3, color=f"C{i}",
                            label=f"epoch {e}")
        for i, b in enumerate(data["downsampling"]):
            ax.axvline(b, color="k", lw=0.6, ls="--",
                       label="downsampling block" if i == 0 else None)
        ax.axvspan(0.5, data["n"] + 0.5, color="grey", alpha=0.12, label="first stage")
        ax.axhline(1.0, color="grey", lw=0.8, ls=":", label="signal = noise (1)")
        ax.set_ylim(lo, hi)
        ax.yaxis.set_major_formatter(FuncFormatter(tick))
        ax.yaxis.set_minor_formatter(FuncFormatter(tick))
        ax.set_title(f"{labels[kind]}-{data['layers']}: gradient SNR per block")
        ax.set_xlabel("block l (1 = next to the input)")
        ax.set_ylabel("SNR = ‖ḡ‖² / mean_b ‖g_b − ḡ‖² (log)")
        ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    ax = axes[0, 2]
    colours = {"plain": "k", "resnet": "C4"}
    styles = [("o", 2.2, 1.0), ("s", 1.0, 0.55), ("^", 1.0, 0.3)]  # stage 1 bold: the claims
    for kind, ls in (("plain", "--"), ("resnet", "-")):
        s = data["stage_log10_snr"][kind]
        es = [e for e in data["epochs"] if str(e) in s]
        for stage in range(len(s[str(es[0])]) if es else 0):
            marker, lw, alpha = styles[min(stage, 2)]
            ax.plot(es, [s[str(e)][stage] for e in es], marker + ls, color=colours[kind],
                    lw=lw, ms=5 if stage == 0 else 3, alpha=alpha,
                    label=f"{labels[kind]}, stage {stage + 1}")
    ax.axhline(0.0, color="grey", lw=0.8, ls=":", label="signal = noise")
    ax.set_title("Mean log10 SNR per stage (bold: stage 1)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean over the stage's blocks of log10 SNR")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    fig.suptitle(f"Minibatch gradient signal-to-noise ratio ({data['batches']} minibatches of "
                 f"{data['batch_size']}, training-mode batch norm): plain vs ResNet",
                 fontsize=10)
    return [save(fig, out_dir, "gradient_snr.png")]


def answer(data: dict, claims: list[dict]) -> str:
    """The measured answer in one sentence: the first stage's gradient SNR, plain vs ResNet, at
    initialisation, during training and at the end; yes or no from the judged claims (the gap
    must exceed one standard error over replicates), or from the means where none is judged."""
    stages, eps = data.get("stage_log10_snr", {}), data.get("epochs", [])
    if not eps or set(stages) != set(KINDS):
        return answers.sentence("Not measured: the trials of this run failed"
                                + answers.caveat(claims))

    def snr(kind: str, epochs) -> float:
        logs = [stages[kind][str(e)][0] for e in epochs if str(e) in stages.get(kind, {})]
        return float(10 ** np.mean(logs)) if logs else float("nan")

    moments = [("at initialisation", [eps[0]]), ("during training", eps[1:-1]),
               (f"after {eps[-1]} epochs", [eps[-1]])]
    pairs = [(when, snr("plain", e), snr("resnet", e)) for when, e in moments if e]
    judged = [c["agrees"] for c in claims if c.get("agrees") is not None]
    noisier = judged or [p < r for _, p, r in pairs]
    verdict = "Yes" if all(noisier) else "No" if not any(noisier) else "Only in part"
    parts = [f"{p:.3g} vs {r:.3g} {when}" for when, p, r in pairs]
    listed = ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]
    return answers.sentence(
        f"{verdict}: the gradient signal-to-noise ratio of the first-stage blocks (below 1: "
        f"noise dominates), plain-{data.get('layers', '?')} vs "
        f"ResNet-{data.get('layers', '?')}, is {listed}"
        + answers.caveat(claims))
