"""Reading images and label maps with checks that turn bad input into one clear message.

Images are SimpleITK images throughout: geometry (size, spacing, origin, direction) is ITK's, in LPS.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import struct
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import SimpleITK as sitk

from ..common.errors import SDMOrganSegError

try:  # ISA-L inflates 2.5x faster than zlib: the integrity check of a CT .nii.gz takes 0.11 s instead of 0.27 s
    from isal import igzip as _gzip
    from isal.isal_zlib import error as _IsalError

    _INFLATE_ERRORS: tuple[type[BaseException], ...] = (EOFError, gzip.BadGzipFile, zlib.error, _IsalError)
except ImportError:  # pragma: no cover - isal is a dependency; kept for Slicer installs that lack it
    _gzip = gzip
    _INFLATE_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def is_image_file(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and name.endswith(IMAGE_SUFFIXES)


def case_name(path: Path) -> str:
    """The file name without its image suffix (``case.nii.gz`` -> ``case``)."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


#: Set by the command line: capture what ITK's C++ readers print straight to the process's stderr (MetaIO,
#: GDCM) during a read, and use it in the error message instead of letting it surround the one-line error.
capture_native_messages = False


def error_line(error: BaseException, path: Path | None = None) -> str:
    """The informative line of an ITK exception: not the file/line banner, not an errno text that ITK
    appends whether or not it applies (``Reason: No such file or directory`` for a file that exists)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("Exception thrown in")]
    if path is not None and path.exists():
        lines = [line for line in lines if line != "Reason: No such file or directory"]
    text = lines[-1] if lines else type(error).__name__
    text = re.sub(r"^(ITK ERROR: \w+\(0x[0-9a-f]+\): |sitk::ERROR: |\[\w+\] )", "", text)
    return text.strip()


@contextlib.contextmanager
def _native_messages() -> Iterator[list[str]]:
    """Collect what C++ code writes to file descriptor 2 inside the block (when enabled)."""
    collected: list[str] = []
    if not capture_native_messages:
        yield collected
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield collected
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            collected += [line.strip() for line in sink.read().decode("utf-8", "replace").splitlines() if line.strip()]


def dicom_series_files(folder: str | Path) -> list[Path]:
    """The files of the one DICOM series in ``folder``, in the order ITK stacks them: file ``k`` is slice ``k``
    (z index) of the volume :func:`read_image` reads from the folder."""
    folder = Path(folder)
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise SDMOrganSegError(f"{folder} is a folder without a DICOM series; give a NIfTI/NRRD file or a folder holding one DICOM series")
    if len(series) > 1:
        raise SDMOrganSegError(
            f"{folder} holds {len(series)} DICOM series ({', '.join(series[:3])}...); put the one to segment in a folder of its own"
        )
    return [Path(name) for name in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])]


def _read_dicom_folder(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(name) for name in dicom_series_files(folder)])
    return reader.Execute()


# NIfTI data types that hold floating-point voxels: code -> numpy type (little-endian form).
_NIFTI_FLOATS = {16: "f4", 64: "f8"}
_NIFTI_CHUNK = 1 << 22


def _nifti_header(head: bytes) -> tuple[str, list[int], int, int, int] | None:
    """(byte order, used dims, datatype, bitpix, voxel offset) of a NIfTI-1/2 header, None if not NIfTI."""
    for order in "<>":
        if len(head) >= 348 and struct.unpack(order + "i", head[:4])[0] == 348 and head[344:347] in (b"n+1", b"ni1"):
            dim = struct.unpack(order + "8h", head[40:56])
            datatype, bitpix = struct.unpack(order + "2h", head[70:74])
            offset = struct.unpack(order + "f", head[108:112])[0]
            offset = int(offset) if np.isfinite(offset) and 0 <= offset < 2**40 else -1
            return order, list(dim), datatype, bitpix, offset
        if len(head) >= 540 and struct.unpack(order + "i", head[:4])[0] == 540 and head[4:7] in (b"n+2", b"ni2"):
            datatype, bitpix = struct.unpack(order + "2h", head[12:16])
            dim = struct.unpack(order + "8q", head[16:80])
            offset = struct.unpack(order + "q", head[168:176])[0]
            return order, list(dim), datatype, bitpix, offset
    return None


def _check_nifti(path: Path, what: str) -> None:
    """Checks ITK's NIfTI reader skips: a truncated or corrupt (gzip) file, whose missing voxels ITK fills
    in silently; a zero-sized dimension; NaN or infinite voxels, which ITK silently reads as 0."""
    name = f"{what} {path}"
    try:
        with open(path, "rb") as probe:
            compressed = probe.read(2) == b"\x1f\x8b"
        with (_gzip.open(path, "rb") if compressed else open(path, "rb")) as stream:
            head = stream.read(540)
            header = _nifti_header(head)
            if header is None:
                return  # not NIfTI-1/2 (e.g. ANALYZE or not an image at all): ITK decides
            order, dim, datatype, bitpix, offset = header
            count = dim[0]
            if not 1 <= count <= 7 or offset < 0 or bitpix <= 0:
                raise SDMOrganSegError(f"{name} has a corrupt NIfTI header (dim[0] {count}, bitpix {bitpix}, vox_offset {offset}); export the image again")
            sizes = dim[1 : count + 1]
            if min(sizes) <= 0:
                raise SDMOrganSegError(f"{name} has size {tuple(sizes)}: a dimension of size {min(sizes)} holds no voxels; export the image again")
            if head[344:347] == b"ni1" or head[4:7] == b"ni2":
                return  # header of a .hdr/.img pair: the voxels are in the other file
            expected = int(np.prod(np.asarray(sizes, dtype=object))) * bitpix // 8
            floats = np.dtype(order + _NIFTI_FLOATS[datatype]) if datatype in _NIFTI_FLOATS else None
            # Move to the first voxel byte; skipping reads through the stream so gzip checks it.
            pending = head[offset:]
            to_skip = max(offset - len(head), 0)
            while to_skip:
                skipped = len(stream.read(min(to_skip, _NIFTI_CHUNK)))
                if not skipped:
                    break
                to_skip -= skipped
            received = bad = 0
            while received < expected:
                chunk = pending + stream.read(min(_NIFTI_CHUNK, expected - received))
                chunk, pending = chunk[: expected - received], b""
                if floats is not None:
                    usable = len(chunk) - len(chunk) % floats.itemsize
                    values = np.frombuffer(chunk, dtype=floats, count=usable // floats.itemsize)
                    bad += int(values.size - np.count_nonzero(np.isfinite(values)))
                    chunk, pending = chunk[:usable], chunk[usable:]
                if not chunk:
                    received += len(pending)
                    break
                received += len(chunk)
            # Read on to the end so that gzip verifies the stream's length and checksum.
            while stream.read(_NIFTI_CHUNK):
                pass
    except _INFLATE_ERRORS as error:
        raise SDMOrganSegError(f"{name} is a truncated or corrupt gzip file ({error}); copy or export it again") from None
    except OSError as error:
        raise SDMOrganSegError(f"cannot read {name}: {error.strerror or error}") from None
    if received < expected:
        raise SDMOrganSegError(
            f"{name} is truncated: it holds {received} of the {expected} bytes of voxel data its header promises; copy or export it again"
        )
    if bad:
        raise SDMOrganSegError(f"{name} has {bad} NaN or infinite voxels; fix or mask them before segmenting")


def _check_shape(name: str, dimension: int, components: int, size: tuple[int, ...]) -> None:
    if dimension != 3:
        raise SDMOrganSegError(f"{name} is {dimension}D (size {tuple(size)}); SDMOrganSeg needs a single 3D volume (split 4D series into 3D volumes first)")
    if components != 1:
        raise SDMOrganSegError(f"{name} has {components} components per voxel (colour or vector image); give a scalar (grey-level) volume")
    if min(size) < 2:
        raise SDMOrganSegError(f"{name} has size {tuple(size)}; every dimension needs at least 2 voxels (this looks like a single slice)")


#: A MetaImage data-file pattern: one ``%d`` (``%03d`` ...) in a file name, then first, last[, step].
_META_PATTERN = re.compile(r"[^%\s]*%0?\d{0,2}d[^%\s]*\s+-?\d+\s+-?\d+(\s+-?\d+)?\s*")
_META_LINE = re.compile(r"[ \t]*([A-Za-z_][\w.-]*)[ \t]*=[ \t]*(.*?)[ \t\r]*")
_META_VECTORS = {"ElementSpacing": 1, "ElementSize": 1, "Offset": 1, "Position": 1, "Origin": 1, "CenterOfRotation": 1,
                 "TransformMatrix": 2, "Rotation": 2, "Orientation": 2}  # value count: NDims ** power


def _check_metaimage(path: Path, what: str) -> None:
    """Check a MetaImage header before ITK parses it: ITK 5.4's MetaIO crashes the process (memory
    corruption, found by benchmarks/fuzz_readers.py) on some corrupt headers, e.g. a negative ``NDims``,
    a line that is not ``Key = value``, or an ``ElementDataFile`` with ``%`` codes, which it passes to
    printf. Every line up to ``ElementDataFile`` must be ``Key = value``, with counts that fit ``NDims``."""
    with open(path, "rb") as handle:
        head = handle.read(1 << 16)

    def refuse(problem: str) -> None:
        raise SDMOrganSegError(f"{what} {path} has a corrupt MetaImage header ({problem}); export the image again")

    fields: dict[str, str] = {}
    for number, raw in enumerate(head.split(b"\n"), start=1):
        line = raw.decode("latin-1")
        if not line.strip():
            continue
        match = _META_LINE.fullmatch(line)
        if match is None:
            refuse(f"line {number}, {line[:40]!r}, is not 'Key = value'")
        fields[match.group(1)] = match.group(2)
        if match.group(1) == "ElementDataFile":
            break
    else:
        refuse("no ElementDataFile line in its first 64 kB")
    value = fields["ElementDataFile"]
    if "%" in value and not _META_PATTERN.fullmatch(value):
        refuse(f"ElementDataFile {value[:40]!r} is neither LOCAL, a file name nor a file-name pattern")
    try:
        dimensions = int(fields.get("NDims", ""))
        numbers = {key: [float(v) for v in fields[key].split()] for key in ("DimSize", *_META_VECTORS) if key in fields}
        for key in ("ElementNumberOfChannels", "CompressedDataSize", "HeaderSize"):
            if key in fields:
                numbers[key] = [int(fields[key])]
    except ValueError:
        refuse("NDims, DimSize or a geometry field is not a number")
    if not 1 <= dimensions <= 8:
        refuse(f"NDims {dimensions}")
    sizes = numbers.get("DimSize", [])
    if len(sizes) != dimensions or min(sizes) < 1 or any(v != int(v) for v in sizes):
        refuse(f"DimSize {fields.get('DimSize', '')[:40]!r} for NDims {dimensions}")
    for key, power in _META_VECTORS.items():
        if key in numbers and len(numbers[key]) != dimensions**power:
            refuse(f"{key} has {len(numbers[key])} values for NDims {dimensions}")
    if numbers.get("ElementNumberOfChannels", [1])[0] < 1 or min(numbers.get("CompressedDataSize", [0])[0], numbers.get("HeaderSize", [0])[0]) < -1:
        refuse("ElementNumberOfChannels, CompressedDataSize or HeaderSize out of range")


def _inline_data_limit(path: Path) -> float | None:
    """Most voxel bytes a single-file image can hold (its size, or what its compression can expand to),
    None where the voxels may live in another file or a format's expansion is unbounded."""
    size = path.stat().st_size
    name = path.name.lower()
    deflate = 1040.0 * size + (1 << 20)  # zlib expands at most ~1032:1
    if name.endswith(".nii"):
        return float(size)
    if name.endswith(".nii.gz"):
        return deflate
    if name.endswith((".nrrd", ".mha")):
        with open(path, "rb") as handle:
            head = handle.read(8192).decode("latin-1").lower()
        header = head.split("\n\n")[0] if name.endswith(".nrrd") else head
        if name.endswith(".nrrd"):
            if "data file:" in header or "datafile:" in header:
                return None
            encoding = re.search(r"^encoding:\s*(\S+)", header, re.MULTILINE)
            encoding = encoding.group(1) if encoding else "raw"
            return float(size) if encoding == "raw" else deflate if encoding in ("gzip", "gz") else None
        local = re.search(r"^elementdatafile\s*=\s*local\s*$", header, re.MULTILINE)
        if not local:
            return None
        compressed = re.search(r"^compresseddata\s*=\s*true", header, re.MULTILINE)
        return deflate if compressed else float(size)
    return None


