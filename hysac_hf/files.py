"""Files the library writes and checks: folders written atomically, and their checksums.

- :func:`write_folder_atomically`: a crash leaves the previous folder (or none), never a half-written one.
- :func:`sha256_file`: the checksum that embedding caches and gallery index folders record. It is defined once, in
  the remote-code module `modeling/gallery_hysac.py`, because the pipelines verify index folders where hysac_hf is
  not installed; it is re-exported here for the library.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .modeling.gallery_hysac import sha256_file


def write_folder_atomically(target: str | os.PathLike, write: Callable[[Path], None], replace: bool = True) -> Path:
    """Build a folder with `write(tmp_folder)` beside `target`, then rename it into place.

    Args:
        target: the folder to create or replace.
        write: fills the temporary folder it is given.
        replace: replace an existing `target` (its old content survives until the final rename); with False an
            existing non-empty `target` is refused.
    Returns:
        `target`.
    Raises:
        FileExistsError: `target` is a file, or non-empty with `replace=False`. Nothing is written then.
    """
    target = Path(target).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder; choose a folder path")
    if not replace and target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not empty; choose a new folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes the folder private; the result is an ordinary folder
        for path in tmp.rglob("*"):
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


__all__ = ["sha256_file", "write_folder_atomically"]
