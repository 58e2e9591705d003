"""Helpers for the experiments' ``answer(data, claims)``: the one-sentence answer to a question,
formatted from the measured numbers (never typed in), with every claim that does not reproduce
named in it."""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

from miniresnet.experiments.claims import describe_rule


def finite(*xs: Any) -> bool:
    """Whether every ``x`` is a real, finite number (not None, NaN or a bool)."""
    return all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
               for x in xs)


def num(x: Any, digits: int = 3) -> str:
    """``x`` to ``digits`` significant digits, exponents without padding (``1.01e9``)."""
    if not finite(x):
        return "n/a" if x is None else str(x)
    text = f"{x:.{digits}g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}e{int(exponent)}"
    return text


def pct(fraction: Any) -> str:
    """A fraction as a percentage, ``0.953 -> "95.3%"``."""
    return f"{num(100 * fraction)}%" if finite(fraction) else num(fraction)


def signed(x: Any) -> str:
    """``x`` with its sign, ``+1.39`` or ``−0.42``."""
    if not finite(x):
        return num(x)
    return f"+{num(x)}" if x >= 0 else f"−{num(-x)}"


def mean(values: Any) -> float:
    """The mean of the finite numbers among ``values``, a list or one number (NaN when there
    are none: a summary of no trials stores NaN or an empty list)."""
    values = [values] if values is None or isinstance(values, int | float) else values
    xs = [float(v) for v in values if finite(v)]
    return sum(xs) / len(xs) if xs else math.nan


def measured(claims: list[dict], cid: str) -> float:
    """The measured value of claim ``cid`` (NaN when the claim is missing)."""
    c = next((c for c in claims if c.get("id") == cid), None)
    return c["measured"] if c is not None and finite(c.get("measured")) else math.nan


def caveat(claims: list[dict], skip: Collection[str] = ()) -> str:
    """``", but `id` (measured 20.9; rule: below 19.7) does not reproduce Veit et al. 2016"``
    (the paper's number in place of the rule where it has one) for the claims judged not to
    agree, or "" when none is: an answer never hides one. ``skip``: the ids whose failure the
    answer itself states, in words computed from the same number."""
    bad = [c for c in claims if c.get("agrees") is False and c.get("id") not in skip]
    if not bad:
        return ""
    sources = sorted({c.get("source") or "the paper" for c in bad})
    if len(bad) == 1:
        c = bad[0]
        against = (f"paper {num(c['paper'])}" if c.get("paper") is not None
                   else f"rule: {describe_rule(c)}")
        return (f", but `{c['id']}` (measured {num(c.get('measured'))}; {against}) does not "
                f"reproduce {sources[0]}")
    ids = ", ".join(f"`{c['id']}`" for c in bad)
    return f", but {ids} do not reproduce {' and '.join(sources)}"


def sentence(text: str) -> str:
    """One line, capitalised, ending in exactly one period."""
    text = " ".join(text.split()).rstrip(" .;,")
    return text[:1].upper() + text[1:] + "."
