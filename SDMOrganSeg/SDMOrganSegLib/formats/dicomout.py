"""DICOM outputs for a DICOM input: a Segmentation object (``seg.dcm``, written by highdicom) and an RT
Structure Set (``rtstruct.dcm``, written with pydicom), both in the input's study and frame of reference
and referencing every slice they lie on by its SOP Instance UID.

* The label map is on the input's grid, so slice ``k`` of it is file ``k`` of the series in the order ITK
  stacks them (:func:`SDMOrganSegLib.images.imageio.dicom_series_files`); :func:`read_series` checks that each
  file's Image Position (Patient) is where the volume puts slice ``k``.
* Segments and ROIs carry the organ's name and colour, and its terminology codes: the model card's
  ``terminology`` (``{"category": [code, scheme, meaning], "type": [...], "modifier": [...]}``) when it has
  one, else the SNOMED CT concept of that name in pydicom's code dictionary ("spinal cord", "liver"; a
  leading or trailing side such as "left" or "anterior" is dropped to find it, and "left"/"right" becomes
  the laterality modifier) under the category "Anatomical Structure", else the generic "Tissue" (SCT
  85756007) for both.
* Laterality (the card's ``modifier``, e.g. SCT 24028007 "Right") goes where each standard has a place for
  it: in SEG, the Segmented Property Type Modifier Code Sequence inside the segment's Segmented Property
  Type Code Sequence item (PS3.3 C.8.20.2); in RTSTRUCT, the same sequence inside the RT ROI Identification
  Code Sequence item of the ROI's observation (PS3.3 C.8.8.8), beside the Segmented Property Category Code
  Sequence of that observation.
* Organs without a voxel are left out of both (:func:`empty_organs`; the callers say so in the notes): an
  ROI without contours is an empty structure to a planning system, and rt-utils cannot read it.
* SEG: BINARY segments, one per organ found, in card order (segment number = position among them, not the
  label value), empty frames left out; reading it back with highdicom gives the label map voxel for voxel.
* RTSTRUCT: the input's Frame of Reference module (UID and Position Reference Indicator) and, per organ and
  slice, the outlines of the mask traced by contourpy at level 0.5, i.e. through the midpoints between
  inside and outside voxel centres, as CLOSED_PLANAR contours in patient (LPS) mm computed from that
  slice's own position, orientation and pixel spacing. Holes are contours inside contours (the even-odd
  rule reads them back); collinear points are dropped.
"""

from __future__ import annotations

import datetime
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk

from .. import __version__
from ..common.errors import SDMOrganSegError
from .modelfiles import Organ

MANUFACTURER = "SDMOrganSeg"
#: Series numbers of the new series (the input's own numbers are left to the scanner's).
SEG_SERIES_NUMBER, RTSTRUCT_SERIES_NUMBER = 901, 902
#: Category and type of an organ without a known code.
GENERIC_CATEGORY = ("85756007", "SCT", "Tissue")
GENERIC_TYPE = ("85756007", "SCT", "Tissue")
ANATOMICAL_STRUCTURE = ("91723000", "SCT", "Anatomical Structure")
#: Laterality modifiers (DICOM CID 244) for an organ whose name starts or ends with the side.
_SIDES = {"right": ("24028007", "SCT", "Right"), "r": ("24028007", "SCT", "Right"), "left": ("7771000", "SCT", "Left"), "l": ("7771000", "SCT", "Left")}
_QUALIFIERS = {"left", "right", "l", "r", "anterior", "posterior", "superior", "inferior", "upper", "lower", "middle", "lobe"}
#: Largest distance (mm) allowed between a file's Image Position (Patient) and where the volume puts its slice.
_POSITION_TOLERANCE_MM = 0.01


