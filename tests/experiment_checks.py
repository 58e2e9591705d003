"""Test helper for the experiments: every claim they make is a valid claim, judged by its rule."""

import json

from miniresnet.experiments import claims

FIELDS = ("source", "claim", "measured", "rule", "paper", "paper_status", "n", "spread",
          "holds_at")


def judged(summary, scale):
    """``{claim id: claim judged at scale}`` for ``summary["claims"]``, each first re-made by
    :func:`miniresnet.experiments.claims.claim`, which refuses a malformed one."""
    by_id = {}
    for c in summary["claims"]:
        claims.claim(c["id"], **{k: c[k] for k in FIELDS})
        by_id[c["id"]] = claims.judge(c, scale)
    return by_id


def assert_well_formed(summary):
    """Each claim is exactly what :func:`~miniresnet.experiments.claims.claim` makes of its
    fields, and the claims and data survive a JSON round trip unchanged."""
    for c in summary["claims"]:
        fields = {k: v for k, v in c.items() if k not in ("id", "agrees")}
        assert claims.claim(c["id"], **fields) == {**c, "agrees": None}
        assert json.loads(json.dumps(c)) == c
    assert summary["data"] == json.loads(json.dumps(summary["data"]))
