"""Training data: pairing images with label maps, checking them, and caching the preprocessed cases.

A data folder holds images and label maps with the same file names, in ``imagesTr/`` + ``labelsTr/``
(Medical Segmentation Decathlon layout) or ``images/`` + ``labels/``, as NIfTI or NRRD. An optional
``labels.json`` (``{"labels": {"1": "name", ...}}``) names the organs. An optional ``annotations.json``
(``{"case name": ["organ name", ...], ...}``) says which organs were contoured in each case, for partially
annotated data: an organ missing from a case's list is *unknown* there (not contoured), not absent, and
the trainer gives that channel of that case no loss and no metric. Without the file every organ counts as
annotated in every case.

Two other layouts are read through their ``dataset.json`` (:func:`dataset_json_cases`,
:func:`dataset_json_label_names`): an nnU-Net v2 raw dataset (``channel_names``, ``labels`` as
``{"name": value}``, ``file_ending``; images ``imagesTr/CASE_0000.nii.gz``, label maps
``labelsTr/CASE.nii.gz``) and a Medical Segmentation Decathlon task folder (``training``: a list of
``{"image": ..., "label": ...}`` pairs; ``labels`` as ``{"value": "name"}``). SDMOrganSeg's network takes
one input channel, so a dataset with several (``channel_names`` or ``modality`` with more than one entry)
is refused.

Each case is read once: checked (same geometry, whole-number labels, known label values), resampled to
the target spacing when one is asked for, intensity-normalised, and its ground-truth SDMs computed. The
result is kept in a ``.npz`` cache keyed by the source files and the settings, so later runs and resumed
runs skip the work.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from ..common.errors import SDMOrganSegError
from ..common.files import atomic_path, read_json_object, safe_name
from ..images.imageio import case_name, check_volume, geometry_mismatch, is_image_file, label_array, read_image
from ..method.preprocessing import needs_resampling, normalize_intensity, resample_like, resample_to_spacing
from ..method.sdm import label_map_to_sdms

_LAYOUTS = (("imagesTr", "labelsTr"), ("images", "labels"))
CACHE_VERSION = 1


@dataclass(frozen=True)
class CasePaths:
    name: str
    image: Path
    label: Path


@dataclass
class PreparedCase:
    """A case ready for training: arrays ``(z, y, x)`` at the training spacing."""

    name: str
    image: np.ndarray  #: float32, normalised intensities
    labels: np.ndarray  #: uint8/uint16 label map
    sdms: np.ndarray  #: float32 ``(organs, z, y, x)`` normalised SDMs
    spacing: tuple[float, float, float]  #: (x, y, z) mm
    annotated: np.ndarray | None = None  #: bool ``(organs,)``: organs contoured in this case; None: all


def find_cases(data_dir: str | Path) -> list[CasePaths]:
    """Image/label pairs of a data folder, sorted by name; errors name what is missing."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise SDMOrganSegError(f"training data folder {data_dir} does not exist")
    listed = dataset_json_cases(data_dir)
    if listed is not None:
        return listed
    for images_name, labels_name in _LAYOUTS:
        images, labels = data_dir / images_name, data_dir / labels_name
        if images.is_dir() and labels.is_dir():
            break
    else:
        raise SDMOrganSegError(
            f"{data_dir} must hold images and label maps in imagesTr/ + labelsTr/ (or images/ + labels/), with the same file names"
        )
    cases = []
    for image in sorted(p for p in images.iterdir() if is_image_file(p) and not p.name.startswith(".")):
        label = labels / image.name
        if not label.is_file():
            raise SDMOrganSegError(f"image {image.name} has no label map {label}; add it or remove the image")
        cases.append(CasePaths(case_name(image), image, label))
    if not cases:
        raise SDMOrganSegError(f"no NIfTI/NRRD images found in {images}")
    return cases


def check_case_headers(cases: Sequence[CasePaths]) -> None:
    """Refuse, from the file headers alone (fast, before any preprocessing), a case whose image and label
    map lie on different voxel grids. Unreadable files are left to :func:`prepare_case` to report."""
    from ..images import imageio

    for case in cases:
        readers = []
        for path in (case.image, case.label):
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            try:
                with imageio._native_messages():
                    reader.ReadImageInformation()
            except RuntimeError:
                break
            readers.append(reader)
        else:
            mismatch = geometry_mismatch(*readers)
            if mismatch:
                raise SDMOrganSegError(f"case {case.name}: image and label map differ in {mismatch}; they must share one voxel grid")


