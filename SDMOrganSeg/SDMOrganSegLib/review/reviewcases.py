"""Reading ``segment`` output folders back for review: which cases a path holds, their metrics, and
everything one case needs to be shown (image, label map, contours; an SDM when it is chosen) as :class:`ComputedOutputs`,
the object the Slicer panel builds its nodes from, so the review page and ``snapshot`` show a case
through the same code as the panel (:meth:`SDMSegmentationLogic.create_nodes`).

Only reads: nothing is ever written into a reviewed folder. A case that cannot be shown (a missing or
unreadable file, files that disagree in grid, an input image that is gone) is listed with its reason
instead of stopping the others. No Slicer and no PyTorch here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk

from ..images.contours import iso_surfaces, level_tag, read_polydata
from ..common.errors import SDMOrganSegError
from ..common.files import safe_name

SUMMARY = "summary.json"
#: Volume suffixes ``segment`` writes (``--format nifti`` / ``nrrd``).
_SUFFIXES = (".nii.gz", ".nrrd")


@dataclass
class ReviewCase:
    """One output folder of ``segment`` (or of the batch script), as listed on the review page.

    ``error`` is the one-line reason a broken case cannot be shown (None when it can); ``metrics`` maps
    organ -> ``{"dice": .., "hd95": ..}`` from the case's ``metrics.csv`` or, where only a reference label
    map is named, the Dice computed from it.
    """

    name: str
    folder: Path
    summary: dict = field(default_factory=dict)
    image_path: Path | None = None
    volumes_ml: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    error: str | None = None

    @property
    def mean_dice(self) -> float | None:
        values = [m["dice"] for m in self.metrics.values() if math.isfinite(m.get("dice", math.nan))]
        return float(np.mean(values)) if values else None

    @property
    def organs(self) -> list[str]:
        return list(self.summary.get("organs", {}))


@dataclass
class CaseData:
    """What one case shows: its input image and the outputs, on the image's grid."""

    case: ReviewCase
    image: sitk.Image
    computed: Any  # mrmlsegmentation.ComputedOutputs


