"""no_batch_norm at small scale: the variants' configs (batch norm's nets are degradation's, the
others differ only in the model and clipping), a diverging run recorded as data with its steps,
the quick contract end to end, and the claims' rule directions."""

import json
import math
import warnings

import pytest
from experiment_checks import assert_well_formed, judged

from miniresnet.experiments import degradation, training
from miniresnet.experiments import no_batch_norm as exp

pytestmark = pytest.mark.backends("numpy")


@pytest.mark.parametrize("scale", ["quick", "default", "full"])
def test_trials_share_degradations_nets_and_vary_only_model_and_clipping(scale):
    configs = exp.trials(scale, 3)
    assert len({json.dumps(c, sort_keys=True) for c in configs}) == len(configs) == 11
    deepest = {c["kind"]: c for c in degradation.deepest_nets(scale, 3) if c["replicate"] == 0}
    by = {exp.run_name(c["variant"], c["clip_norm"]): c for c in configs}
    for name, kind in (("bn", "resnet"), ("plain_bn", "plain")):
        assert by[name]["train"] == deepest[kind]["train"]  # the same stored net
        assert by[name]["train_seed"] == deepest[kind]["train_seed"]
    for name, c in by.items():
        variant = name.split("+")[0]
        base = deepest["resnet" if exp.VARIANTS[variant][1] else "plain"]["train"]
        assert {k: v for k, v in c["train"].items() if k not in ("model", "clip_norm")} == {
            k: v for k, v in base.items() if k not in ("model", "clip_norm")}
        assert c["train"]["model"] == {**base["model"], **exp.VARIANTS[variant][2]}
        assert c["train"]["clip_norm"] == (exp.CLIP if name.endswith("+clip") else None)
        assert c["train"]["model"].get("norm", True) == exp.VARIANTS[variant][3]
    with pytest.raises(ValueError, match="unknown scale"):
        exp.trials("huge", 0)


def test_a_diverging_run_is_data_with_its_steps(tmp_path):
    cfg = training.config(1, width=0.25, epochs=3, lr=1e4, schedule="constant", norm=False)
    trial = {"variant": "he", "clip_norm": None, "n": 1, "train_seed": 0, "train": cfg}
    with training.store_at(tmp_path):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the overflow on the way is expected, not shown
            d = exp.run_trial(trial, 0)
    assert d["diverged"] is not None
    epoch, step = d["diverged"]["epoch"], d["diverged"]["step"]
    assert len(d["test_acc"]) == epoch  # only the finished epochs
    steps_per_epoch = math.ceil(1437 / cfg["batch_size"])
    assert len(d["step_grad_norm"]) == len(d["step_loss"]) == epoch * steps_per_epoch + step + 1
    assert None in (d["step_grad_norm"][-1], d["step_loss"][-1])  # the failing step
    assert all(v is not None and v > 0 for v in d["step_grad_norm"][:-1])
    assert exp.final_test_acc(d, 0.1) == 0.1
    assert json.loads(json.dumps(d, allow_nan=False)) == d


def test_quick_contract_end_to_end(tmp_path):
    with training.store_at(tmp_path / "store"):
        results = [(c, exp.run_trial(c, 0)) for c in exp.trials("quick", 0)]
    for _, d in results:
        assert d["diverged"] is None or d["step_grad_norm"][-1] is None
        assert len(d["step_grad_norm"]) == len(d["step_loss"]) > 0
    out = json.loads(json.dumps(exp.summarise(results, "quick"), allow_nan=False))
    assert_well_formed(out)
    verdicts = judged(out, "quick")
    assert set(verdicts) == {"no_bn_he_resnet_does_not_train", "no_bn_he_first_gradient_vs_bn",
                             "no_bn_fixup_matches_bn", "no_bn_skipinit_matches_bn",
                             "no_bn_clipping_rescues_he"}
    assert all(v["agrees"] is None for v in verdicts.values())  # all pinned to default
    data = out["data"]
    assert set(data["runs"]) == {exp.run_name(c["variant"], c["clip_norm"]) for c, _ in results}
    assert data["chance"] == pytest.approx(0.1)
    names = exp.plot(data, tmp_path)
    assert names == ["no_batch_norm.png"] and (tmp_path / names[0]).stat().st_size > 0


def _fake(acc, first, diverged=()):
    results = []
    for name, a in acc.items():
        variant, _, clip = name.partition("+")
        cfg = training.config(7, width=0.5, epochs=2)
        c = {"variant": variant, "clip_norm": exp.CLIP if clip else None, "n": 7,
             "train_seed": 0, "train": cfg}
        bad = name in diverged
        results.append((c, {"train_loss": [] if bad else [1.0, 0.5],
                            "train_acc": [] if bad else [0.5, a],
                            "test_loss": [] if bad else [1.0, 0.5],
                            "test_acc": [] if bad else [0.5, a],
                            "step_loss": [2.0, None if bad else 1.0],
                            "step_grad_norm": [first.get(name, 1.0), None if bad else 1.0],
                            "diverged": {"epoch": 0, "step": 1} if bad else None}))
    return results


ALL = ("bn", "bn_zero_init", "plain_bn", "he", "he+clip", "fixup", "fixup+clip", "skipinit",
       "skipinit+clip", "plain", "plain+clip")


def test_claims_rule_directions():
    good = {**dict.fromkeys(ALL, 0.96), "bn": 0.97, "he": 0.9}
    ok = judged(exp.summarise(_fake(good, {"he": 300.0, "bn": 20.0}, diverged=("he",)),
                              "default"), "default")
    assert all(v["agrees"] for v in ok.values()), ok
    assert ok["no_bn_he_resnet_does_not_train"]["measured"] == pytest.approx(0.1)  # chance
    assert ok["no_bn_he_first_gradient_vs_bn"]["measured"] == pytest.approx(15.0)
    assert ok["no_bn_fixup_matches_bn"]["measured"] == pytest.approx(1.0)  # points
    assert ok["no_bn_clipping_rescues_he"]["measured"] == pytest.approx(0.96 - 0.1)
    bad = {**dict.fromkeys(ALL, 0.5), "bn": 0.97, "he": 0.9, "he+clip": 0.8}
    no = judged(exp.summarise(_fake(bad, {"he": 10.0, "bn": 20.0}), "default"), "default")
    assert not any(v["agrees"] for v in no.values()), no


def test_answer_follows_the_numbers():
    good = {**dict.fromkeys(ALL, 0.96), "bn": 0.97, "he": 0.9}
    out = exp.summarise(_fake(good, {}, diverged=("he", "skipinit")), "default")
    text = exp.answer(out["data"], out["claims"])
    assert text.startswith("No:") and text.endswith(".") and "\n" not in text
    assert "ResNet-44 diverged in epoch 1" in text and "batch norm 0.97." in text
    out = exp.summarise(_fake(good, {}), "default")
    text = exp.answer(out["data"], out["claims"])
    assert text.startswith("Yes:") and "ResNet-44 0.900" in text
    out = exp.summarise(_fake({**good, "he": 0.15}, {}), "default")
    assert "stayed at chance (0.150)" in exp.answer(out["data"], out["claims"])