def read_label_names(data_dir: str | Path) -> dict[int, str] | None:
    """``{label value: name}`` from ``labels.json`` in the data folder, else from its nnU-Net/MSD
    ``dataset.json``; None when there is neither."""
    path = Path(data_dir) / "labels.json"
    if not path.is_file():
        return dataset_json_label_names(data_dir)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
        mapping = values.get("labels", values)
        names = {int(k): str(v) for k, v in mapping.items() if int(k) != 0}
    except (ValueError, AttributeError, json.JSONDecodeError) as error:
        raise SDMOrganSegError(f"{path} is not a labels file ({error}); expected {{\"labels\": {{\"1\": \"organ\", ...}}}}") from None
    return names


def read_annotations(data_dir: str | Path, organ_names: Sequence[str], case_names: Sequence[str]) -> dict[str, np.ndarray] | None:
    """Per case, a bool array ``(organs,)`` of the organs contoured in it, from ``annotations.json`` in the
    data folder; None when there is no such file (every organ annotated everywhere).

    Organ names must be those of ``labels.json``; a case missing from the file is refused, since silently
    treating it as unannotated (or as fully annotated) would both be wrong.
    """
    path = Path(data_dir) / "annotations.json"
    if not path.is_file():
        return None
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(values, dict) or not all(isinstance(v, list) for v in values.values()):
            raise ValueError("expected an object of lists")
    except (OSError, ValueError) as error:
        raise SDMOrganSegError(f"{path} is not an annotations file ({error}); expected {{\"case\": [\"organ\", ...]}}") from None
    index = {name: i for i, name in enumerate(organ_names)}
    result = {}
    for case in case_names:
        if case not in values:
            raise SDMOrganSegError(f"{path} does not list case {case}; list the organs contoured in it (an empty list if none)")
        unknown = sorted(set(values[case]) - set(index))
        if unknown:
            raise SDMOrganSegError(f"{path}: case {case} names organs {unknown} that labels.json does not have; use the names of labels.json")
        flags = np.zeros(len(organ_names), bool)
        flags[[index[name] for name in values[case]]] = True
        result[case] = flags
    return result
DATASET_JSON = "dataset.json"


def _dataset_json(data_dir: Path) -> dict[str, Any] | None:
    """The data folder's ``dataset.json`` (nnU-Net v2 or MSD), checked to describe one input channel."""
    path = data_dir / DATASET_JSON
    if not path.is_file():
        return None
    values = read_json_object(path, str(path), "it must be an nnU-Net v2 or Medical Segmentation Decathlon dataset.json")
    channels = values.get("channel_names", values.get("modality"))
    if isinstance(channels, dict) and len(channels) > 1:
        listed = ", ".join(f"{key}: {name}" for key, name in channels.items())
        raise SDMOrganSegError(
            f"{path} describes {len(channels)} input channels ({listed}); SDMOrganSeg trains on single-channel images: "
            "make a dataset with one channel"
        )
    return values


