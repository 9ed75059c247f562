"""Reading images and label maps with checks that turn bad input into one clear message.

Images are SimpleITK images throughout: geometry (size, spacing, origin, direction) is ITK's, in LPS.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import SDMOrganSegError

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


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    # ITK messages start with a file/line banner; the useful part is the last non-empty line.
    return (text[-1] if text else type(error).__name__).strip()


def _read_dicom_folder(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise SDMOrganSegError(f"{folder} is a folder without a DICOM series; give a NIfTI/NRRD file or a folder holding one DICOM series")
    if len(series) > 1:
        raise SDMOrganSegError(
            f"{folder} holds {len(series)} DICOM series ({', '.join(series[:3])}...); put the one to segment in a folder of its own"
        )
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), series[0]))
    return reader.Execute()


def read_image(path: str | Path, what: str = "image") -> sitk.Image:
    """Read a NIfTI, NRRD or MetaImage file, or a folder with one DICOM series; no checks of content."""
    path = Path(path)
    if not path.exists():
        raise SDMOrganSegError(f"{what} {path} does not exist; check the path")
    try:
        if path.is_dir():
            return _read_dicom_folder(path)
        return sitk.ReadImage(str(path))
    except SDMOrganSegError:
        raise
    except (RuntimeError, OSError) as error:
        raise SDMOrganSegError(
            f"cannot read {what} {path}: {_first_line(error)}; it must be an intact NIfTI (.nii/.nii.gz), NRRD or MetaImage file or a DICOM folder"
        ) from None


def check_volume(image: sitk.Image, what: str = "image", source: str | Path = "") -> None:
    """Refuse images the segmenter cannot use, naming the problem: not 3D, several components,
    a dimension below 2 voxels, non-finite voxels, a constant image."""
    name = f"{what} {source}".strip()
    dimension = image.GetDimension()
    if dimension != 3:
        raise SDMOrganSegError(f"{name} is {dimension}D; SDMOrganSeg needs a single 3D volume (split 4D series into 3D volumes first)")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise SDMOrganSegError(
            f"{name} has {image.GetNumberOfComponentsPerPixel()} components per voxel (colour or vector image); give a scalar (grey-level) volume"
        )
    size = image.GetSize()
    if min(size) < 2:
        raise SDMOrganSegError(f"{name} has size {size}; every dimension needs at least 2 voxels (this looks like a single slice)")
    if min(image.GetSpacing()) <= 0:
        raise SDMOrganSegError(f"{name} has spacing {image.GetSpacing()}; voxel sizes must be positive")
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            bad = int(np.count_nonzero(~np.isfinite(array)))
            raise SDMOrganSegError(f"{name} has {bad} NaN or infinite voxels; fix or mask them before segmenting")
    lowest, highest = array.min(), array.max()
    if lowest == highest:
        raise SDMOrganSegError(f"{name} is constant (every voxel is {lowest}); it holds no anatomy to segment")


def read_volume(path: str | Path, what: str = "image") -> sitk.Image:
    """:func:`read_image` followed by :func:`check_volume`."""
    image = read_image(path, what)
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
            return f"{name.lower()} {tuple(np.round(first, 5))} vs {tuple(np.round(second, 5))}"
    return None


def image_from_array(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """A SimpleITK image of ``array`` (``(z, y, x)``) with ``reference``'s geometry."""
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image
