"""Test helper for the experiments: every claim they make is a valid claim, judged by its rule."""

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
