"""Veit et al. 2016 (Fig. 3, 5): delete blocks of a trained network at test time. A residual
network degrades smoothly (each path is short and many remain), a plain one collapses."""

from __future__ import annotations

import numpy as np

from miniresnet import inspect
from miniresnet.experiments import degradation, training
from miniresnet.experiments.answers import caveat, finite, num, pct, sentence
from miniresnet.experiments.claims import claim, mean_and_spread
from miniresnet.experiments.plots import figure, save

NAME = "lesions"
TITLE = "Does deleting a block of a trained network break it, residual vs plain?"
ESTIMATE = {"quick": 1.0, "default": 10.0, "full": 60.0}
SOURCE = "Veit et al. 2016"
SETUP = (
    "The deepest residual net of the degradation experiment and its plain counterpart (the "
    "shared trained networks: nn.resnet_cifar with n blocks per stage, 3n blocks, width 0.5, "
    "12 epochs on the bundled digits at the default scale), evaluated in evaluation mode on the "
    "test split. inspect.lesioned deletes a block at test time: a residual block then computes "
    "only P(lambda*S(u)) (its branch removed; batch norms keep their running statistics), a plain "
    "block that keeps the shape becomes the identity. The first blocks of stages 2 and 3 "
    "downsample: they are marked, and in the plain net they cannot be deleted (no identity "
    "exists), so they are skipped there. k = 1..5 random blocks are deleted together in several "
    "seeded draws (plain: from the deletable blocks). The claims are the mean drop of test "
    "accuracy, in percentage points, over single deletions of the non-downsampling blocks; the "
    "rules are ours, read off Veit et al.'s Fig. 3 (ResNet-110: small drops except at "
    "downsampling; VGG-15: chance after any deletion): residual below 10 points; plain above 15 "
    "points, because the deep plain net trains badly (degradation), so a fall to chance costs "
    "it only its accuracy above chance (about 24 points at the default scale). Both are pinned "
    "to the default scale."
)

_SCALES = {  # the degradation scale whose deepest net is lesioned; random draws per k
    "quick": {"net_scale": "quick", "draws": 3, "ks": (1, 2)},
    "default": {"net_scale": "default", "draws": 10, "ks": (1, 2, 3, 4, 5)},
    "full": {"net_scale": "full", "draws": 20, "ks": (1, 2, 3, 4, 5)},
}
KINDS = ("resnet", "plain")
RESNET_MAX_DROP = 10.0  # points: a residual net loses little when one block goes
PLAIN_MIN_DROP = 15.0   # points: see SETUP (the deep plain net itself is near chance)


def trials(scale: str, seed: int, data: str = "digits") -> list[dict]:
    """One trial per (replicate, plain or residual) on the deepest net of degradation's
    ``scale``; the training config and seed are degradation's, so the nets are shared."""
    if scale not in _SCALES:
        raise ValueError(f"lesions: unknown scale {scale!r}; valid: {', '.join(_SCALES)}")
    s = _SCALES[scale]
    nets = degradation.deepest_nets(s["net_scale"], seed, data)
    return [{**c, "draws": s["draws"], "ks": list(s["ks"])}
            for c in sorted(nets, key=lambda c: (c["replicate"], KINDS.index(c["kind"])))]


def downsampling(model) -> list[bool]:
    """Per block (in order): whether it changes the shape (stride or width)."""
    return [b.stride != 1 or b.in_features != b.out_features for b in model.blocks]


