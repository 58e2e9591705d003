"""Keep glibc's allocator from returning (and page-faulting back) memory on every array.

Training allocates and frees arrays of the same few sizes over and over. With glibc's default
settings, blocks above a dynamic threshold are fresh ``mmap`` s and the top of the heap is
trimmed back to the OS after frees, so the next array of that size page-faults all of its
memory in again; on virtual machines that can cost as much as the arithmetic. :func:`tune`
raises the mmap threshold to glibc's maximum (32 MiB) and stops heap trimming: freed memory
stays in the process for reuse.

It is applied once, when the NumPy backend is first created, on glibc systems only; set the
environment variable ``MINIRESNET_TUNE_MALLOC=0`` to leave the allocator alone. The cost is that
the process keeps its peak heap size instead of shrinking after large temporaries are freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

__all__ = ["tune"]

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's upper limit on 64-bit systems
_state: dict[str, bool] = {}


def tune() -> bool:
    """Apply the settings above (once per process); return whether they are in effect."""
    if "done" in _state:
        return _state["done"]
    ok = False
    if os.environ.get("MINIRESNET_TUNE_MALLOC", "1") != "0" and platform.libc_ver()[0] == "glibc":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(
                libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)) and bool(
                libc.mallopt(_M_TOP_PAD, 64 * 1024 * 1024))
        except (OSError, AttributeError):
            ok = False
    _state["done"] = ok
    return ok
