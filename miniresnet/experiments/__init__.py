"""The demo's experiments: one module per question, each a sweep of independent trials.

Every experiment module defines

``NAME``
    its name (the module's), ``TITLE`` the question it answers (one line) and ``ESTIMATE``,
    ``{"quick": s, "default": s, "full": s}`` its rough wall time in seconds on 2 cores.
``trials(scale, seed) -> list[dict]``
    the trials' configs (JSON-ready dicts; a trial's own seed is derived from its config and
    ``seed`` by the runner, never from ``hash()``).
``run_trial(config, seed) -> dict``
    one trial: a pure function of its config and seed, returning JSON-ready data (lists and
    numbers; NumPy arrays are converted by the runner). It builds its models in float64 unless
    the config says otherwise and never prints.
``summarise(results, scale) -> {"claims": [...], "data": {...}}``
    ``results`` is a list of ``(config, data)`` pairs of the trials that succeeded, in the order
    of ``trials``; claims are made with :func:`miniresnet.experiments.claims.claim`; ``data`` is
    what the figures and the report need (JSON-ready).
``plot(data, out_dir) -> list[str]``
    draws the figures (matplotlib, Agg) from ``data`` alone into ``out_dir`` and returns their
    file names; it never measures anything.
``answer(data, claims) -> str``
    the answer to ``TITLE`` in one sentence (one line, ending in a period, at most about 45
    words, no tables), formatted from ``data`` as results.json stores it and the judged claims
    alone: it names the setup briefly and states 1-3 key numbers; every direction word (yes or
    no, larger or smaller, grows or shrinks) is computed from the numbers, so the sentence
    cannot contradict them at any scale or seed, and a claim judged not to agree is named in
    it (:mod:`miniresnet.experiments.answers` helps). It never raises on data from any scale,
    with failed trials missing. The demo stores it as the record's ``answer``; REPORT.md and
    the README print it under the question.
``SETUP``
    a short paragraph (static prose, no measured numbers) saying which setup each claim is
    pinned to; REPORT.md prints it above the claims, whose sentences are generated from the
    numbers.
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXPERIMENTS = ("degradation", "lesions", "paths_trained", "orderings", "highway_vs_residual",
               "norm_preservation", "no_batch_norm", "gradient_snr", "loss_landscape",
               "vanishing_exploding",
               "shattered_gradients", "paths_at_init", "shortcut_scaling", "jacobian_spectra",
               "init_schemes")


def load(name: str) -> ModuleType:
    """The experiment module ``name`` (one of :data:`EXPERIMENTS`)."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; valid: {', '.join(EXPERIMENTS)}")
    return importlib.import_module(f"miniresnet.experiments.{name}")