def read_series(files: Sequence[Path], image: sitk.Image) -> list[Any]:
    """The headers of the series ``image`` was read from (``files`` in ITK's order), checked to line up with it."""
    import pydicom

    if len(files) != image.GetSize()[2]:
        raise SDMOrganSegError(f"the DICOM series has {len(files)} files for {image.GetSize()[2]} slices; give a folder holding one complete series")
    datasets = []
    for index, path in enumerate(files):
        try:
            dataset = pydicom.dcmread(str(path), stop_before_pixels=True)
        except (OSError, pydicom.errors.InvalidDicomError) as error:
            raise SDMOrganSegError(f"cannot read the DICOM file {path}: {error}") from None
        where = np.asarray(image.TransformIndexToPhysicalPoint((0, 0, index)))
        position = np.asarray(getattr(dataset, "ImagePositionPatient", [np.nan] * 3), dtype=float)
        if not np.all(np.abs(where - position) <= _POSITION_TOLERANCE_MM):
            raise SDMOrganSegError(
                f"{path} lies at {tuple(position)} mm but slice {index} of the volume read from its series at {tuple(where.round(3))}; "
                "the series is not a regular stack of slices, which the DICOM outputs need"
            )
        datasets.append(dataset)
    return datasets


def _keyword_index() -> dict[str, str]:
    from pydicom.sr.codedict import codes

    return {keyword.lower(): keyword for keyword in codes.SCT.dir()}


def terminology(organ: Organ) -> tuple[tuple[str, str, str], tuple[str, str, str]]:
    """``(category, type)``, each ``(code value, scheme designator, meaning)``: the card's, else SNOMED CT's
    concept of the organ's name (see the module docstring), else the generic "Tissue"."""
    return terminology_codes(organ)[:2]  # type: ignore[return-value]


def modifier(organ: Organ) -> tuple[str, str, str] | None:
    """The organ's type modifier (laterality): the card's, else the side its name starts or ends with."""
    return terminology_codes(organ)[2]


def terminology_codes(organ: Organ) -> tuple[tuple[str, str, str], tuple[str, str, str], tuple[str, str, str] | None]:
    """``(category, type, modifier or None)``, as :func:`terminology` and :func:`modifier`."""
    given = organ.terminology or {}
    if given.get("category") and given.get("type"):
        category, kind = (tuple(str(v) for v in given[key]) for key in ("category", "type"))
        side = tuple(str(v) for v in given["modifier"]) if given.get("modifier") else None
        if len(category) == 3 and len(kind) == 3 and (side is None or len(side) == 3):
            return category, kind, side  # type: ignore[return-value]
        raise SDMOrganSegError(f"the terminology of {organ.name} in the model card must be [code, scheme, meaning] lists")
    from pydicom.sr.codedict import codes

    index = _keyword_index()
    words = [w for w in re.split(r"[^a-z0-9]+", organ.name.lower()) if w]
    side = next((_SIDES[w] for w in (words[:1] + words[-1:]) if w in _SIDES), None) if len(words) > 1 else None
    candidates = [words]
    core = list(words)
    while core and core[0] in _QUALIFIERS:
        core = core[1:]
    while core and (core[-1] in _QUALIFIERS or core[-1].isdigit()):
        core = core[:-1]
    candidates.append(core)
    for candidate in candidates:
        keyword = index.get("".join(candidate))
        if keyword:
            code = getattr(codes.SCT, keyword)
            return ANATOMICAL_STRUCTURE, (str(code.value), str(code.scheme_designator), str(code.meaning)), side
    return GENERIC_CATEGORY, GENERIC_TYPE, None


def empty_organs(labels: sitk.Image, organs: Sequence[Organ]) -> list[Organ]:
    """The organs with no voxel in ``labels``: left out of seg.dcm and rtstruct.dcm."""
    present = set(np.unique(sitk.GetArrayViewFromImage(labels)).tolist())
    return [organ for organ in organs if organ.label not in present]


def empty_organs_note(labels: sitk.Image, organs: Sequence[Organ], files: Sequence[str]) -> str | None:
    """The note for the organs a DICOM output leaves out (None when every organ was found)."""
    missing = empty_organs(labels, organs)
    if not missing or not files:
        return None
    return (f"no voxel of {', '.join(o.name for o in missing)}: left out of {' and '.join(files)} "
            "(a structure without contours would import as an empty structure)")


def _present_organs(labels: sitk.Image, organs: Sequence[Organ], what: str) -> list[Organ]:
    missing = {organ.label for organ in empty_organs(labels, organs)}
    present = [organ for organ in organs if organ.label not in missing]
    if not present:
        raise SDMOrganSegError(f"no organ was found in this image, so {what} would be empty; check the input and the model (see the notes)")
    return present


def _rgb255(color: Sequence[float]) -> list[int]:
    return [int(round(255 * min(max(float(c), 0.0), 1.0))) for c in color]


