"""Output files: checked before any expensive work, written under a temporary name and renamed when whole."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pipeline.errors import MimicError


def check_writable(path: str | Path, what: str, folder: bool = False, need_bytes: int = 0) -> Path:
    """Make `path`'s parent and prove a file can be written there, with `need_bytes` free on its disk; one line
    naming `what` and the path otherwise. `path` itself (a file, or a folder if `folder`) is left as it was."""
    path = Path(path)
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".{path.name}.probe-{os.getpid()}"
        probe.write_bytes(b"0")
        probe.unlink()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise MimicError(f"{what} {path} cannot be written: {reason} ({err.filename or parent})") from err
    if path.exists() and path.is_dir() != folder:
        raise MimicError(f"{what} {path} exists and is a {'folder' if path.is_dir() else 'file'}")
    free = shutil.disk_usage(parent).free
    if need_bytes > free:
        raise MimicError(
            f"{what} {path} needs about {need_bytes / 2**30:.1f} GiB, but its disk has {free / 2**30:.1f} GiB free"
        )
    return path


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` so that a crash leaves the old file or none, never half of the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