def dataset_json_cases(data_dir: str | Path) -> list[CasePaths] | None:
    """Image/label pairs listed by an nnU-Net v2 or MSD ``dataset.json``; None when the folder has none.

    MSD: the ``training`` pairs (paths relative to the folder). nnU-Net v2: its ``dataset`` entries when
    given, else ``imagesTr/CASE_0000<file_ending>`` with ``labelsTr/CASE<file_ending>``.
    """
    data_dir = Path(data_dir)
    values = _dataset_json(data_dir)
    if values is None:
        return None
    source = data_dir / DATASET_JSON
    pairs: list[tuple[str, Path, Path]] = []
    try:
        if isinstance(values.get("training"), list):  # MSD
            for entry in values["training"]:
                image, label = data_dir / entry["image"], data_dir / entry["label"]
                pairs.append((case_name(image), image, label))
        elif isinstance(values.get("dataset"), dict):  # nnU-Net v2 with explicit file lists
            for name, entry in values["dataset"].items():
                images = entry["images"]
                if len(images) != 1:
                    raise SDMOrganSegError(f"{source}: case {name} has {len(images)} images; SDMOrganSeg trains on single-channel images")
                pairs.append((str(name), data_dir / images[0], data_dir / entry["label"]))
        elif "channel_names" in values:  # nnU-Net v2 raw dataset
            ending = str(values.get("file_ending", ".nii.gz"))
            images_dir, labels_dir = data_dir / "imagesTr", data_dir / "labelsTr"
            if not images_dir.is_dir() or not labels_dir.is_dir():
                raise SDMOrganSegError(f"{data_dir} has an nnU-Net dataset.json but no imagesTr/ and labelsTr/ folders")
            suffix = "_0000" + ending
            for image in sorted(p for p in images_dir.iterdir() if p.name.endswith(suffix) and not p.name.startswith(".")):
                name = image.name[: -len(suffix)]
                pairs.append((name, image, labels_dir / f"{name}{ending}"))
            if not pairs:
                raise SDMOrganSegError(f"no images named CASE_0000{ending} in {images_dir} (nnU-Net v2 naming)")
        else:
            raise SDMOrganSegError(f"{source} has neither 'training' pairs (MSD) nor 'channel_names' (nnU-Net v2); it is not a dataset description SDMOrganSeg reads")
    except (KeyError, TypeError, AttributeError) as error:
        raise SDMOrganSegError(f"{source} is malformed ({type(error).__name__}: {error}); fix it or remove it") from None
    cases = []
    for name, image, label in pairs:
        for path, what in ((image, "image"), (label, "label map")):
            if not path.is_file():
                raise SDMOrganSegError(f"case {name}: the {what} {path} listed by {source} does not exist; add it or fix dataset.json")
        cases.append(CasePaths(name, image, label))
    if not cases:
        raise SDMOrganSegError(f"{source} lists no training cases")
    return sorted(cases, key=lambda case: case.name)


def dataset_json_label_names(data_dir: str | Path) -> dict[int, str] | None:
    """``{label value: name}`` from an nnU-Net v2 (``{"name": value}``) or MSD (``{"value": "name"}``)
    ``dataset.json``, background left out; None when the folder has none."""
    values = _dataset_json(Path(data_dir))
    if values is None:
        return None
    source = Path(data_dir) / DATASET_JSON
    labels = values.get("labels")
    if not isinstance(labels, dict):
        raise SDMOrganSegError(f"{source} has no 'labels' object naming the label values")
    names: dict[int, str] = {}
    for key, value in labels.items():
        if isinstance(value, (list, dict)):
            raise SDMOrganSegError(f"{source} has region-based label {key!r} ({value}); SDMOrganSeg needs one value per organ")
        try:
            # nnU-Net v2 maps names to values, MSD values (as text) to names.
            number, name = (int(value), str(key)) if "channel_names" in values else (int(key), str(value))
        except (TypeError, ValueError):
            raise SDMOrganSegError(f"{source} has label {key!r}: {value!r}, not a whole-number value and a name") from None
        if "channel_names" in values and name == "ignore":
            raise SDMOrganSegError(f"{source} has nnU-Net's 'ignore' label ({number}) for unannotated voxels; SDMOrganSeg does not train with it")
        if number != 0:
            names[number] = name
    return names