def write_dicom_seg(labels: sitk.Image, organs: Sequence[Organ], series: Sequence[Any], path: str | Path, model_name: str) -> None:
    """A DICOM Segmentation of ``labels`` (on the series' grid) with one BINARY segment per organ."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    organs = _present_organs(labels, organs, "the DICOM Segmentation")
    array = sitk.GetArrayViewFromImage(labels)
    numbers = np.zeros(array.shape, np.uint8 if len(organs) < 256 else np.uint16)
    descriptions = []
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"{MANUFACTURER} {model_name}"[:64], family=codes.cid7162.ArtificialIntelligence, version=__version__
    )
    for number, organ in enumerate(organs, start=1):
        numbers[array == organ.label] = number
        category, kind, side = terminology_codes(organ)
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=organ.name[:64],
            segmented_property_category=hd.sr.CodedConcept(*category),
            segmented_property_type=hd.sr.CodedConcept(*kind),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=hd.UID(),
            tracking_id=organ.name[:64],
            display_color=hd.color.CIELabColor.from_rgb(*_rgb255(organ.color)),
        )
        if side:  # highdicom has no argument for it: the standard's place, inside the type's item
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [hd.sr.CodedConcept(*side)]
        descriptions.append(description)
    try:
        segmentation = _segmentation(hd, series, numbers, descriptions, model_name)
    except (ValueError, AttributeError) as error:  # highdicom's checks of the source series
        raise SDMOrganSegError(f"cannot make a DICOM Segmentation for this series: {' '.join(str(error).split())}") from None
    segmentation.save_as(str(path))


def _segmentation(hd: Any, series: Sequence[Any], numbers: np.ndarray, descriptions: list, model_name: str) -> Any:
    return hd.seg.Segmentation(
        source_images=list(series),
        pixel_array=numbers,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=model_name[:64],
        software_versions=f"{MANUFACTURER} {__version__}",
        device_serial_number="0",
        series_description=f"{MANUFACTURER} {model_name}"[:64],
        content_description=f"{MANUFACTURER} segmentation, model {model_name}"[:64],
    )


def _outlines(mask: np.ndarray) -> list[np.ndarray]:
    """Closed outlines ``(N, 2)`` of a 2D mask as (column, row) voxel coordinates, at level 0.5 (midway
    between inside and outside voxel centres), without the repeated end point or collinear points."""
    import contourpy

    padded = np.pad(mask.astype(np.float32), 1)  # a mask touching the border still gets closed outlines
    generator = contourpy.contour_generator(z=padded, line_type=contourpy.LineType.Separate, corner_mask=False)
    outlines = []
    for line in generator.lines(0.5):
        points = np.asarray(line, dtype=np.float64)[:-1] - 1.0  # closed lines repeat their first point
        following, previous = np.roll(points, -1, axis=0), np.roll(points, 1, axis=0)
        turn = (points - previous)[:, 0] * (following - points)[:, 1] - (points - previous)[:, 1] * (following - points)[:, 0]
        points = points[np.abs(turn) > 1e-9]
        if len(points) >= 3:
            outlines.append(points)
    return outlines


def _now() -> tuple[str, str]:
    now = datetime.datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


def write_rtstruct(labels: sitk.Image, organs: Sequence[Organ], series: Sequence[Any], path: str | Path, model_name: str) -> None:
    """An RT Structure Set with one ROI per organ: the outlines of its mask on every slice it lies on."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, RTStructureSetStorage, generate_uid

    first = series[0]
    date, time = _now()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTStructureSetStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = pydicom.FileDataset(str(path), Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID, ds.SOPInstanceUID = RTStructureSetStorage, meta.MediaStorageSOPInstanceUID
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    # Patient and study: the input's.
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate", "StudyTime",
                    "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription"):
        setattr(ds, keyword, getattr(first, keyword, ""))
    # Frame of Reference module: the input's (dciodvfy requires it in an RT Structure Set).
    ds.FrameOfReferenceUID = first.FrameOfReferenceUID
    ds.PositionReferenceIndicator = getattr(first, "PositionReferenceIndicator", "")
    # RT series and equipment.
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID, ds.SeriesNumber = generate_uid(), RTSTRUCT_SERIES_NUMBER
    ds.SeriesDescription = f"{MANUFACTURER} {model_name}"[:64]
    ds.OperatorsName = ""
    ds.Manufacturer, ds.ManufacturerModelName = MANUFACTURER, model_name[:64]
    ds.SoftwareVersions = f"{MANUFACTURER} {__version__}"
    # Structure set: what it refers to.
    ds.StructureSetLabel = MANUFACTURER
    ds.StructureSetName = model_name[:64]
    ds.StructureSetDate, ds.StructureSetTime = date, time
    images = [_reference(item) for item in series]
    referenced_series = Dataset()
    referenced_series.SeriesInstanceUID = first.SeriesInstanceUID
    referenced_series.ContourImageSequence = DicomSequence(images)
    referenced_study = Dataset()
    referenced_study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Study Component Management, as DICOM RT asks
    referenced_study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    referenced_study.RTReferencedSeriesSequence = DicomSequence([referenced_series])
    frame = Dataset()
    frame.FrameOfReferenceUID = first.FrameOfReferenceUID
    frame.RTReferencedStudySequence = DicomSequence([referenced_study])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame])

    organs = _present_organs(labels, organs, "the RT Structure Set")
    array = sitk.GetArrayViewFromImage(labels)
    rois, contours, observations = [], [], []
    for number, organ in enumerate(organs, start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = first.FrameOfReferenceUID
        roi.ROIName = organ.name[:64]
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIGenerationDescription = f"{MANUFACTURER} {__version__}, model {model_name}"[:64]
        rois.append(roi)
        contour = Dataset()
        contour.ReferencedROINumber = number
        contour.ROIDisplayColor = _rgb255(organ.color)
        contour.ContourSequence = DicomSequence(_slice_contours(array == organ.label, series, images))
        contours.append(contour)
        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.RTROIInterpretedType = "ORGAN"
        observation.ROIInterpreter = ""
        category, kind, side = terminology_codes(organ)
        observation.SegmentedPropertyCategoryCodeSequence = DicomSequence([_code(category)])
        code = _code(kind)
        if side:
            code.SegmentedPropertyTypeModifierCodeSequence = DicomSequence([_code(side)])
        observation.RTROIIdentificationCodeSequence = DicomSequence([code])
        observations.append(observation)
    ds.StructureSetROISequence = DicomSequence(rois)
    ds.ROIContourSequence = DicomSequence(contours)
    ds.RTROIObservationsSequence = DicomSequence(observations)
    ds.ApprovalStatus = "UNAPPROVED"
    ds.save_as(str(path), enforce_file_format=True)


def _code(triplet: Sequence[str]) -> Any:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = triplet
    return item


def _reference(dataset: Any) -> Any:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.ReferencedSOPClassUID = dataset.SOPClassUID
    item.ReferencedSOPInstanceUID = dataset.SOPInstanceUID
    return item


def _slice_contours(mask: np.ndarray, series: Sequence[Any], images: Sequence[Any]) -> list[Any]:
    """CLOSED_PLANAR contour items of a ``(z, y, x)`` mask, each in the plane of its slice's file."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    items = []
    for index in np.flatnonzero(mask.any(axis=(1, 2))):
        dataset = series[index]
        origin = np.asarray(dataset.ImagePositionPatient, dtype=np.float64)
        orientation = np.asarray(dataset.ImageOrientationPatient, dtype=np.float64)
        row_spacing, column_spacing = (float(v) for v in dataset.PixelSpacing)
        # Column index moves along the row direction (first three cosines), row index along the column direction.
        steps = np.stack([orientation[:3] * column_spacing, orientation[3:] * row_spacing])
        for outline in _outlines(mask[index]):
            points = origin + outline @ steps
            item = Dataset()
            item.ContourImageSequence = DicomSequence([images[index]])
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(points)
            item.ContourData = [round(float(v), 4) for v in points.ravel()]
            items.append(item)
    return items


def series_of(folder: str | Path, image: sitk.Image) -> list[Any]:
    """The headers of the DICOM series in ``folder``, which ``image`` was read from, in its slice order."""
    from ..images.imageio import dicom_series_files

    return read_series(dicom_series_files(folder), image)


#: ``--format`` value -> ``write(labels, organs, series, path, model_name)``.
WRITERS = {"dicom-seg": write_dicom_seg, "rtstruct": write_rtstruct}