def find_cases(path: str | Path) -> list[ReviewCase]:
    """The cases under ``path``: a ``segment`` output folder, a folder of them (the batch script's output),
    worst first (lowest mean Dice) where metrics exist, then by name; broken cases last, with their reason.

    A missing path, a file, or a folder holding no case is an :class:`SDMOrganSegError`.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise SDMOrganSegError(f"{root} does not exist; give a folder written by 'sdmorganseg segment' or the batch script")
    if not root.is_dir():
        raise SDMOrganSegError(f"{root} is a file; give the folder 'sdmorganseg segment --out' wrote, or a folder of such folders")
    if (root / SUMMARY).is_file():
        folders = [root]
    else:
        try:
            folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError as error:
            raise SDMOrganSegError(f"cannot list {root}: {error.strerror or error}; check its permissions") from None
        folders = [p for p in folders if (p / SUMMARY).exists() or any(_volume(p, "labels"))]
    if not folders:
        raise SDMOrganSegError(
            f"{root} holds no segmentation outputs (no {SUMMARY} in it or in its sub-folders); "
            "give a folder written by 'sdmorganseg segment' or the batch script"
        )
    cases = [read_case(folder) for folder in folders]
    return rank_cases(cases)


def rank_cases(cases: Sequence[ReviewCase]) -> list[ReviewCase]:
    """Worst mean Dice first, then cases without metrics by name, then broken cases by name."""

    def key(case: ReviewCase) -> tuple:
        dice = case.mean_dice
        return (case.error is not None, dice is None, dice if dice is not None else 0.0, case.name)

    return sorted(cases, key=key)


def _volume(folder: Path, stem: str) -> list[Path]:
    return [folder / f"{stem}{suffix}" for suffix in _SUFFIXES if (folder / f"{stem}{suffix}").is_file()]


def _header(path: Path) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise SDMOrganSegError(f"{path.name} cannot be read (truncated or not an image)") from None
    return reader


def _grid(reader: sitk.ImageFileReader) -> tuple:
    return reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection()


def _grid_difference(a: tuple, b: tuple) -> str | None:
    names = ("size", "spacing", "origin", "direction")
    for name, first, second in zip(names, a, b):
        first, second = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
        # 1e-4 of the largest value: the tolerance SimpleITK's own filters use for "same physical space".
        scale = max(1.0, float(np.abs(first).max(initial=0)))
        if first.shape != second.shape or not np.allclose(first, second, atol=1e-4 * scale, rtol=0):
            return f"{name} {tuple(round(float(v), 4) for v in first)} vs {tuple(round(float(v), 4) for v in second)}"
    return None


def _input_path(folder: Path, summary: dict) -> Path | None:
    text = summary.get("input")
    if not text:
        return None
    path = Path(text).expanduser()
    if path.is_absolute():
        return path
    # Older runs recorded the path as typed; try it from here, then from the case folder and its parents.
    for base in (Path.cwd(), folder, *folder.parents):
        if (base / path).exists():
            return (base / path).resolve()
    return Path.cwd() / path


def read_case(folder: Path) -> ReviewCase:
    """A case's listing entry (summary, volumes, metrics) from its headers only; never raises: a case that
    cannot be shown gets ``error``."""
    case = ReviewCase(name=folder.name, folder=folder)
    try:
        _fill_case(case)
    except SDMOrganSegError as error:
        case.error = str(error)
    return case


def _fill_case(case: ReviewCase) -> None:
    folder = case.folder
    summary_path = folder / SUMMARY
    if not summary_path.is_file():
        raise SDMOrganSegError(f"no {SUMMARY} (not a complete 'segment' output)")
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise SDMOrganSegError(f"{SUMMARY} cannot be read ({type(error).__name__})") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("organs"), dict) or not summary["organs"]:
        raise SDMOrganSegError(f"{SUMMARY} names no organs (not written by 'sdmorganseg segment')")
    case.summary = summary
    case.volumes_ml = {name: float(organ.get("volume_ml", math.nan)) for name, organ in summary["organs"].items()}
    _read_metrics(case)
    labels = _volume(folder, "labels")
    if not labels:
        raise SDMOrganSegError("labels.nii.gz is missing")
    grid = _grid(_header(labels[0]))
    for organ in summary["organs"]:
        sdm = _volume(folder, f"sdm_{safe_name(organ)}")
        if not sdm:
            raise SDMOrganSegError(f"sdm_{safe_name(organ)}.nii.gz is missing")
        difference = _grid_difference(_grid(_header(sdm[0])), grid)
        if difference:
            raise SDMOrganSegError(f"{sdm[0].name} and {labels[0].name} disagree in grid ({difference})")
    case.image_path = _input_path(folder, summary)
    if case.image_path is None:
        raise SDMOrganSegError(f"{SUMMARY} does not name the input image")
    if not case.image_path.exists():
        raise SDMOrganSegError(f"its input image {case.image_path} is gone")
    if case.image_path.is_file():
        difference = _grid_difference(_grid(_header(case.image_path)), grid)
        if difference:
            raise SDMOrganSegError(f"the input image and {labels[0].name} disagree in grid ({difference})")


def _read_metrics(case: ReviewCase) -> None:
    metrics_csv = case.folder / "metrics.csv"
    if metrics_csv.is_file():
        from ..method.metrics import read_metrics_csv

        try:
            table = read_metrics_csv(metrics_csv)
        except SDMOrganSegError:
            return  # a damaged table only loses the ranking, not the case
        case.metrics = {
            name: {"dice": m.dice, "hd95": m.hd95} for name, m in table.items() if m.scored
        }
        return
    reference = case.summary.get("reference")
    if reference and Path(reference).is_file():
        labels = _volume(case.folder, "labels")
        try:
            ref = sitk.GetArrayFromImage(sitk.ReadImage(str(reference)))
            pred = sitk.GetArrayFromImage(sitk.ReadImage(str(labels[0]))) if labels else None
        except RuntimeError:
            return
        if pred is not None and pred.shape == ref.shape:
            case.metrics = {
                name: {"dice": dice(pred == int(o["label"]), ref == int(o["label"])), "hd95": math.nan}
                for name, o in case.summary["organs"].items()
            }


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; NaN when both are empty (nothing to score)."""
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 2.0 * int(np.count_nonzero(a & b)) / total if total else math.nan


