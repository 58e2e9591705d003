"""Writing files atomically: a reader, or a process killed mid-write, never sees half a file.

:func:`write_atomic` is the one way this package replaces a file (checkpoints, trial caches,
benchmark and demo reports). It imports nothing from :mod:`miniresnet`, so any layer may use it.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
from pathlib import Path


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` (``str`` as UTF-8) to ``path`` so that it appears complete or not at all.

    The data goes to a temporary file in the same folder, named ``.<name>.<pid>.<hex>.tmp``
    after this process, is flushed to disk, and is renamed onto ``path`` (``os.replace``); the
    folder is then synced so that the rename survives a crash. A replaced file keeps its
    permissions; a new one gets the umask's. Temporary files left for ``path`` by processes that
    no longer exist (killed mid-write) are removed first; those of live processes are kept.

    Raises
    ------
    OSError
        If the file cannot be written; the message names the target and its folder, not the
        temporary file. On this or any other error (``KeyboardInterrupt`` included) the
        temporary file is removed and an existing ``path`` is left as it was.
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    _remove_stale_temporaries(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        try:  # keep the permissions of the file replaced; a new one gets the umask's
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            mode = None
        permissions = 0o666 if mode is None else 0o600
        with open(tmp, "xb", opener=lambda file, flags: os.open(file, flags, permissions)) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if not isinstance(e, OSError):
            raise
        reason = (f"cannot write {path.name!r} in the folder {str(path.parent)!r}: "
                  f"{e.strerror or e}")
        # OSError(errno, ...) is the errno's subclass (PermissionError, ...), like the original
        raise (OSError(reason) if e.errno is None else OSError(e.errno, reason)) from e
    _fsync_directory(path.parent)


def _remove_stale_temporaries(path: Path) -> None:
    """Delete the temporary files of writes to ``path`` whose process no longer exists."""
    if os.name != "posix":  # elsewhere os.kill(pid, 0) does not test, it terminates
        return
    pattern = re.compile(re.escape(f".{path.name}.") + r"(\d{1,10})\.[0-9a-f]+\.tmp")
    with contextlib.suppress(OSError):
        for name in os.listdir(path.parent):
            if (match := pattern.fullmatch(name)) is None:
                continue
            try:
                os.kill(int(match.group(1)), 0)
            except ProcessLookupError:
                with contextlib.suppress(OSError):
                    os.unlink(path.parent / name)
            except (OSError, OverflowError):  # alive but not ours, or not a process id
                pass


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX); a no-op where folders cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
