"""results.json -> REPORT.md and the terminal table (formatting only: every number shown is one
that results.json holds, so the prose can never contradict the measurements)."""

from __future__ import annotations

import json
import math
from typing import Any

from miniresnet.experiments.claims import describe_rule

STATUS = {"paper": "stated in the paper", "figure": "read from a figure",
          "derived": "derived from the paper's formula or setup"}


def number(x: Any) -> str:
    """A number for people: 4 significant digits; None as an em dash."""
    if x is None:
        return "—"
    if isinstance(x, bool) or not isinstance(x, int | float):
        return str(x)
    if not math.isfinite(x):
        return str(x)
    return f"{x:.4g}"


def spread(c: dict) -> str:
    """`` ± 0.012`` (two significant digits) when ``c`` averages several measurements."""
    if c.get("n", 1) <= 1 or c.get("spread") is None:
        return ""
    s = c["spread"]
    return f" ± {s:.2g}" if isinstance(s, int | float) and math.isfinite(s) else f" ± {s}"


def measured(c: dict) -> str:
    """``1.79 ± 0.012 (n = 3)``, or ``1.79 (n = 1)``."""
    spread_ = spread(c)
    return f"{number(c['measured'])}{spread_} (n = {c.get('n', 1)})"


def verdict(c: dict, scale: str) -> str:
    if c.get("agrees") is None:
        return f"not judged at the {scale} scale (holds from {c['holds_at']})"
    return "agrees" if c["agrees"] else "does not agree"


def sentence(c: dict, scale: str) -> str:
    """One sentence generated from the claim, e.g. "Measured 1.79 ± 0.01 (n = 3) against the
    paper's 1.788 (stated in the paper): within 0.03 (relative) of the paper's value, agrees."""
    against = (f" against the paper's {number(c['paper'])} "
               f"({STATUS.get(c['paper_status'], c['paper_status'])})"
               if c.get("paper") is not None else "")
    return (f"`{c['id']}`: measured {measured(c)}{against}; the rule is "
            f"{describe_rule(c)}: {verdict(c, scale)}.")


def _line(text: Any) -> str:
    """``text`` on one line (an answer is one sentence; a stray newline would end its
    paragraph)."""
    return " ".join(str(text).split())


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def claims_table(claims: list[dict], scale: str) -> list[str]:
    lines = ["| source | claim | paper | measured | rule | verdict |",
             "|---|---|---|---|---|---|"]
    for c in claims:
        paper = ("—" if c.get("paper") is None
                 else f"{number(c['paper'])} ({c['paper_status']})")
        lines.append("| " + " | ".join(_cell(x) for x in (
            c["source"], f"{c['claim']} (`{c['id']}`)", paper, measured(c), describe_rule(c),
            verdict(c, scale))) + " |")
    return lines


def render(results: dict) -> str:
    """REPORT.md's text from a results.json dict."""
    scale, prov = results["scale"], results.get("provenance", {})
    commit = prov.get("git_commit")
    lines = ["# miniresnet demo: what skip connections and batch norm do to gradients", "",
             f"Scale `{scale}`, seed {results['seed']}, miniresnet {prov.get('miniresnet', '?')}"
             + (f" (commit `{commit[:12]}`)" if commit else "")
             + f", backend `{prov.get('backend', '?')}`, numpy {prov.get('numpy', '?')}. "
             "Every number below is read from `results.json` beside this file; each verdict is "
             "computed from the claim's stated rule. A claim is judged only from the scale it "
             "is expected to hold at.", ""]
    for name, exp in results["experiments"].items():
        lines += [f"## {exp.get('title') or name}", ""]
        if exp.get("answer"):  # absent from results.json written before answers existed
            lines += [f"**Answer.** {_line(exp['answer'])}", ""]
        lines += [f"Experiment `{name}`, {number(exp.get('seconds'))} s.", ""]
        if exp.get("setup"):
            lines += [" ".join(exp["setup"].split()), ""]
        if exp.get("error"):
            err = exp["error"]
            lines += [f"**The experiment failed**: {err['type']}: {_cell(err['message'])}", ""]
        for fig in exp.get("figures", []):
            lines += [f"![{fig}]({fig})", ""]
        claims = exp.get("claims", [])
        if claims:
            lines += claims_table(claims, scale) + [""]
            lines += [" ".join(sentence(c, scale) for c in claims), ""]
        if exp.get("failed"):
            lines += [f"Failed trials ({len(exp['failed'])}):", ""]
            lines += [f"- `{json.dumps(f['config'], sort_keys=True)}` (seed {f['seed']}): "
                      f"{f['error']['type']}: {_cell(f['error']['message'])}"
                      for f in exp["failed"]]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def terminal_table(results: dict) -> str:
    """The short table printed at the end of a run: claim, paper, measured, verdict."""
    rows = [("claim", "paper", "measured", "agrees")]
    for exp in results["experiments"].values():
        for c in exp.get("claims", []):
            agrees = {True: "yes", False: "NO", None: "not judged"}[c.get("agrees")]
            rows.append((c["id"], number(c.get("paper")), number(c["measured"]) + spread(c),
                         agrees))
    widths = [max(len(r[k]) for r in rows) for k in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip()
                     for r in rows)


def readme_section(results: dict, figures: str = "figures") -> str:
    """The README's "What the demo finds" block for ``results`` (the committed default run):
    per question its measured answer, one figure and the claims as paper vs measured,
    formatting only."""
    lines = [f"Default scale, seed {results['seed']}: `python -m miniresnet.demo --out "
             f"{figures}/` writes these figures, [`{figures}/REPORT.md`]({figures}/REPORT.md) "
             f"and `{figures}/results.json`.", ""]
    for name, exp in results["experiments"].items():
        lines += [f"**{exp.get('title', name)}** (`{name}`)", ""]
        if exp.get("answer"):
            lines += [f"**Answer.** {_line(exp['answer'])}", ""]
        if exp.get("figures"):
            lines += [f"![{name}]({figures}/{exp['figures'][0]})", ""]
        lines += ["| claim | source | paper | measured | verdict |", "|---|---|---|---|---|"]
        for c in exp.get("claims", []):
            lines.append(f"| `{c['id']}` | {_cell(c['source'])} | {number(c['paper'])} | "
                         f"{_cell(measured(c))} | {verdict(c, results['scale'])} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
