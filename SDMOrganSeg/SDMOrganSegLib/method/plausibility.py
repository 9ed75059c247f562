"""Does the input fit the model? Checks of an image and of a prediction against the model card.

A model only knows the images it was trained on. The card states their modality (CT or MR), what they
show (``field_of_view``), their largest extent in mm, and per organ the range of volumes in the training
labels. These checks turn a mismatch into one clear line instead of a silent, meaningless result such as
"anterior hippocampus 154 ml" for an abdominal CT.

A wrong modality (:func:`modality_mismatch`) stops the run before the network, which would otherwise spend
minutes on a meaningless result (:class:`~SDMOrganSegLib.common.errors.InputMismatchError`); ``--force`` (the
Slicer panel asks) runs it anyway, and the mismatch is then a warning in the notes. The other checks only
warn (in ``SegmentationResult.notes``, and so in ``summary.json``, the command line's output and the panel's
summary): an unusual but valid input (a large field of view, a small child's organ) must still be
segmentable.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import SimpleITK as sitk

#: CT stores Hounsfield units: air is about -1000 HU. An image whose darkest percent lies above this is
#: not a CT in HU (a rescaled or an MR image); an image whose darkest percent lies below it is a CT.
_AIR_HU = -500.0
#: How far outside the training range an extent or a volume may be before it is flagged.
EXTENT_FACTOR = 2.0
VOLUME_FACTOR = 2.0
#: Voxels sampled for the intensity percentile (a few ms on a CT; the full one is within a grey level).
_SAMPLE = 1_000_000


def _darkest_percent(image: sitk.Image) -> float:
    values = sitk.GetArrayViewFromImage(image).reshape(-1)
    return float(np.percentile(values[:: max(1, values.size // _SAMPLE)], 1.0))


def looks_like_ct(image: sitk.Image) -> bool:
    """True when the image's darkest percent is air in Hounsfield units (below -500)."""
    return _darkest_percent(image) < _AIR_HU


def modality_mismatch(image: sitk.Image, modality: str | None, field_of_view: str = "") -> str | None:
    """Why the input is not of the model's modality (problem and fix, one line), or None when it is (or the
    card does not say)."""
    if not modality:
        return None
    what = f" ({field_of_view})" if field_of_view else ""
    darkest = _darkest_percent(image)
    if modality == "CT" and darkest >= _AIR_HU:
        return (
            f"this model is for CT{what}, but the input has no air at about -1000 HU (its darkest 1 % is at {darkest:.0f}); "
            "an MR or a rescaled image gives meaningless organs: use a CT in Hounsfield units"
        )
    if modality == "MR" and darkest < _AIR_HU:
        return (
            f"this model is for MR{what}, but the input looks like a CT (its darkest 1 % is at {darkest:.0f}, air in Hounsfield "
            "units); the organs it finds are meaningless: use an MR image, or a CT model"
        )
    return None


def input_warnings(image: sitk.Image, modality: str | None, field_of_view: str, extent_mm: Sequence[float] | None) -> list[str]:
    """Warnings about an input image that does not look like the model's training images (a wrong modality
    too: it is only a warning once the run was forced past :func:`modality_mismatch`)."""
    warnings = []
    what = f" ({field_of_view})" if field_of_view else ""
    mismatch = modality_mismatch(image, modality, field_of_view)
    if mismatch:
        warnings.append(f"warning: {mismatch} (segmented anyway: --force)")
    if extent_mm:
        extent = np.asarray(image.GetSize(), float) * np.asarray(image.GetSpacing(), float)
        over = [axis for axis, (have, trained) in enumerate(zip(extent, extent_mm)) if have > EXTENT_FACTOR * float(trained)]
        if over:
            shown = " x ".join(f"{v:.0f}" for v in extent)
            trained = " x ".join(f"{float(v):.0f}" for v in extent_mm)
            warnings.append(
                f"warning: the input covers {shown} mm, far more than the images this model was trained on{what} "
                f"(at most {trained} mm); crop it to that region, or expect false organs elsewhere"
            )
    return warnings


def volume_warnings(volumes_ml: Mapping[str, float], ranges_ml: Mapping[str, Sequence[float] | None]) -> list[str]:
    """Warnings for predicted organ volumes far outside the training labels' range (a factor of 2)."""
    warnings = []
    for organ, volume in volumes_ml.items():
        bounds = ranges_ml.get(organ)
        if not bounds or volume <= 0:
            continue  # not found: legitimate where the organ lies outside the field of view
        low, high = float(bounds[0]), float(bounds[1])
        if volume > VOLUME_FACTOR * high or volume < low / VOLUME_FACTOR:
            warnings.append(
                f"warning: predicted {organ} volume {volume:.3g} ml is far outside the {low:.3g}-{high:.3g} ml of the training "
                "labels; check that the input fits the model (modality, field of view) before using this organ"
            )
    return warnings
