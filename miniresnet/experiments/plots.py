"""Shared figure helpers (matplotlib, Agg): experiments draw from their data alone."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a window, never a display needed
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "legend.fontsize": 8,
         "axes.titlesize": 10, "axes.labelsize": 9, "xtick.labelsize": 8, "ytick.labelsize": 8}


def figure(ncols: int = 1, nrows: int = 1, width: float = 4.2, height: float = 3.4):
    """A new figure with ``nrows × ncols`` axes (always a 2-d array of axes)."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows),
                                 squeeze=False)
    return fig, axes


def save(fig, out_dir: str | Path, name: str) -> str:
    """Write ``fig`` as ``out_dir/name`` (a .png), close it and return ``name``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out / name)
    plt.close(fig)
    return name