def organ_specs(summary: dict) -> list:
    from ..mrml.mrmlsegmentation import OrganSpec

    return [
        OrganSpec(name, int(o["label"]), tuple(float(c) for c in o.get("color", (1.0, 1.0, 0.0))), str(o.get("terminology_entry", "")))
        for name, o in summary["organs"].items()
    ]


def load_case(case: ReviewCase) -> CaseData:
    """Read a listed case's image, label map and contours; raises :class:`SDMOrganSegError` with the reason.

    SDMs are read only where an organ's contour files are missing (its contours are then computed in
    memory; nothing is written): the page shows an SDM when it is chosen (:func:`read_sdm`), and a 9-organ
    CT's SDMs are 1.9 GB of float32 that take longer to inflate than everything else together.
    """
    from ..images.imageio import read_image
    from ..mrml.mrmlsegmentation import ComputedOutputs

    if case.error:
        raise SDMOrganSegError(f"case {case.name}: {case.error}")
    folder = case.folder
    organs = organ_specs(case.summary)
    levels = tuple(float(v) for v in case.summary.get("sdm_levels", (0.0, 0.1, 0.2, 0.3)))
    try:
        image = read_image(case.image_path, "input image")
        labels = sitk.ReadImage(str(_volume(folder, "labels")[0]))
        surfaces, sdms = {}, {}
        for organ in organs:
            files = {level: folder / "contours" / f"{safe_name(organ.name)}_{level_tag(level)}.vtp" for level in levels}
            if all(path.is_file() for path in files.values()):
                surfaces[organ.name] = {level: read_polydata(path) for level, path in files.items()}
            else:
                sdms[organ.name] = read_sdm(case, organ.name)
                surfaces[organ.name] = iso_surfaces(sdms[organ.name], levels)
    except (RuntimeError, IndexError) as error:
        raise SDMOrganSegError(f"case {case.name}: its files cannot be read ({str(error).strip().splitlines()[-1][:160]})") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise SDMOrganSegError(f"case {case.name}: the input image is not a scalar 3D volume")
    computed = ComputedOutputs(
        model_name=str(case.summary.get("model", "model")), device=str(case.summary.get("device", "")), organs=organs,
        labels=labels, sdms=sdms, surfaces=surfaces, levels=levels,
    )
    return CaseData(case, image, computed)


def read_sdm(case: ReviewCase, organ: str) -> sitk.Image:
    """One organ's SDM of a listed case, as float32 (its grid was checked when the case was listed)."""
    try:
        return sitk.ReadImage(str(_volume(case.folder, f"sdm_{safe_name(organ)}")[0]), sitk.sitkFloat32)
    except (RuntimeError, IndexError) as error:
        raise SDMOrganSegError(f"case {case.name}: the SDM of {organ} cannot be read ({str(error).strip().splitlines()[-1][:160]})") from None


def compare_dice(first: CaseData, second: CaseData) -> dict[str, float]:
    """Per-organ Dice between two runs' label maps of the same case (organs matched by name)."""
    a = sitk.GetArrayViewFromImage(first.computed.labels)
    b = sitk.GetArrayViewFromImage(second.computed.labels)
    if a.shape != b.shape:
        raise SDMOrganSegError(f"case {first.case.name}: the two runs' label maps have different sizes ({a.shape} vs {b.shape})")
    labels_b = {o.name: o.label for o in second.computed.organs}
    return {o.name: dice(a == o.label, b == labels_b[o.name]) for o in first.computed.organs if o.name in labels_b}


def largest_area_slice(labels: sitk.Image, axis: int) -> int:
    """Index along numpy ``axis`` (0 = k, 1 = j, 2 = i of the label map) of the slice with the most organ
    voxels; the middle slice when the map is empty."""
    array = sitk.GetArrayViewFromImage(labels)
    other = tuple(a for a in range(3) if a != axis)
    counts = np.count_nonzero(array, axis=other) if array.size else np.zeros(0)
    return int(np.argmax(counts)) if counts.size and counts.max() > 0 else array.shape[axis] // 2
