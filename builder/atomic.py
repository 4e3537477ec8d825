"""Publish files and folders atomically: the one way the builder puts anything in place.

A folder (an artifact, imported weights) is staged under a lock and swapped into place in one
rename; a file (a lock, params.yaml, a signature, a spec written for the user) is written beside
its destination and renamed over it. Readers see the old version or the new one, never a mix,
never nothing, even after `kill -9`. Staging folders and lock files live in <repo>/.builder/ (or
beside an output outside the repository).
"""

import ctypes
import errno
import fcntl
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from builder import failpoints

AT_FDCWD = -100
RENAME_EXCHANGE = 2  # renameat2 flag (Linux >= 3.15): swap two paths atomically


def work_dir(out: Path, root: Path) -> tuple:
    """(folder for staging and locks, key naming this output there)."""
    if out.is_relative_to(root):
        return root / ".builder", out.relative_to(root).as_posix().replace("/", "--")
    return out.parent, f".{out.name}"


@contextmanager
def staging(out: Path, root: Path):
    """Yield a fresh staging folder for out while holding out's lock (one writer per output at a
    time); whatever a killed writer left is removed first, and the folder is removed on exit."""
    work, key = work_dir(out, root)
    work.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(work / f"{key}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        for stale in work.glob(f"{key}.tmp-*"):  # only the lock holder stages: these are leftovers
            shutil.rmtree(stale, ignore_errors=True)
        folder = work / f"{key}.tmp-{os.getpid()}"
        folder.mkdir()
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def publish(folder: Path, out: Path) -> None:
    """Put folder at out. An existing out is exchanged with it in one step, then deleted."""
    if out.exists():
        exchange(folder, out)
        failpoints.reached("swap")
        shutil.rmtree(folder)  # now the previous version
    else:
        folder.rename(out)
    fsync_dir(out.parent)


@contextmanager
def replacing(path: Path):
    """Yield a temporary path beside path; when the block succeeds it replaces path in one rename,
    otherwise it is removed and path is left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield temporary
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        temporary.replace(path)
        fsync_dir(path.parent)
    finally:
        temporary.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    """Write a UTF-8 text file atomically."""
    with replacing(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def exchange(first: Path, second: Path) -> None:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); two renames where unsupported."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None:
        if renameat2(AT_FDCWD, os.fsencode(first), AT_FDCWD, os.fsencode(second), RENAME_EXCHANGE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(code, os.strerror(code), str(second))
    aside = first.with_name(first.name + ".swap")
    second.rename(aside)
    first.rename(second)
    aside.rename(first)


def fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
