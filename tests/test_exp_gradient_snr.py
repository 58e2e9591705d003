"""gradient_snr at small scale: the trials are degradation's deepest nets at its snapshot epochs;
the quick contract end to end (claims and plot from JSON data); run_trial is deterministic and
its SNR equals an independent recomputation; the claims' rule directions."""

import json

import numpy as np
import pytest
from experiment_checks import assert_well_formed, judged

import miniresnet as mr
from miniresnet import functional as F
from miniresnet.experiments import degradation, training
from miniresnet.experiments import gradient_snr as exp
from miniresnet.nn.module import functional_call

pytestmark = pytest.mark.backends("numpy")
IDS = {"gradient_snr_plain_below_resnet_init", "gradient_snr_plain_below_resnet_training",
       "gradient_snr_plain_below_resnet_trained"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One store for the module: the quick nets are trained once."""
    return tmp_path_factory.mktemp("store")


def test_trials_are_json_ready_distinct_and_use_degradations_deepest_nets():
    expected = {"quick": [0, 1, 2], "default": [0, 1, 3, 12], "full": [0, 1, 3, 20]}
    for scale in ("quick", "default", "full"):
        configs = exp.trials(scale, 0)
        assert configs == json.loads(json.dumps(configs))
        assert len({json.dumps(c, sort_keys=True) for c in configs}) == len(configs)
        shared = {json.dumps([c["kind"], c["train"], c["train_seed"]], sort_keys=True)
                  for c in degradation.deepest_nets(scale, 0) if c["replicate"] == 0}
        used = {r: {json.dumps([c["kind"], c["train"], c["train_seed"]], sort_keys=True)
                    for c in configs if c["replicate"] == r} for r in range(3)}
        assert used[0] == shared  # degradation's own nets
        replicates = exp._SCALES[scale]["replicates"]
        for r in range(1, replicates):
            assert {c["train_seed"] for c in configs if c["replicate"] == r} == {
                training.net_seed(0, r)}
            assert {json.dumps([c["kind"], c["train"]], sort_keys=True) for c in configs
                    if c["replicate"] == r} == {json.dumps([c["kind"], c["train"]],
                                                           sort_keys=True)
                                                for c in configs if c["replicate"] == 0}
        assert len(configs) == replicates * 2 * len(expected[scale])
        for c in configs:
            assert (c["kind"] == "resnet") == c["train"]["model"]["residual"]
        assert sorted({c["epoch"] for c in configs}) == expected[scale]
        assert max(c["epoch"] for c in configs) == configs[0]["train"]["epochs"]
    with pytest.raises(ValueError, match="gradient_snr: unknown scale 'huge'"):
        exp.trials("huge", 0)


def test_quick_contract_end_to_end_from_json(tmp_path, store):
    with training.store_at(store):
        results = [(c, exp.run_trial(c, 0)) for c in exp.trials("quick", 0)]
    for c, d in results:
        assert d == json.loads(json.dumps(d))
        assert len(d["blocks"]) == 3 * c["n"] and d["batches"] == c["batches"]
        assert all(np.isfinite(v) and v > 0 for v in (*d["blocks"], d["stem"], d["head"]))
    out = json.loads(json.dumps(exp.summarise(results, "quick")))
    assert_well_formed(out)
    verdicts = judged(out, "quick")
    assert set(verdicts) == IDS
    for pinned in ("training", "trained"):  # pinned to the default scale
        assert verdicts[f"gradient_snr_plain_below_resnet_{pinned}"]["agrees"] is None
    assert verdicts["gradient_snr_plain_below_resnet_init"]["agrees"] is not None
    data = out["data"]
    assert data["epochs"] == [0, 1, 2] and data["downsampling"] == [3, 5]
    n = data["n"]
    for c, d in results:
        got = data["stage_log10_snr"][c["kind"]][str(c["epoch"])]
        assert got == pytest.approx([np.mean(np.log10(d["blocks"][s * n:(s + 1) * n]))
                                     for s in range(3)], rel=1e-12)
    names = exp.plot(data, tmp_path)
    assert names == ["gradient_snr.png"] and (tmp_path / names[0]).stat().st_size > 0


def test_run_trial_is_deterministic_and_matches_a_recomputation(store):
    config = next(c for c in exp.trials("quick", 0)
                  if c["kind"] == "resnet" and c["epoch"] == 1)
    with training.store_at(store):
        a, b = exp.run_trial(config, 0), exp.run_trial(config, 7)  # seed unused
        model = training.snapshot(config["train"], config["train_seed"], 1).to("float64")
    assert a == b
    model.train()
    ds = training.load_data("digits", "float64")
    count, size = config["batches"], config["batch_size"]
    order = np.random.default_rng(config["train_seed"]).permutation(ds.n_train)
    names = [n for n, _ in model.named_parameters() if n.startswith("blocks.0.")]
    params = dict(model.named_parameters())
    gs = []
    for idx in order[: count * size].reshape(count, size):
        x, y = ds.x_train[idx], ds.y_train[idx]

        def loss(*arrays, x=x, y=y):
            return F.cross_entropy(functional_call(model, dict(zip(names, arrays)), x), y)

        grads = mr.grad(loss, argnums=tuple(range(len(names))))(
            *(params[n].raw for n in names))
        gs.append(np.concatenate([np.asarray(g).reshape(-1) for g in grads]))
    g = np.stack(gs)
    mean = g.mean(0)
    expected = mean @ mean / np.mean(np.sum((g - mean) ** 2, axis=1))
    assert a["blocks"][0] == pytest.approx(expected, rel=1e-9)


def _fake(first_stage, rest=1.0, replicate=0):
    """Results of one replicate, n = 2: ``first_stage[(kind, epoch)]`` is the SNR of blocks
    1 and 2; the other blocks have SNR ``rest``."""
    return [({"kind": k, "n": 2, "replicate": replicate, "epoch": e, "batch_size": 4},
             {"blocks": [s, s, rest, rest, rest, rest], "stem": 1.0, "head": 1.0,
              "total": 1.0, "batches": 3})
            for (k, e), s in first_stage.items()]


def test_claims_rule_directions():
    good = exp.summarise(_fake({("plain", 0): 0.01, ("resnet", 0): 0.1,
                                ("plain", 1): 0.1, ("resnet", 1): 1.0,
                                ("plain", 3): 0.1, ("resnet", 3): 100.0,
                                ("plain", 5): 0.1, ("resnet", 5): 10.0}), "default")
    j = judged(good, "default")
    assert all(j[i]["agrees"] for i in IDS)
    assert j["gradient_snr_plain_below_resnet_init"]["measured"] == pytest.approx(-1.0)
    assert j["gradient_snr_plain_below_resnet_training"]["measured"] == pytest.approx(-2.0)
    assert j["gradient_snr_plain_below_resnet_trained"]["measured"] == pytest.approx(-2.0)
    bad = exp.summarise(_fake({("plain", 0): 0.1, ("resnet", 0): 0.1,  # equal: not below
                               ("plain", 1): 1.0, ("resnet", 1): 0.1,
                               ("plain", 3): 0.1, ("resnet", 3): 0.1,
                               ("plain", 5): 1.0, ("resnet", 5): 0.5}), "default")
    j = judged(bad, "default")
    assert not any(j[i]["agrees"] for i in IDS)
    assert j["gradient_snr_plain_below_resnet_training"]["measured"] == pytest.approx(0.5)


def test_claims_need_the_gap_beyond_one_standard_error():
    """Two replicates whose gaps are -1 and +0.5 (log10): the mean is below 0, but not by one
    standard error, so no claim agrees."""
    snr = {"plain": 0.01, "resnet": 0.1}
    a = _fake({(k, e): v for k, v in snr.items() for e in (0, 1, 5)})
    b = _fake({(k, e): (0.1 if k == "plain" else 10 ** -1.5) for k in snr for e in (0, 1, 5)},
              replicate=1)
    j = judged(exp.summarise(a + b, "default"), "default")
    m = j["gradient_snr_plain_below_resnet_init"]
    assert m["n"] == 2 and m["measured"] == pytest.approx(-0.25 + 1.5 / np.sqrt(2) / np.sqrt(2))
    assert not any(j[i]["agrees"] for i in IDS)


ORDERED = ["gradient_snr_plain_below_resnet_init", "gradient_snr_plain_below_resnet_training",
           "gradient_snr_plain_below_resnet_trained"]


def test_answer_follows_the_numbers():
    def data(plain, resnet):
        return {"layers": 44, "epochs": [0, 1, 3, 12], "stage_log10_snr": {
            "plain": {str(e): [v, 0.0, 0.0] for e, v in zip((0, 1, 3, 12), plain)},
            "resnet": {str(e): [v, 0.0, 0.0] for e, v in zip((0, 1, 3, 12), resnet)}}}

    text = exp.answer(data([-2, -2, -2, -2], [-1, -1, -1, -1]), [])
    assert text.startswith("Yes:") and "0.01 vs 0.1 at initialisation" in text
    assert text.endswith("after 12 epochs.") and "\n" not in text
    assert exp.answer(data([-1, -1, -1, -1], [-2, -2, -2, -2]), []).startswith("No:")
    judged_claims = [{"id": i, "agrees": a, "measured": 0.5, "paper": None, "source": "B",
                      "rule": {"op": "lt", "value": 0.0}}
                     for i, a in zip(ORDERED, (True, False, False))]
    text = exp.answer(data([-2, -2, -2, -2], [-1, -1, -1, -1]), judged_claims)
    assert text.startswith("Only in part:") and text.endswith("do not reproduce B.")
    assert f"`{ORDERED[1]}`" in text and f"`{ORDERED[0]}`" not in text
    mixed = exp.answer(data([-2, -1, -1, -1], [-1, -2, -2, -2]), [])
    assert mixed.startswith("Only in part:") and "0.1 vs 0.01 during training" in mixed