def _check_allocation(path: Path, name: str, reader: sitk.ImageFileReader) -> None:
    """Refuse, before ITK allocates the voxels, a header describing more voxels than the file can hold or
    than there is memory for: corrupt headers otherwise make ITK allocate gigabytes for a tiny file."""
    from ..common.files import available_memory_bytes, size_text

    pixel = sitk.GetPixelIDValueAsString(reader.GetPixelID())  # e.g. "vector of 16-bit signed integer"
    bits = re.search(r"(\d+)-bit", pixel)
    if not bits:
        return
    component = int(bits.group(1)) // 8 * (2 if "complex" in pixel else 1)
    needed = float(np.prod(np.asarray(reader.GetSize(), dtype=np.float64))) * reader.GetNumberOfComponents() * component
    limit = _inline_data_limit(path)
    if limit is not None and needed > limit:
        raise SDMOrganSegError(
            f"{name} is truncated or has a corrupt header: the header describes {reader.GetSize()} voxels "
            f"({size_text(needed)}), more than the {size_text(path.stat().st_size)} file can hold; export the image again"
        )
    available = available_memory_bytes()
    if available is not None and needed > available:
        raise SDMOrganSegError(
            f"{name} needs {size_text(needed)} of memory to read, more than the {size_text(available)} available; "
            "crop or downsample it, or use a machine with more memory"
        )


