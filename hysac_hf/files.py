"""Files the library writes and checks: folders written atomically by one writer at a time, and their checksums.

- :func:`write_folder_atomically`: a crash leaves the previous folder (or none), never a half-written one; writers of
  the same folder take turns (a lock file beside it, `filelock`), and each one first removes what crashed writers
  left behind.
- :func:`folder_lock`: that lock, for other writers of the same folder (a resumable index build).
- :func:`sha256_file`: the checksum that embedding caches and gallery index folders record. It is defined once, in
  the remote-code module `modeling/gallery_hysac.py`, because the pipelines verify index folders where hysac_hf is
  not installed; it is re-exported here for the library.

How a replacement stays atomic: the new folder is written under a hidden temporary name beside the target
(`.NAME.tmp-XXXX`), then exchanged with the old one in one `renameat2(RENAME_EXCHANGE)` call (Linux), so a reader
sees the old folder or the new one, never none; elsewhere the old folder is first renamed aside (`.NAME.old-PID`).
The old content is deleted last. A writer killed at any point leaves only such hidden `.NAME.tmp-*`/`.NAME.old-*`
folders, which the next writer deletes once it holds the lock (they cannot belong to a live writer then); the lock
file itself (`.NAME.lock`, empty) stays, as lock files must for the lock to be safe.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import UsageError
from .modeling.gallery_hysac import sha256_file

logger = logging.getLogger(__name__)

LOCK_TIMEOUT = 600.0  # seconds a writer waits for another writer of the same folder before giving up
_RENAME_EXCHANGE = 2  # linux/fs.h
_LOCKS: dict[str, object] = {}  # one FileLock per lock file: re-entrant within a thread (load, add, save under one)


def lock_path(target: str | os.PathLike) -> Path:
    """The lock file that serialises the writers of `target`: `.NAME.lock` beside it."""
    target = Path(target).expanduser().resolve()
    return target.with_name(f".{target.name}.lock")


@contextlib.contextmanager
def folder_lock(target: str | os.PathLike, timeout: float = LOCK_TIMEOUT) -> Iterator[Path]:
    """Hold the writers' lock of `target` (waiting up to `timeout` seconds for another writer). Re-entrant: a thread
    that holds it may take it again (a read-modify-write such as `hysac-index add` holds it around the save).

    Yields:
        the resolved `target`.
    Raises:
        UsageError: another process kept the lock for `timeout` seconds (one line naming the lock file).
    """
    from filelock import FileLock, Timeout

    target = Path(target).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    path = str(lock_path(target))
    lock = _LOCKS.setdefault(path, FileLock(path))
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise UsageError(
            f"another process has been writing {target} for more than {timeout:g} s (it holds {lock_path(target)}); "
            "wait for it to finish and try again"
        ) from None
    try:
        yield target
    finally:
        lock.release()


def stale_leftovers(target: str | os.PathLike) -> list[Path]:
    """The hidden temporary and old folders that writers of `target` leave when they are killed."""
    target = Path(target).expanduser().resolve()
    if not target.parent.is_dir():
        return []
    prefixes = (f".{target.name}.tmp-", f".{target.name}.old-")
    return sorted(p for p in target.parent.iterdir() if p.name.startswith(prefixes))


def remove_stale_leftovers(target: str | os.PathLike) -> None:
    """Delete :func:`stale_leftovers`; call it only while holding :func:`folder_lock` (no writer is live then)."""
    for path in stale_leftovers(target):
        logger.info("Removing %s, left by an interrupted writer of %s", path, Path(target).name)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`); False where that is unavailable."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


def write_folder_atomically(
    target: str | os.PathLike,
    write: Callable[[Path], None],
    replace: bool = True,
    timeout: float = LOCK_TIMEOUT,
) -> Path:
    """Build a folder with `write(tmp_folder)` beside `target`, then swap it into place, one writer at a time.

    Args:
        target: the folder to create or replace.
        write: fills the temporary folder it is given.
        replace: replace an existing `target` (its old content survives until the final swap); with False an
            existing non-empty `target` is refused.
        timeout: seconds to wait for another writer of `target`.
    Returns:
        `target`.
    Raises:
        FileExistsError: `target` is a file, or non-empty with `replace=False`. Nothing is written then.
        UsageError: another writer held the lock for `timeout` seconds.
    """
    target = Path(target).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder; choose a folder path")
    with folder_lock(target, timeout):
        remove_stale_leftovers(target)
        if not replace and target.exists() and any(target.iterdir()):
            raise FileExistsError(f"{target} exists and is not empty; choose a new folder")
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            write(tmp)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes the folder private; the result is an ordinary folder
            for path in tmp.rglob("*"):
                os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
            if target.exists() and _exchange(tmp, target):
                pass  # tmp now holds the old folder, removed below
            elif target.exists():
                old = target.with_name(f".{target.name}.old-{os.getpid()}")
                os.replace(target, old)
                os.replace(tmp, target)
                tmp = old
            else:
                os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # the unfinished copy, or the old folder once replaced
    return target


__all__ = [
    "LOCK_TIMEOUT",
    "folder_lock",
    "lock_path",
    "remove_stale_leftovers",
    "sha256_file",
    "stale_leftovers",
    "write_folder_atomically",
]
