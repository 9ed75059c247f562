"""segment --format dicom-seg,rtstruct on a DICOM series made from a hippocampus fixture: the files are read
back with highdicom and pydicom and compared with the labels.nii.gz of the same run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import HIPPOCAMPUS, calibrated_model, write_dicom_series
from matplotlib.path import Path as PolygonPath
from scipy import ndimage
from test_segment_evaluate import run_cli

from SDMOrganSegLib.formats.dicomout import modifier, terminology
from SDMOrganSegLib.formats.modelfiles import Organ, read_card
from SDMOrganSegLib.formats.terminology import default_terminology

hd = pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")

IMAGE = HIPPOCAMPUS / "imagesTr" / "hippocampus_003.nii.gz"
CARD_CODE = {"category": ["91723000", "SCT", "Anatomical Structure"], "type": ["T-0001", "99SDMTEST", "Test structure"]}
ORGANS = [
    Organ("anterior hippocampus", 1, (0.85, 0.4, 0.3)),  # found in SNOMED CT as "Hippocampus"
    Organ("posterior hippocampus", 2, (0.35, 0.6, 0.85), CARD_CODE),  # the card's own code
    Organ("blob", 5, (0.45, 0.75, 0.35)),  # unknown: the generic code
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One segment run on the DICOM series, writing NIfTI, SEG and RTSTRUCT."""
    root = tmp_path_factory.mktemp("dicom")
    files = write_dicom_series(IMAGE, root / "series")
    model = calibrated_model(root / "model", "dicom-test", ORGANS, IMAGE, [0.06, 0.04, 0.02])
    out = root / "out"
    done = run_cli("segment", str(root / "series"), "--model", str(model), "--out", str(out), "--device", "cpu", "--quiet", "--format", "dicom-seg,rtstruct")
    assert done.returncode == 0, done.stderr
    labels = sitk.ReadImage(str(out / "labels.nii.gz"))
    sources = [pydicom.dcmread(str(f)) for f in files]
    return out, labels, sources, model


def test_terminology_codes():
    assert terminology(ORGANS[0]) == (("91723000", "SCT", "Anatomical Structure"), ("5366008", "SCT", "Hippocampus"))
    assert terminology(ORGANS[1]) == (tuple(CARD_CODE["category"]), tuple(CARD_CODE["type"]))
    assert terminology(ORGANS[2]) == (("85756007", "SCT", "Tissue"), ("85756007", "SCT", "Tissue"))
    assert terminology(Organ("spinal cord", 2, (1, 1, 1)))[1] == ("2748008", "SCT", "Spinal cord")
    assert terminology(Organ("kidney_left", 2, (1, 1, 1)))[1] == ("64033007", "SCT", "Kidney")
    # The side in the name is the laterality modifier; the card's modifier wins; none for a midline organ.
    assert modifier(Organ("kidney_left", 2, (1, 1, 1))) == ("7771000", "SCT", "Left")
    assert modifier(Organ("right parotid", 3, (1, 1, 1), default_terminology("right parotid"))) == ("24028007", "SCT", "Right")
    assert modifier(ORGANS[0]) is None and modifier(Organ("spinal cord", 2, (1, 1, 1))) is None


def test_outputs_are_listed_and_the_card_codes_survive(run):
    out, _labels, _sources, model = run
    summary = json.loads((out / "summary.json").read_text())
    assert {"labels.nii.gz", "seg.dcm", "rtstruct.dcm", "summary.json"} <= set(summary["outputs"])
    assert read_card(model).organs[1].terminology == CARD_CODE


def test_seg_masks_equal_the_label_map_and_reference_the_series(run):
    out, labels, sources, _model = run
    seg = hd.seg.segread(str(out / "seg.dcm"))
    first = sources[0]
    assert seg.StudyInstanceUID == first.StudyInstanceUID and seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert seg.PatientID == first.PatientID and seg.SeriesInstanceUID != first.SeriesInstanceUID
    assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [first.SeriesInstanceUID]
    referenced = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {s.SOPInstanceUID for s in sources}

    descriptions = [seg.get_segment_description(n) for n in seg.segment_numbers]
    assert [d.segment_label for d in descriptions] == [o.name for o in ORGANS]
    for description, organ in zip(descriptions, ORGANS):
        category, kind = terminology(organ)
        assert (description.segmented_property_category.value, description.segmented_property_category.scheme_designator) == category[:2]
        assert (description.segmented_property_type.value, description.segmented_property_type.meaning) == (kind[0], kind[2])
        rgb = np.asarray(hd.color.CIELabColor.from_dicom_value(description.RecommendedDisplayCIELabValue).to_rgb()) / 255
        np.testing.assert_allclose(rgb, organ.color, atol=1.5 / 255)

    # The frames in the order of the series' slices (ITK's z order): segment numbers -> label values.
    numbers = seg.get_pixels_by_source_instance(
        [s.SOPInstanceUID for s in sources], combine_segments=True, assert_missing_frames_are_empty=True
    )
    lookup = np.zeros(len(ORGANS) + 1, np.int64)
    lookup[1:] = [o.label for o in ORGANS]
    expected = sitk.GetArrayFromImage(labels)
    assert set(np.unique(expected)) == {0, 1, 2, 5}
    np.testing.assert_array_equal(lookup[numbers], expected)


