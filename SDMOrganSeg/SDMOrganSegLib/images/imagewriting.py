"""Writing compressed images fast: ITK writes the header and the raw voxels, ISA-L writes the gzip.

SimpleITK 2.5 compresses NIfTI with zlib at one fixed level whatever level is asked, and NRRD with zlib
too: a float32 SDM of a CT volume (210 MB), whose low mantissa bits are noise, takes 3.5 s that way.
ISA-L's igzip (the ``isal`` package) writes a standard gzip stream of the same data in 0.43 s at about
the same ratio (0.70 against 0.67; ``benchmarks/bench_segment.py``), and it releases the GIL, so several
files compress at once. Any gzip reader reads the result: ITK (Slicer, SimpleITK), nibabel, ``gzip``.
Without ``isal`` Python's zlib at level 1 is used (3.1 s, still no slower than ITK's).

``.nii.gz`` is the gzip of the ``.nii`` file. An attached ``.nrrd`` is a text header ending in an empty
line, then the data, whose ``encoding:`` field says how it is stored; ITK writes ``encoding: raw`` and
this module rewrites that one field to ``gzip`` and compresses what follows.
"""

from __future__ import annotations

import shutil
import struct
import sys
from pathlib import Path
from typing import BinaryIO

import SimpleITK as sitk

try:
    from isal import igzip as _gzip

    #: ISA-L levels run 0-3. On CT SDMs: level 1 0.43 s per 210 MB at ratio 0.70, level 2 0.46 s at 0.69,
    #: level 0 0.41 s at 0.88; zlib's default level 3.5 s at 0.67.
    GZIP_LEVEL = 1
except ImportError:  # pragma: no cover - isal is a dependency; kept for Slicer installs that lack it
    import gzip as _gzip

    GZIP_LEVEL = 1

_CHUNK = 8 << 20
_NRRD_HEADER_LIMIT = 1 << 20
_NIFTI1_OFFSET = 352  # 348-byte header and the 4-byte extension flag


def _compress(target: Path, voxels: memoryview | BinaryIO, *, plain: bytes = b"", packed: bytes = b"") -> None:
    """Write ``plain`` as it is, then one gzip stream of ``packed`` followed by ``voxels``."""
    with open(target, "wb") as file:
        file.write(plain)  # before the gzip writer exists: it writes its own header when made
        with _gzip.open(file, "wb", compresslevel=GZIP_LEVEL) as out:
            out.write(packed)
            if isinstance(voxels, memoryview):
                for begin in range(0, voxels.nbytes, _CHUNK):
                    out.write(voxels[begin : begin + _CHUNK])
            else:
                shutil.copyfileobj(voxels, out, _CHUNK)


def _nrrd_gzip_header(raw_header: bytes, size: tuple[int, ...] | None) -> bytes:
    """ITK's raw NRRD header with ``encoding: gzip`` and, when given, ``sizes:`` set to ``size``."""
    lines = raw_header.split(b"\n")
    for field, value in ((b"encoding:", b"gzip"), (b"sizes:", b" ".join(b"%d" % n for n in size) if size else None)):
        found = [i for i, line in enumerate(lines) if line.startswith(field)]
        if len(found) != 1:
            raise RuntimeError(f"ITK wrote an NRRD header without a single {field.decode()} line")
        if value is not None:
            lines[found[0]] = field + b" " + value
    return b"\n".join(lines)


def _nrrd_header_length(data: bytes) -> int:
    end = data.find(b"\n\n")
    if end < 0:
        raise RuntimeError("ITK wrote an NRRD header without its end")
    return end + 2


def _one_voxel_header(image: sitk.Image, path: Path, nifti: bool) -> bytes:
    """The header ITK writes for ``image``, taken from a one-voxel image of the same type and geometry and
    given ``image``'s size; the voxels follow it as they lie in memory (x fastest)."""
    tiny = sitk.Image([1] * image.GetDimension(), image.GetPixelID())
    tiny.SetSpacing(image.GetSpacing())
    tiny.SetOrigin(image.GetOrigin())
    tiny.SetDirection(image.GetDirection())
    probe = path.with_name(f".{path.name}.header{'.nii' if nifti else '.nrrd'}")
    try:
        sitk.WriteImage(tiny, str(probe), useCompression=False)
        data = probe.read_bytes()
    finally:
        probe.unlink(missing_ok=True)
    if nifti:
        header = bytearray(data[: _NIFTI1_OFFSET])
        if len(data) != _NIFTI1_OFFSET + image.GetSizeOfPixelComponent() or struct.unpack_from("<i", header, 0)[0] != 348:
            raise RuntimeError("ITK wrote an unexpected NIfTI header")
        if struct.unpack_from("<4h", header, 40) != (3, 1, 1, 1):
            raise RuntimeError("ITK wrote an unexpected NIfTI size")
        struct.pack_into("<3h", header, 42, *image.GetSize())
        return bytes(header)
    return _nrrd_gzip_header(data[: _nrrd_header_length(data)], image.GetSize())


def _fast_path(image: sitk.Image) -> bool:
    # NIfTI-1 stores sizes as int16 (ITK switches to NIfTI-2 above); the voxels must be little-endian scalars.
    return (
        image.GetDimension() == 3 and image.GetNumberOfComponentsPerPixel() == 1 and sys.byteorder == "little"
        and max(image.GetSize()) <= 32767
    )


def write_image(image: sitk.Image, path: str | Path, compress: bool = True) -> None:
    """Write ``image`` to ``path`` (any ITK format by its suffix); ``.nii.gz`` and ``.nrrd`` are gzip-compressed
    with ISA-L when ``compress``, other formats as ITK writes them.

    For a 3D scalar image the header is ITK's (written for a one-voxel image of the same type and
    geometry, its size set to the image's: byte-identical to ITK's own file, tested) and the voxels are
    compressed straight from memory; otherwise ITK writes the raw file first and it is compressed from
    there. Raises what ``sitk.WriteImage`` raises (RuntimeError) or OSError; a failed call removes what it
    wrote.
    """
    path = Path(path)
    name = path.name.lower()
    nifti = name.endswith(".nii.gz")
    if not compress or not (nifti or name.endswith(".nrrd")):
        sitk.WriteImage(image, str(path), useCompression=compress)
        return
    raw = path.with_name(f".{path.name}.raw{'.nii' if nifti else '.nrrd'}")
    try:
        if _fast_path(image):
            header = _one_voxel_header(image, path, nifti)
            voxels = memoryview(sitk.GetArrayViewFromImage(image)).cast("B")
            _compress(path, voxels, **({"packed": header} if nifti else {"plain": header}))
            return
        sitk.WriteImage(image, str(raw), useCompression=False)
        with open(raw, "rb") as source:
            if nifti:
                _compress(path, source)
            else:
                head = source.read(_NRRD_HEADER_LIMIT)
                length = _nrrd_header_length(head)
                source.seek(length)
                _compress(path, source, plain=_nrrd_gzip_header(head[:length], None))
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    finally:
        raw.unlink(missing_ok=True)