def _cache_key(case: CasePaths, settings: Mapping[str, Any]) -> str:
    digest = hashlib.sha256()
    for path in (case.image, case.label):
        stat = path.stat()
        digest.update(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    digest.update(json.dumps({**settings, "version": CACHE_VERSION}, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def read_case_arrays(
    case: CasePaths, label_values: Sequence[int], spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Read, check and resample a case: its image as float32 ``(z, y, x)`` (intensities as stored), its label
    map (uint8, uint16 above 255 labels) and its spacing ``(x, y, z)`` mm."""
    image = read_image(case.image, "training image")
    check_volume(image, "training image", case.image)
    label_image = read_image(case.label, "label map")
    mismatch = geometry_mismatch(image, label_image)
    if mismatch:
        raise SDMOrganSegError(f"case {case.name}: image and label map differ in {mismatch}; they must share one voxel grid")
    labels = label_array(label_image, case.label)
    unknown = sorted(set(np.unique(labels).tolist()) - {0} - set(label_values))
    if unknown:
        raise SDMOrganSegError(
            f"case {case.name}: label values {unknown} are not among the organs {list(label_values)}; fix the label map or list them in labels.json"
        )
    if needs_resampling(image, spacing):
        image = resample_to_spacing(sitk.Cast(image, sitk.sitkFloat32), spacing)
        label_image = sitk.GetImageFromArray(labels.astype(np.uint16))
        label_image.CopyInformation(read_image(case.label, "label map"))
        labels = sitk.GetArrayFromImage(resample_like(label_image, image, sitk.sitkNearestNeighbor))
    dtype = np.uint8 if max(label_values, default=0) < 256 else np.uint16
    actual_spacing = tuple(float(s) for s in image.GetSpacing())
    return sitk.GetArrayFromImage(image).astype(np.float32, copy=False), labels.astype(dtype), actual_spacing


def prepare_case(
    case: CasePaths,
    label_values: Sequence[int],
    intensity: Mapping[str, Any],
    spacing: Sequence[float] | None = None,
    sdm: Mapping[str, Any] | None = None,
) -> PreparedCase:
    """Read, check, resample, normalise a case and compute its ground-truth SDMs.

    ``sdm`` holds the SDM normalisation, ``{"normalization": "paper" | "clip" | "tanh", "scale_mm": s}``
    (default the paper's).
    """
    image, labels, actual_spacing = read_case_arrays(case, label_values, spacing)
    normalised = normalize_intensity(image, intensity)
    sdm = dict(sdm or {})
    sdms = label_map_to_sdms(labels, label_values, actual_spacing, sdm.get("normalization", "paper"), float(sdm.get("scale_mm", 5.0)))
    return PreparedCase(case.name, normalised, labels, sdms, actual_spacing)


def load_cases(
    cases: Sequence[CasePaths],
    label_values: Sequence[int],
    intensity: Mapping[str, Any],
    spacing: Sequence[float] | None,
    cache_dir: Path | None,
    sdm: Mapping[str, Any] | None = None,
    sdm_dtype: Any = np.float32,
) -> list[PreparedCase]:
    """:func:`prepare_case` for each case, through the on-disk cache when ``cache_dir`` is given; the SDMs
    are kept as ``sdm_dtype`` (the cache always holds float32)."""
    settings: dict[str, Any] = {"labels": list(label_values), "intensity": dict(intensity), "spacing": list(spacing) if spacing else None}
    if sdm and sdm.get("normalization", "paper") != "paper":
        settings["sdm"] = dict(sdm)  # paper-normalised caches keep the keys they always had
    prepared = []
    for case in cases:
        cached = cache_dir / f"{safe_name(case.name)}-{_cache_key(case, settings)}.npz" if cache_dir else None
        if cached and cached.is_file():
            with np.load(cached) as data:
                item = PreparedCase(case.name, data["image"], data["labels"], data["sdms"], tuple(data["spacing"].tolist()))
        else:
            item = prepare_case(case, label_values, intensity, spacing, sdm)
            if cached:
                with atomic_path(cached) as temporary:
                    with open(temporary, "wb") as handle:
                        np.savez(handle, image=item.image, labels=item.labels, sdms=item.sdms, spacing=np.asarray(item.spacing))
        item.sdms = item.sdms.astype(sdm_dtype, copy=False)
        prepared.append(item)
    return prepared


def make_split(names: Sequence[str], validation_fraction: float, seed: int) -> dict[str, list[str]]:
    """A seeded random split of case names (sorted first, so it doesn't depend on listing order)."""
    import random

    order = sorted(names)
    random.Random(seed).shuffle(order)
    count = max(1, int(round(len(order) * validation_fraction))) if len(order) > 1 else 0
    return {"train": sorted(order[count:]), "validation": sorted(order[:count])}


def read_split(path: str | Path, names: Sequence[str]) -> dict[str, list[str]]:
    """A split file (``{"train": [...], "validation": [...]}``), checked against the available cases."""
    path = Path(path)
    try:
        split = json.loads(path.read_text(encoding="utf-8"))
        train, validation = list(split["train"]), list(split["validation"])
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as error:
        raise SDMOrganSegError(f"split file {path} must be JSON with 'train' and 'validation' lists ({error})") from None
    missing = sorted(set(train + validation) - set(names))
    if missing:
        raise SDMOrganSegError(f"split file {path} names cases not in the data folder: {', '.join(missing[:5])}")
    if set(train) & set(validation):
        raise SDMOrganSegError(f"split file {path} puts some cases in both train and validation")
    return {"train": train, "validation": validation}
