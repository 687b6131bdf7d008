"""Untrusted files: archives extracted without path traversal or links out of the folder."""

from __future__ import annotations

import os
import tarfile
import zipfile
from pathlib import Path

from polyfm.core.errors import DataError


def _inside(root: Path, member: str) -> Path:
    target = (root / member).resolve()
    if target != root and root not in target.parents:
        raise DataError(f"refused to extract {member!r}: it would land outside {root} (path traversal).")
    return target


def safe_extract(archive: str | os.PathLike[str], destination: str | os.PathLike[str]) -> list[Path]:
    """Extract a .zip or .tar(.gz/.bz2/.xz) into ``destination``. Every member is checked
    first: absolute paths, ``..`` escapes, and links or devices are refused, naming the archive
    and the member; nothing is written when any member is bad."""
    archive, root = Path(archive), Path(destination).resolve()
    root.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zipped:
                names = zipped.namelist()
                for name in names:
                    _checked(archive, root, name)
                zipped.extractall(root)
                return [root / n for n in names]
        with tarfile.open(archive) as tarred:
            members = tarred.getmembers()
            for member in members:
                _checked(archive, root, member.name)
                if not (member.isfile() or member.isdir()):
                    raise DataError(f"refused {member.name!r}: links and devices are not extracted.", path=archive)
            tarred.extractall(root, members=members, filter="data")
            return [root / m.name for m in members]
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"not a readable archive ({exc}); download it again.", path=archive) from exc


def _checked(archive: Path, root: Path, name: str) -> Path:
    try:
        return _inside(root, name)
    except DataError as exc:
        raise DataError(str(exc), path=archive) from None