def read_image(path: str | Path, what: str = "image", *, volume: bool = False) -> sitk.Image:
    """Read a NIfTI, NRRD or MetaImage file, or a folder with one DICOM series.

    Content is not checked (see :func:`check_volume`), but files are: a truncated or corrupt file, or
    one that is not an image, is an :class:`SDMOrganSegError` naming the problem. With ``volume``, an
    image that is not a scalar 3D volume of at least 2 voxels a side is refused from its header, before
    its voxels are read.
    """
    path = Path(path)
    if not path.exists():
        raise SDMOrganSegError(f"{what} {path} does not exist; check the path")
    native: list[str] = []
    try:
        if path.is_dir():
            with _native_messages() as native:
                return _read_dicom_folder(path)
        if path.name.lower().endswith((".nii", ".nii.gz")):
            _check_nifti(path, what)
        if path.name.lower().endswith((".mha", ".mhd")):
            _check_metaimage(path, what)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        with _native_messages() as native:
            reader.ReadImageInformation()
        if volume:
            _check_shape(f"{what} {path}", reader.GetDimension(), reader.GetNumberOfComponents(), reader.GetSize())
        _check_allocation(path, f"{what} {path}", reader)
        with _native_messages() as native:
            return reader.Execute()
    except SDMOrganSegError:
        raise
    except (RuntimeError, OSError, ValueError, MemoryError, OverflowError) as error:
        reason = error_line(error, path)
        if "Unable to determine ImageIO reader" in reason:
            reason = "not a file format ITK can read"
        elif native:
            reason = native[0].rstrip(".")
        raise SDMOrganSegError(
            f"cannot read {what} {path}: {reason}; it must be an intact NIfTI (.nii/.nii.gz), NRRD or MetaImage file or a DICOM folder"
        ) from None


