"""Claims: rules decide agreement, and only from the scale a claim is meant to hold at."""

import json
import math

import pytest

from miniresnet.experiments import EXPERIMENTS, load
from miniresnet.experiments.claims import claim, describe_rule, judge, mean_and_spread, satisfies


def make(measured, op, value, paper=None, holds_at="quick"):
    return claim("c", source="S", claim="x", measured=measured, paper=paper,
                 rule={"op": op, "value": value}, holds_at=holds_at)


@pytest.mark.backends("numpy")
@pytest.mark.parametrize("measured, op, value, paper, expected", [
    (1.02, "rel_err_le", 0.03, 1.0, True), (1.04, "rel_err_le", 0.03, 1.0, False),
    (-0.98, "rel_err_le", 0.03, -1.0, True), (0.26, "abs_err_le", 0.02, 0.25, True),
    (0.28, "abs_err_le", 0.02, 0.25, False), (0.1, "lt", 0.2, None, True),
    (0.2, "lt", 0.2, None, False), (0.9, "gt", 0.7, None, True), (0.5, "gt", 0.7, None, False),
    (0.5, "between", [0.4, 0.7], None, True), (0.8, "between", [0.4, 0.7], None, False),
    (math.nan, "gt", 0.0, None, False), (math.inf, "gt", 0.0, None, False),
])
def test_rules(measured, op, value, paper, expected):
    c = make(measured, op, value, paper)
    assert satisfies(c) is expected
    assert judge(c, "quick")["agrees"] is expected
    if math.isfinite(measured):
        assert json.loads(json.dumps(c)) == c  # JSON-ready
    assert describe_rule(c)


@pytest.mark.backends("numpy")
def test_agreement_is_not_judged_below_the_scale_a_claim_holds_at():
    c = make(0.1, "lt", 0.2, holds_at="default")
    assert judge(c, "quick")["agrees"] is None
    assert judge(c, "default")["agrees"] is True and judge(c, "full")["agrees"] is True
    assert c["agrees"] is None  # judge returns a new dict


@pytest.mark.backends("numpy")
@pytest.mark.parametrize("kwargs, match", [
    ({"rule": {"op": "near", "value": 1}}, "rule op"),
    ({"rule": {"op": "rel_err_le", "value": 0.1}}, "needs the paper"),
    ({"rule": {"op": "lt", "value": 1}, "paper_status": "memory"}, "paper_status"),
    ({"rule": {"op": "lt", "value": 1}, "holds_at": "huge"}, "holds_at"),
])
def test_bad_claims_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        claim("c", source="S", claim="x", measured=1.0, **kwargs)


@pytest.mark.backends("numpy")
def test_mean_and_spread():
    assert mean_and_spread([1.0, 3.0]) == (2.0, math.sqrt(2.0), 2)
    assert mean_and_spread([5.0, math.nan]) == (5.0, 0.0, 1)
    m, s, n = mean_and_spread([])
    assert math.isnan(m) and n == 0


@pytest.mark.backends("numpy")
def test_load_names_the_valid_experiments():
    with pytest.raises(ValueError, match=", ".join(EXPERIMENTS)):
        load("nonsense")