def run_trial(config: dict, seed: int) -> dict:
    """Test accuracy intact, with each single block deleted (None where it cannot be), and with
    k random deletable blocks deleted (``draws`` draws per k, from ``seed``)."""
    net = training.trained(config["train"], config["train_seed"])
    model = net.model
    ds = training.load_data(config["train"]["data"], config["train"]["dtype"])
    split = (ds.x_test, ds.y_test)
    down = downsampling(model)
    residual = config["kind"] == "resnet"
    deletable = [i for i, d in enumerate(down, 1) if residual or not d]
    intact = inspect.accuracy(model, split)
    single = []
    for i in range(1, len(down) + 1):
        if i in deletable:
            with inspect.lesioned(model, i):
                single.append(inspect.accuracy(model, split))
        else:
            single.append(None)
    rng = np.random.default_rng(seed)
    random = {}
    for k in config["ks"]:
        accs = []
        for _ in range(config["draws"]):
            drop = sorted(int(i) for i in rng.choice(deletable, size=k, replace=False))
            with inspect.lesioned(model, drop):
                accs.append(inspect.accuracy(model, split))
        random[str(k)] = accs
    return {"blocks": len(down), "downsampling": down, "intact": intact, "single": single,
            "random": random, "test_size": int(ds.y_test.shape[0]),
            "classes": int(ds.num_classes)}


def mean_drop(data: dict) -> float:
    """Mean test-accuracy drop (percentage points) over single deletions of the blocks that
    do not downsample."""
    drops = [100.0 * (data["intact"] - a) for a, d in zip(data["single"], data["downsampling"])
             if not d and a is not None]
    return float(np.mean(drops))


def summarise(results: list, scale: str) -> dict:
    """Claims on the mean single-deletion drop, residual and plain; data: per-block accuracy
    and accuracy against the number of deleted blocks (mean and sd over draws, replicates)."""
    by_kind = {k: [d for c, d in results if c["kind"] == k] for k in KINDS}
    drops = {k: mean_and_spread(mean_drop(d) for d in ds) for k, ds in by_kind.items()}
    first = next(d for ds in by_kind.values() for d in ds)
    n_blocks = first["blocks"]
    chance = 1.0 / first["classes"]
    claims = [
        claim("lesion_resnet_mean_drop", source=SOURCE, paper_status="figure",
              claim=f"deleting one non-downsampling block of a trained {n_blocks}-block ResNet "
                    f"costs little: mean test-accuracy drop in points (Veit et al. Fig. 3: "
                    f"ResNet-110 barely changes; rule ours, below {RESNET_MAX_DROP:g})",
              measured=drops["resnet"][0], spread=drops["resnet"][1], n=drops["resnet"][2],
              rule={"op": "lt", "value": RESNET_MAX_DROP}, holds_at="default"),
        claim("lesion_plain_mean_drop", source=SOURCE, paper_status="figure",
              claim=f"deleting one shape-preserving block of the trained plain net of the same "
                    f"depth breaks it: mean test-accuracy drop in points (Veit et al. Fig. 3: "
                    f"VGG-15 falls to chance; rule ours, above {PLAIN_MIN_DROP:g})",
              measured=drops["plain"][0], spread=drops["plain"][1], n=drops["plain"][2],
              rule={"op": "gt", "value": PLAIN_MIN_DROP}, holds_at="default"),
    ]
    nets = {}
    for kind, ds in by_kind.items():
        if not ds:
            continue
        single = [[d["single"][i] for d in ds] for i in range(n_blocks)]
        ks = sorted(ds[0]["random"], key=int)
        pooled = {k: [a for d in ds for a in d["random"][k]] for k in ks}
        nets[kind] = {
            "intact": float(np.mean([d["intact"] for d in ds])),
            "single": [None if None in s else float(np.mean(s)) for s in single],
            "k": [0] + [int(k) for k in ks],
            "random_mean": [float(np.mean([d["intact"] for d in ds]))]
                           + [float(np.mean(pooled[k])) for k in ks],
            "random_sd": [0.0] + [mean_and_spread(pooled[k])[1] for k in ks],
            "draws": len(pooled[ks[0]]) if ks else 0, "mean_drop": drops[kind][0]}
    data = {"blocks": n_blocks, "n": n_blocks // 3, "downsampling": first["downsampling"],
            "chance": chance, "test_size": first["test_size"], "nets": nets,
            "replicates": max(len(ds) for ds in by_kind.values())}
    return {"claims": claims, "data": data}


