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
    """Refuse an output path that exists (unless ``overwrite``), is a folder, or lies under a file."""
    path = Path(path)
    if path.is_dir():
        raise SDMOrganSegError(f"{path} is a folder where an output file must go; move it away or choose another output folder")
    if path.exists() and not overwrite:
        raise SDMOrganSegError(f"{path} already exists; choose another output or pass --overwrite to replace it")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise SDMOrganSegError(f"{parent} is a file where an output folder must go; move it away or choose another output folder")
            break


def _umask() -> int:
    # os.umask can only be read by setting it; do it once, at import, before any threads write files.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()


@contextlib.contextmanager
def atomic_path(path: Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary name keeps the suffixes (``.nii.gz``, ``.nrrd``) so writers pick the right format.
    """
    path = Path(path)
    check_writable(path, overwrite)
    suffix = "".join(path.suffixes)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".part{suffix}", dir=path.parent)
        os.close(handle)
    except OSError as error:
        raise SDMOrganSegError(f"cannot write {path}: {error.strerror or error}; check the folder exists and is writable") from None
    temporary_path = Path(temporary)
    try:
        yield temporary_path
        try:
            # mkstemp makes the file private (0600), and some writers (safetensors) replace it with another
            # private file: give the result the permissions an ordinary new file gets (0644 under umask 022).
            os.chmod(temporary_path, 0o666 & ~_UMASK)
            os.replace(temporary_path, path)
        except OSError as error:
            raise SDMOrganSegError(f"cannot write {path}: {error.strerror or error}; check that nothing else holds that name") from None
    finally:
        temporary_path.unlink(missing_ok=True)


def read_json_object(path: Path, what: str, fix: str) -> dict:
    """The JSON object in ``path``; an unreadable file, invalid JSON or another JSON value is an
    SDMOrganSegError naming ``what`` (e.g. "model card x/model.json") and ending with ``fix``."""
    import json

    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SDMOrganSegError(f"{what} is not valid JSON ({error}); {fix}") from None
    if not isinstance(values, dict):
        raise SDMOrganSegError(f"{what} must be a JSON object; {fix}")
    return values


def write_text_atomic(path: Path, text: str, overwrite: bool = True) -> None:
    with atomic_path(path, overwrite) as temporary:
        temporary.write_text(text, encoding="utf-8")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def available_memory_bytes() -> int | None:
    """RAM available to new allocations (Linux ``MemAvailable``; elsewhere free pages), None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def worker_threads(limit: int = 4) -> int:
    """Threads for work that releases the GIL (ITK, ISA-L, VTK, numpy): the CPUs this process may use,
    at most ``limit`` (beyond that such work is bound by memory or disk)."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count() or 1
    return max(1, min(limit, available))


def size_text(count: float) -> str:
    """A byte count for messages: ``512 bytes``, ``42.2 kB``, ``3.1 MB``, ``12.5 GB``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.3g} {unit}"
    return f"{int(count)} bytes"