def check_volume(image: sitk.Image, what: str = "image", source: str | Path = "") -> None:
    """Refuse images the segmenter cannot use, naming the problem: not 3D, several components,
    a dimension below 2 voxels, non-finite voxels, a constant image."""
    name = f"{what} {source}".strip()
    _check_shape(name, image.GetDimension(), image.GetNumberOfComponentsPerPixel(), image.GetSize())
    if not np.isfinite(image.GetSpacing()).all() or min(image.GetSpacing()) <= 0:
        raise SDMOrganSegError(f"{name} has spacing {image.GetSpacing()}; voxel sizes must be positive")
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    if not np.isfinite(direction).all() or abs(np.linalg.det(direction)) < 1e-6 or not np.isfinite(image.GetOrigin()).all():
        raise SDMOrganSegError(f"{name} has a degenerate orientation (direction {tuple(np.round(direction.ravel(), 4))}, origin {image.GetOrigin()}); fix its header")
    array = sitk.GetArrayViewFromImage(image)
    if np.iscomplexobj(array) or array.dtype == bool:
        raise SDMOrganSegError(f"{name} has {array.dtype} voxels; give a real-valued (grey-level) volume")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            bad = int(np.count_nonzero(~np.isfinite(array)))
            raise SDMOrganSegError(f"{name} has {bad} NaN or infinite voxels; fix or mask them before segmenting")
    lowest, highest = array.min(), array.max()
    if lowest == highest:
        raise SDMOrganSegError(f"{name} is constant (every voxel is {lowest}); it holds no anatomy to segment")


