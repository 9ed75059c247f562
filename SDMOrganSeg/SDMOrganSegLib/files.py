"""Safe file output: atomic writes, no silent overwrites, no paths escaping the output folder."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import SDMOrganSegError


def safe_name(name: str) -> str:
    """A file-name fragment made from free text (organ or case names): letters, digits, ``-``, ``_``, ``.``.

    Path separators, ``..`` and other characters become ``_``, so a name read from a model card or a
    case file can never point outside the output folder.
    """
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", name.strip()).strip("._")
    return cleaned or "unnamed"


def inside(folder: Path, relative: str) -> Path:
    """``folder / relative``, refusing any result outside ``folder``."""
    root = Path(folder).resolve()
    path = (root / relative).resolve()
    if root != path and root not in path.parents:
        raise SDMOrganSegError(f"refusing to write {relative!r}: it points outside the output folder {root}")
    return path


def check_writable(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise SDMOrganSegError(f"{path} already exists; choose another output or pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_path(path: Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary name keeps the suffixes (``.nii.gz``, ``.nrrd``) so writers pick the right format.
    """
    path = Path(path)
    check_writable(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".part{suffix}", dir=path.parent)
    os.close(handle)
    temporary_path = Path(temporary)
    try:
        yield temporary_path
        os.replace(temporary_path, path)
    finally:
        temporary_path.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str, overwrite: bool = True) -> None:
    with atomic_path(path, overwrite) as temporary:
        temporary.write_text(text, encoding="utf-8")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
