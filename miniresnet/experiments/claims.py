"""Claims: a measured number beside a paper's, with a machine-readable rule deciding agreement.

A claim is a JSON-ready dict (see :func:`claim`); :func:`judge` fills in ``agrees`` from its
rule, so REPORT.md's verdicts can never contradict the numbers.
"""

from __future__ import annotations

import math
from typing import Any

SCALES = ("quick", "default", "full")
OPS = ("rel_err_le", "abs_err_le", "lt", "gt", "between")
PAPER_STATUS = ("paper", "figure", "derived")


def claim(id: str, *, source: str, claim: str, measured: float, rule: dict,
          paper: float | None = None, paper_status: str = "paper", n: int = 1,
          spread: float = 0.0, holds_at: str = "quick") -> dict:
    """One claim, checked: ``rule`` is ``{"op": one of OPS, "value": number or [lo, hi]}``.

    ``rel_err_le`` and ``abs_err_le`` compare ``measured`` with ``paper``; ``lt``, ``gt`` and
    ``between`` compare ``measured`` with ``value``. ``holds_at`` is the smallest scale at which
    the rule is expected to hold; below it ``agrees`` is null. ``n`` is how many independent
    measurements (e.g. seeds) ``measured`` averages and ``spread`` their standard deviation.
    """
    if rule.get("op") not in OPS:
        raise ValueError(f"claim {id!r}: rule op {rule.get('op')!r}; valid: {', '.join(OPS)}")
    if rule["op"] in ("rel_err_le", "abs_err_le") and paper is None:
        raise ValueError(f"claim {id!r}: rule {rule['op']} needs the paper's number")
    if paper_status not in PAPER_STATUS:
        raise ValueError(f"claim {id!r}: paper_status {paper_status!r}; valid: "
                         f"{', '.join(PAPER_STATUS)}")
    if holds_at not in SCALES:
        raise ValueError(f"claim {id!r}: holds_at {holds_at!r}; valid: {', '.join(SCALES)}")
    return {"id": id, "source": source, "claim": claim,
            "paper": None if paper is None else float(paper), "paper_status": paper_status,
            "measured": float(measured), "n": int(n), "spread": float(spread),
            "rule": {"op": rule["op"], "value": rule["value"]}, "holds_at": holds_at,
            "agrees": None}


def satisfies(c: dict) -> bool:
    """Whether the measured value satisfies the claim's rule (NaN never does)."""
    op, value, m, p = c["rule"]["op"], c["rule"]["value"], c["measured"], c["paper"]
    if not math.isfinite(m):
        return False
    if op == "rel_err_le":
        return abs(m - p) <= value * abs(p)
    if op == "abs_err_le":
        return abs(m - p) <= value
    if op == "lt":
        return m < value
    if op == "gt":
        return m > value
    lo, hi = value
    return lo <= m <= hi


def judge(c: dict, scale: str) -> dict:
    """``c`` with ``agrees`` computed: null below the scale the claim ``holds_at``."""
    below = SCALES.index(scale) < SCALES.index(c["holds_at"])
    return {**c, "agrees": None if below else satisfies(c)}


def describe_rule(c: dict) -> str:
    """The rule in words, e.g. "within 3% of the paper" or "below 0.2"."""
    op, value = c["rule"]["op"], c["rule"]["value"]
    return {"rel_err_le": lambda: f"within {value:.3g} (relative) of the paper's value",
            "abs_err_le": lambda: f"within {value:.3g} of the paper's value",
            "lt": lambda: f"below {value:.3g}",
            "gt": lambda: f"above {value:.3g}",
            "between": lambda: f"between {value[0]:.3g} and {value[1]:.3g}"}[op]()


def mean_and_spread(values: Any) -> tuple[float, float, int]:
    """(mean, sample standard deviation (0 for one value), count) of finite ``values``."""
    xs = [float(v) for v in values if math.isfinite(float(v))]
    if not xs:
        return math.nan, math.nan, 0
    mean = sum(xs) / len(xs)
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) if len(xs) > 1 else 0.0
    return mean, math.sqrt(var), len(xs)