def _rasterise(contours: list[np.ndarray], source, shape: tuple[int, int]) -> np.ndarray:
    """The even-odd fill of a slice's contours (patient mm) at its voxel centres."""
    origin = np.asarray(source.ImagePositionPatient, float)
    cosines = np.asarray(source.ImageOrientationPatient, float)
    row_spacing, column_spacing = (float(v) for v in source.PixelSpacing)
    rows, columns = np.mgrid[: shape[0], : shape[1]]
    centres = np.column_stack([columns.ravel(), rows.ravel()])
    filled = np.zeros(shape[0] * shape[1], bool)
    for points in contours:
        offsets = points - origin
        plane = np.column_stack([offsets @ cosines[:3] / column_spacing, offsets @ cosines[3:] / row_spacing])
        filled ^= PolygonPath(plane).contains_points(centres)
    return filled.reshape(shape)


def test_rtstruct_contours_match_the_label_map_within_one_voxel(run):
    out, labels, sources, _model = run
    rt = pydicom.dcmread(str(out / "rtstruct.dcm"))
    first = sources[0]
    assert rt.Modality == "RTSTRUCT" and rt.StudyInstanceUID == first.StudyInstanceUID and rt.PatientID == first.PatientID
    frame = rt.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == first.FrameOfReferenceUID
    series = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    assert [i.ReferencedSOPInstanceUID for i in series.ContourImageSequence] == [s.SOPInstanceUID for s in sources]

    by_uid = {s.SOPInstanceUID: index for index, s in enumerate(sources)}
    expected = sitk.GetArrayFromImage(labels)
    rois = {roi.ROINumber: roi for roi in rt.StructureSetROISequence}
    observations = {o.ReferencedROINumber: o for o in rt.RTROIObservationsSequence}
    assert [rois[c.ReferencedROINumber].ROIName for c in rt.ROIContourSequence] == [o.name for o in ORGANS]
    for contour_set, organ in zip(rt.ROIContourSequence, ORGANS):
        assert [int(v) for v in contour_set.ROIDisplayColor] == [round(255 * c) for c in organ.color]
        code = observations[contour_set.ReferencedROINumber].RTROIIdentificationCodeSequence[0]
        assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == terminology(organ)[1]
        per_slice: dict[int, list[np.ndarray]] = {}
        for contour in contour_set.ContourSequence:
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            index = by_uid[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
            points = np.asarray(contour.ContourData, float).reshape(-1, 3)
            assert len(points) == contour.NumberOfContourPoints
            source = sources[index]
            normal = np.cross(*np.asarray(source.ImageOrientationPatient, float).reshape(2, 3))
            # Every point lies in the plane of the slice it references.
            assert np.abs((points - np.asarray(source.ImagePositionPatient, float)) @ normal).max() < 1e-3
            per_slice.setdefault(index, []).append(points)
        mask = expected == organ.label
        assert set(per_slice) == set(np.flatnonzero(mask.any(axis=(1, 2))))
        filled = np.zeros_like(mask)
        for index, contours in per_slice.items():
            filled[index] = _rasterise(contours, sources[index], mask.shape[1:])
        # Any disagreement lies at the outline: a voxel whose in-plane neighbourhood holds both classes.
        ring = np.ones((1, 3, 3), bool)
        edge = ndimage.binary_dilation(mask, ring) & ~ndimage.binary_erosion(mask, ring, border_value=0)
        differ = filled != mask
        assert not (differ & ~edge).any()
        assert differ.sum() <= 0.02 * mask.sum(), (organ.name, int(differ.sum()), int(mask.sum()))


def test_dicom_format_needs_a_dicom_input(tmp_path):
    done = run_cli("segment", str(IMAGE), "--out", str(tmp_path / "out"), "--format", "dicom-seg")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "is not a DICOM series folder" in done.stderr and "--format nifti or nrrd" in done.stderr
    assert not (tmp_path / "out").exists()
    unknown = run_cli("segment", str(IMAGE), "--out", str(tmp_path / "out"), "--format", "nifti,dicom")
    assert unknown.returncode == 2 and "unknown format 'dicom'" in unknown.stderr