def read_volume(path: str | Path, what: str = "image") -> sitk.Image:
    """:func:`read_image` followed by :func:`check_volume`."""
    image = read_image(path, what, volume=True)
    check_volume(image, what, path)
    return image


def label_array(image: sitk.Image, source: str | Path = "") -> np.ndarray:
    """Label map as an integer array ``(z, y, x)``; float files are accepted when all values are whole."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise SDMOrganSegError(f"label map {source} must be a scalar 3D image")
    array = sitk.GetArrayFromImage(image)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or not np.array_equal(array, np.round(array)):
            raise SDMOrganSegError(f"label map {source} has values that are not whole numbers; labels must be integers (0 = background)")
        array = array.astype(np.int32)
    if array.min() < 0:
        raise SDMOrganSegError(f"label map {source} has negative values; labels must be 0 (background) or positive integers")
    return array


def geometry_mismatch(a: sitk.Image, b: sitk.Image, tolerance: float = 1e-4) -> str | None:
    """The first geometric property in which two images differ (``"size"``, ``"spacing"``...), or None."""
    if a.GetSize() != b.GetSize():
        return f"size {a.GetSize()} vs {b.GetSize()}"
    for name in ("Spacing", "Origin", "Direction"):
        first, second = np.asarray(getattr(a, f"Get{name}")()), np.asarray(getattr(b, f"Get{name}")())
        scale = max(1.0, float(np.abs(first).max(initial=0)))
        if not np.allclose(first, second, atol=tolerance * scale, rtol=0):
            return f"{name.lower()} {tuple(round(float(v), 5) for v in first)} vs {tuple(round(float(v), 5) for v in second)}"
    return None


def image_from_array(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """A SimpleITK image of ``array`` (``(z, y, x)``) with ``reference``'s geometry."""
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image
