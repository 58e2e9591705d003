"""Content keys of the demo's caches: canonical JSON, SHA-256 and the code version (shared by
the trial cache of :mod:`miniresnet.experiments.runner` and the trained-net store of
:mod:`miniresnet.experiments.training`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any


def canonical(obj: Any) -> str:
    """The canonical JSON of ``obj``: sorted keys, no spaces, NaN refused."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)


def sha256(text: str) -> str:
    """The SHA-256 hex digest of ``text`` (UTF-8)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def code_version(module: ModuleType) -> str:
    """The package version and a digest of ``module``'s source file (empty if unreadable)."""
    from miniresnet import __version__

    try:
        source = Path(module.__file__).read_bytes()
    except (OSError, TypeError, AttributeError):
        source = b""
    return f"{__version__}+{hashlib.sha256(source).hexdigest()[:16]}"
