"""miniresnet.files.write_atomic: a file appears complete or not at all, and no temporary file
outlives a write (checkpoints, trial caches, benchmark and demo reports all go through it)."""

import errno
import os
import re
import subprocess

import pytest

from miniresnet.files import write_atomic


@pytest.fixture(autouse=True)
def once(backend):
    """Nothing here depends on the array backend: run once."""
    if backend.name != "numpy":
        pytest.skip("file writing does not depend on the backend")


def test_writes_bytes_and_text_and_replaces(tmp_path):
    target = tmp_path / "r.json"
    write_atomic(target, b"\x00old")
    assert target.read_bytes() == b"\x00old"
    write_atomic(str(target), "néw\n")
    assert target.read_bytes() == "néw\n".encode()
    assert os.listdir(tmp_path) == ["r.json"]


def test_the_target_is_replaced_by_one_rename_of_a_complete_file(tmp_path, monkeypatch):
    target = tmp_path / "r.txt"
    target.write_text("old")
    seen = []
    real_replace = os.replace

    def replace(src, dst):  # the moment of the switch: old file intact, new one complete
        seen.append((os.path.basename(src), target.read_text(), open(src).read()))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    write_atomic(target, "new" * 1000)
    ((name, before, staged),) = seen
    assert before == "old" and staged == "new" * 1000
    assert re.fullmatch(rf"\.r\.txt\.{os.getpid()}\.[0-9a-f]+\.tmp", name)  # beside the target
    assert target.read_text() == "new" * 1000 and os.listdir(tmp_path) == ["r.txt"]


@pytest.mark.parametrize("step", ["fsync", "replace"])
@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   KeyboardInterrupt()])
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, step, error):
    target = tmp_path / "r.txt"
    target.write_text("old")

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(os, step, fail)
    with pytest.raises(type(error)):
        write_atomic(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["r.txt"]


def test_a_failed_first_write_leaves_nothing(tmp_path, monkeypatch):
    def fail(fd):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_atomic(tmp_path / "r.txt", "new")
    assert os.listdir(tmp_path) == []


def test_errors_name_the_target_and_folder_not_the_temporary(tmp_path, monkeypatch):
    real_open = os.open

    def read_only(file, flags, *args, **kwargs):
        if os.path.basename(file).startswith(".r.txt."):
            raise PermissionError(errno.EACCES, "Permission denied", file)
        return real_open(file, flags, *args, **kwargs)

    def broken(*args):
        raise OSError("disk full")  # no errno

    for name, fake, error in (("open", read_only, PermissionError), ("replace", broken, OSError)):
        with monkeypatch.context() as m:
            m.setattr(os, name, fake)
            with pytest.raises(error) as info:
                write_atomic(tmp_path / "r.txt", "new")
        message = str(info.value)
        assert f"cannot write 'r.txt' in the folder {str(tmp_path)!r}" in message, message
        assert ".tmp" not in message and "Errno None" not in message, message
        assert os.listdir(tmp_path) == []


def test_permissions_of_a_replaced_file_are_kept(tmp_path):
    target = tmp_path / "r.txt"
    write_atomic(target, "a")
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask  # a new file: the umask's
    os.chmod(target, 0o640)
    write_atomic(target, "b")
    assert target.stat().st_mode & 0o777 == 0o640 and target.read_text() == "b"


@pytest.mark.skipif(os.name != "posix", reason="process ids are only tested on POSIX")
def test_temporaries_of_dead_processes_are_removed(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()  # a process id that no longer exists
    dead = f".r.txt.{gone.pid}.0a1b2c3d.tmp"
    alive = f".r.txt.{os.getpid()}.0a1b2c3d.tmp"  # perhaps a write in progress
    other = f".q.txt.{gone.pid}.0a1b2c3d.tmp"  # another target's
    for name in (dead, alive, other):
        (tmp_path / name).write_text("partial")
    write_atomic(tmp_path / "r.txt", "new")
    assert sorted(os.listdir(tmp_path)) == sorted(["r.txt", alive, other])
