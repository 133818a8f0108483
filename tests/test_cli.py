"""cli.py: atomic writes (the one writer of every output file here)."""

from __future__ import annotations

import errno
import os
import stat

import pytest

import cli
from cli import atomic_write


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write(str(path), lambda f: f.write(b"one"))
    assert path.read_bytes() == b"one"

    def fail(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(str(path), fail)
    assert path.read_bytes() == b"one" and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
@pytest.mark.parametrize("proc", [True, False], ids=["proc-status", "no-proc"])
def test_atomic_write_gives_the_mode_of_the_umask(umask, mode, proc, tmp_path, monkeypatch):
    """Not mkstemp's 0o600: a W cache shared by several users must be readable by them."""
    if not proc:  # the umask read without /proc/self/status (not Linux)

        def no_proc(name, *args, **kwargs):
            if name == "/proc/self/status":
                raise FileNotFoundError(2, "No such file or directory", name)
            return open(name, *args, **kwargs)

        monkeypatch.setattr(cli, "open", no_proc, raising=False)
    old = os.umask(umask)
    try:
        path = tmp_path / "W.pt"
        atomic_write(str(path), lambda f: f.write(b"new"))
        assert path.read_bytes() == b"new" and stat.S_IMODE(path.stat().st_mode) == mode
        assert os.umask(umask) == umask  # the umask itself is left as it was
    finally:
        os.umask(old)


def test_atomic_write_on_a_full_disk_keeps_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write(str(path), lambda f: f.write(b"one"))

    def full(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(ValueError, match=f"cannot write {path}: No space left on device") as e:
        atomic_write(str(path), full)
    assert f"B free on {tmp_path}" in str(e.value) and "; free some space" in str(e.value)
    assert path.read_bytes() == b"one" and os.listdir(tmp_path) == ["f.txt"]


def test_atomic_write_over_a_directory_is_a_clear_error(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(ValueError, match="cannot write .*out: Is a directory; name a file"):
        atomic_write(str(target), lambda f: f.write(b"x"))
    assert os.listdir(tmp_path) == ["out"] and os.listdir(target) == []


def test_free_space_names_the_nearest_existing_directory(tmp_path, monkeypatch):
    usage = type("usage", (), {"free": 0})
    monkeypatch.setattr(cli.shutil, "disk_usage", lambda path: usage)
    assert cli.free_space(str(tmp_path / "not" / "yet")) == f"0 B free on {tmp_path}"
    usage.free = 3_210_000_000
    assert cli.free_space(str(tmp_path)) == f"3.2 GB free on {tmp_path}"
