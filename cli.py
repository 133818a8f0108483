"""What every stage's command line shares: bad input is ONE line on stderr ("error: WHAT; WHAT TO
DO") and exit status 2, checked before any slow work or any write; outputs are written atomically.

Used by build_projection.py, topk_interop.py, audit.py, train.py, evaluate.py and mini.py.
Imports nothing of this repository: everything else may import it.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import pickle
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable

# What torch.load raises on a damaged file: a bad or cut zip (RuntimeError, EOFError, BadZipFile),
# a pickle that weights_only refuses or cannot read (UnpicklingError), bad values (ValueError)
LOAD_ERRORS = (RuntimeError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile)
# What to do about an OS error, by its errno
HINTS = {
    errno.ENOSPC: "free some space or choose another location",
    errno.EDQUOT: "free some space or choose another location",
    errno.EACCES: "check the permissions or choose another location",
    errno.EPERM: "check the permissions or choose another location",
    errno.EROFS: "choose a location on a writable file system",
    errno.ENOENT: "check the path",
    errno.EISDIR: "name a file, not a directory",
    errno.ENOTDIR: "a part of the path is a file, not a directory: check the path",
}


def os_error_line(e: OSError) -> str:
    """An OS error as one line that says what is wrong and what to do."""
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or e}; {HINTS.get(e.errno, 'check the path and its permissions')}"


def free_space(path: str) -> str:
    """The free space of the file system that holds path (or its nearest existing parent), in
    words: "0 B free on /x", "3.2 GB free on /x"; "free space unknown" when it cannot be read."""
    where = os.path.abspath(path)
    while not os.path.isdir(where) and os.path.dirname(where) != where:
        where = os.path.dirname(where)  # a file's directory, or the nearest existing parent
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return "free space unknown"
    size = next(f"{free / 10**p:.1f} {u}" for p, u in ((9, "GB"), (6, "MB"), (3, "kB"), (0, "B"))
                if free >= 10**p or u == "B")  # fmt: skip
    return f"{size.replace('.0 B', ' B')} free on {where}"


def one_line_errors(run: Callable[[], int]) -> int:
    """run(), with bad input (ValueError) and OS errors as one line on stderr and status 2: the
    error path of every CLI here (a bug keeps its traceback)."""
    try:
        return run()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
    except OSError as e:
        print(f"error: {os_error_line(e)}", file=sys.stderr)
    return 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block): 'error: argument --x: ...'."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """--student and --teacher (required): a tokenizer by hub name, directory, file or pkg:NAME
    (tokens.load_tokenizer), the pair build_projection.py and audit.py take."""
    for flag in ("--student", "--teacher"):
        parser.add_argument(
            flag, required=True, help="hub name, directory, tokenizer file, pkg:NAME"
        )


def int_flag(low: int, high: int | None = None, what: str = "") -> Callable:
    """An argparse type: an integer in [low, high] (high None: no upper bound)."""
    allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            message = f"{text!r} is not an integer; give {allowed}{what}"
            raise argparse.ArgumentTypeError(message) from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is out of range; give {allowed}{what}")
        return value

    return parse


def float_flag(low: float, high: float, *, low_open: bool = False, what: str = "") -> Callable:
    """An argparse type: a finite number in [low, high], or (low, high] with low_open."""
    allowed = f"{'(' if low_open else '['}{low:g}, {high:g}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            message = f"{text!r} is not a number; give a number in {allowed}{what}"
            raise argparse.ArgumentTypeError(message) from None
        if not math.isfinite(value) or not low <= value <= high or (low_open and value == low):
            message = f"{text} is out of range; give a number in {allowed}{what}"
            raise argparse.ArgumentTypeError(message)
        return value

    return parse


# ----------------------------------------------------------------------------- outputs


def _probe_directory(directory: str, path: str) -> None:
    """Create and remove a temp file in an existing directory: the only check that is right for
    root, ACLs and read-only mounts alike (os.access is not). Leaves nothing behind."""
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".probe-")
    except OSError as e:
        raise ValueError(
            f"cannot write {path}: {directory} is not writable ({e.strerror}); "
            "choose a writable location"
        ) from e
    os.close(fd)
    os.unlink(probe)


def _existing_ancestor(directory: str, path: str) -> str:
    """The nearest directory on the way up from `directory` that exists (os.makedirs creates the
    rest); an error if it is a file."""
    existing = directory
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(
            f"cannot write {path}: {existing} is a file, not a directory; choose another location"
        )
    return existing


def check_output_file(path: str, flag: str, example: str) -> None:
    """Fail fast (ValueError) when the file `path` could not be written: it is a directory, or
    its directory is not writable and cannot be created. Writes nothing."""
    if not path:
        raise ValueError(f"{flag} is empty; name a file, e.g. {flag} {example}")
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        what = "is a directory" if os.path.isdir(path) else "ends with a slash (a directory)"
        raise ValueError(
            f"{flag} {path} {what}; name a file, e.g. {flag} {os.path.join(path, example)}"
        )
    directory = os.path.dirname(os.path.abspath(path))
    _probe_directory(_existing_ancestor(directory, path), path)


def check_output_dir(path: str, flag: str) -> None:
    """Fail fast (ValueError) when the directory `path` could not be written or created."""
    if not path:
        raise ValueError(f"{flag} is empty; name a directory")
    path_abs = os.path.abspath(path)
    if os.path.lexists(path_abs) and not os.path.isdir(path_abs):
        raise ValueError(f"{flag} {path} is a file, not a directory; name a directory")
    _probe_directory(_existing_ancestor(path_abs, path), path)


def _umask() -> int:
    """The process umask, read without changing it (Linux); elsewhere set and restored at once, to
    the strict 0o077 in between, so that a file another thread creates meanwhile is never looser."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


def atomic_write(path: str, write: Callable) -> None:
    """Call write(binary file) on a temp file beside path, then rename it over path: a crash
    never leaves a half-written file, and readers see the old file or the new one. On any
    failure the temp file is removed and the old file stays as it was.

    The file gets the mode a plain open() gives, 0o666 less the umask (mkstemp's temp file is
    0o600, which would make a shared W cache unreadable to the other users). An OS error (no
    space, no permission, a directory in the way) is a ValueError that names path."""

    def failure(e: OSError) -> ValueError:
        why = e.strerror or str(e) or type(e).__name__
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            why += f" ({free_space(path)})"
        hint = HINTS.get(e.errno, "choose a writable location")
        return ValueError(f"cannot write {path}: {why}; {hint}")

    if os.path.isdir(path):
        raise failure(IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR)))
    umask = _umask()
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    except OSError as e:
        raise failure(e) from e
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o666 & ~umask)
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass  # already gone: the error came after the rename
            raise
    except OSError as e:
        raise failure(e) from e
