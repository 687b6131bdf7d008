"""Writing files so that a reader, or a run killed half-way, never sees half of one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike[str], fsync: bool = True) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; when the block ends without an error the
    file written there is flushed to disk and renamed onto ``path`` (one atomic step on
    POSIX and Windows), else it is removed and ``path`` is left as it was.

    The temporary name keeps the target's suffixes (``.case_seg.nii.gz`` becomes
    ``.<random>.case_seg.nii.gz``), so writers that choose the format from the name
    (nibabel, pandas' compression) write the right one; the leading dot hides it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=".", suffix=f".{target.name}")
    os.close(fd)
    temporary = Path(name)
    try:
        yield temporary
        if fsync:
            with open(temporary, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(temporary, target)
    finally:
        if temporary.exists():
            temporary.unlink()


__all__ = ["atomic_path"]