def answer(data: dict, claims: list[dict]) -> str:
    """What one deletion does to each net, by its mean drop: above ``PLAIN_MIN_DROP`` points
    it breaks the net, below ``RESNET_MAX_DROP`` it barely hurts it, in between it hurts it."""
    nets = data.get("nets", {})

    def effect(drop: float) -> str:
        return ("breaks" if drop > PLAIN_MIN_DROP else "barely hurts" if drop < RESNET_MAX_DROP
                else "hurts")

    drops = {k: nets.get(k, {}).get("mean_drop") for k in ("plain", "resnet")}
    drops = {k: d for k, d in drops.items() if finite(d)}
    if not drops:
        return sentence("Not measured: no lesioned net was evaluated" + caveat(claims))
    names = {"plain": "the plain net", "resnet": "the ResNet"}
    said = {k: effect(d) for k, d in drops.items()}
    if len(said) == 2 and said["plain"] == said["resnet"]:
        lead = f"it {said['plain']} both nets"
    else:
        lead = "it " + " but ".join(f"{said[k]} {names[k]}" for k in said)
    layers = f"{6 * data['n'] + 2}-layer " if finite(data.get("n")) else ""
    costs = []
    for k in ("resnet", "plain"):
        if k not in drops:
            continue
        unit = "" if costs else " points of test accuracy on average"
        costs.append(f"{names[k]} {num(drops[k])}{unit}")
        intact = nets[k].get("intact")
        if k == "plain" and finite(intact, data.get("chance")):
            costs[-1] += (f" (from {pct(intact)} to {pct(intact - drops[k] / 100)}, chance "
                          f"{pct(data['chance'])})")
    return sentence(f"{lead}: deleting one non-downsampling block of the trained {layers}nets "
                    f"costs {', '.join(costs)}" + caveat(claims))


def plot(data: dict, out_dir) -> list[str]:
    """Accuracy per deleted block (bars) and against the number of deleted blocks."""
    fig, axes = figure(2, 1, width=5.2, height=3.8)
    ax = axes[0, 0]
    idx = np.arange(1, data["blocks"] + 1)
    styles = {"resnet": ("C0", "ResNet"), "plain": ("C3", "plain")}
    width = 0.4
    for j, (kind, (color, label)) in enumerate(styles.items()):
        net = data["nets"].get(kind)
        if net is None:
            continue
        acc = np.array([np.nan if a is None else a for a in net["single"]])
        ax.bar(idx + (j - 0.5) * width, acc, width, color=color,
               label=f"{label} (mean drop {net['mean_drop']:.1f} pts)")
        ax.axhline(net["intact"], color=color, ls="--", lw=1, label=f"{label} intact")
        for i in np.flatnonzero(np.isnan(acc)):
            ax.text(idx[i] + (j - 0.5) * width, 0.02, "×", ha="center", color=color,
                    fontsize=9)
    for i, d in zip(idx, data["downsampling"]):
        if d:
            ax.axvspan(i - 0.5, i + 0.5, color="grey", alpha=0.18, lw=0)
    ax.axhline(data["chance"], color="grey", ls=":", lw=1, label="chance")
    ax.set_xlabel("deleted block (grey: downsampling; ×: plain, cannot delete)")
    ax.set_ylabel("test accuracy (fraction)")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(idx[::max(1, len(idx) // 11)])
    ax.set_title(f"Delete one block of a trained {data['blocks']}-block net")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    ax = axes[0, 1]
    for kind, (color, label) in styles.items():
        net = data["nets"].get(kind)
        if net is None:
            continue
        k = np.asarray(net["k"])
        m, sd = np.asarray(net["random_mean"]), np.asarray(net["random_sd"])
        ax.errorbar(k, m, yerr=sd, fmt="o-", color=color, capsize=3,
                    label=f"{label} (mean ± sd, {net['draws']} draws)")
        ax.set_xticks(k)
    ax.axhline(data["chance"], color="grey", ls=":", lw=1, label="chance")
    ax.set_xlabel("number of blocks deleted at random")
    ax.set_ylabel("test accuracy (fraction)")
    ax.set_ylim(0, 1.02)
    ax.set_title("Delete k blocks: smooth for ResNet, collapse for plain?")
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    fig.suptitle("Lesion study (Veit et al. 2016): residual vs plain, test split", fontsize=10)
    return [save(fig, out_dir, "lesions.png")]
