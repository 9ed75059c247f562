"""seg.dcm and rtstruct.dcm of a DICOM CT series, checked by third-party readers: David Clunie's dciodvfy
(dicom3tools) finds no error and no attribute outside the standard, dcmqi's segimage2itkimage (as Slicer's
QuantitativeReporting reads SEG) and rt-utils read back every organ with its name, voxels, code and
laterality, and an organ without voxels is left out of both files.

The label map is drawn directly (no network), with the head-and-neck model card's organs and codes, so these
checks need neither PyTorch nor a model run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import write_dicom_series

from SDMOrganSegLib.formats import dicomout
from SDMOrganSegLib.formats.modelfiles import read_card, shipped_models

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("highdicom")

RIGHT, LEFT = ("24028007", "SCT", "Right"), ("7771000", "SCT", "Left")
#: Label value -> (z, y, x) box of the phantom; the head-and-neck card's labels. Brainstem (1) is left empty.
BOXES = {
    2: (slice(2, 10), slice(25, 30), slice(20, 26)),  # spinal cord, posterior
    3: (slice(3, 9), slice(10, 20), slice(6, 16)),  # right parotid: patient right is low x in LPS
    4: (slice(3, 9), slice(10, 20), slice(32, 42)),  # left parotid
    7: (slice(1, 4), slice(4, 12), slice(14, 34)),  # mandible, with a hole on one slice
}


def _tool(name: str) -> str | None:
    """A command-line tool of this Python's environment (dicom3tools and dcmqi install them beside it)."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.is_file() else shutil.which(name)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("conformance")
    # Square slices: rt-utils 1.2.7 shapes its masks (Columns, Rows) but fills them (row, column).
    ct = np.full((12, 48, 48), -1000, np.int16)
    ct[:, 3:44, 3:45] = 40  # soft tissue inside air
    image = sitk.GetImageFromArray(ct)
    image.SetSpacing((0.9, 0.9, 2.5))
    image.SetOrigin((-20.0, -15.0, 30.0))
    sitk.WriteImage(image, str(root / "ct.nii.gz"))
    files = write_dicom_series(root / "ct.nii.gz", root / "series", modality="CT")
    label_array = np.zeros(ct.shape, np.uint8)
    for label, box in BOXES.items():
        label_array[box] = label
    label_array[2, 6:11, 20:27] = 0  # a hole: an outline inside an outline
    labels = sitk.GetImageFromArray(label_array)
    labels.CopyInformation(image)
    card = read_card(shipped_models()["headneck-oar"])
    series = dicomout.series_of(root / "series", sitk.ReadImage(str(root / "ct.nii.gz")))
    dicomout.write_dicom_seg(labels, card.organs, series, root / "seg.dcm", model_name=card.name)
    dicomout.write_rtstruct(labels, card.organs, series, root / "rtstruct.dcm", model_name=card.name)
    present = [organ for organ in card.organs if organ.label in BOXES]
    return root, labels, present, card.organs, files


def _expected_side(organ) -> tuple[str, str, str] | None:
    return {"right parotid": RIGHT, "left parotid": LEFT}.get(organ.name)


def _triplet(item) -> tuple[str, str, str]:
    return (str(item.CodeValue), str(item.CodingSchemeDesignator), str(item.CodeMeaning))


@pytest.mark.parametrize("name", ["seg.dcm", "rtstruct.dcm"])
def test_dciodvfy_finds_no_error(written, name):
    dciodvfy = _tool("dciodvfy")
    if dciodvfy is None:
        pytest.skip("dciodvfy not installed (pip install -r requirements-dev.lock: dicom3tools)")
    root = written[0]
    done = subprocess.run([dciodvfy, str(root / name)], capture_output=True, text=True, timeout=120)
    report = (done.stdout + done.stderr).splitlines()
    assert report and report[0].strip() in {"Segmentation", "RTStructureSet"}, report  # it recognised the IOD
    problems = [line for line in report if line.startswith("Error") or "not present in standard DICOM IOD" in line]
    assert problems == [], "\n".join(report)


def test_empty_organs_are_left_out_and_noted(written):
    root, labels, present, organs, _files = written
    seg = pydicom.dcmread(str(root / "seg.dcm"))
    rtstruct = pydicom.dcmread(str(root / "rtstruct.dcm"))
    names = [organ.name for organ in present]
    assert [str(item.SegmentLabel) for item in seg.SegmentSequence] == names
    assert [int(item.SegmentNumber) for item in seg.SegmentSequence] == list(range(1, len(names) + 1))
    assert [str(item.ROIName) for item in rtstruct.StructureSetROISequence] == names
    assert all(len(item.ContourSequence) > 0 for item in rtstruct.ROIContourSequence)
    note = dicomout.empty_organs_note(labels, organs, ["seg.dcm", "rtstruct.dcm"])
    assert note.startswith("no voxel of brainstem, esophagus, larynx: left out of seg.dcm and rtstruct.dcm")
    assert dicomout.empty_organs_note(labels, present, ["seg.dcm"]) is None


def test_rtstruct_has_the_frame_of_reference_module(written):
    root, _labels, _present, _organs, files = written
    rtstruct = pydicom.dcmread(str(root / "rtstruct.dcm"))
    source = pydicom.dcmread(str(files[0]))
    assert rtstruct.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert "PositionReferenceIndicator" in rtstruct and rtstruct.PositionReferenceIndicator == ""


def test_pydicom_reads_codes_and_laterality_in_both_files(written):
    root, _labels, present, _organs, _files = written
    seg = pydicom.dcmread(str(root / "seg.dcm"))
    rtstruct = pydicom.dcmread(str(root / "rtstruct.dcm"))
    for organ, segment, observation in zip(present, seg.SegmentSequence, rtstruct.RTROIObservationsSequence):
        kind = segment.SegmentedPropertyTypeCodeSequence[0]
        identification = observation.RTROIIdentificationCodeSequence[0]
        assert _triplet(kind) == _triplet(identification) == tuple(organ.terminology["type"])
        assert _triplet(segment.SegmentedPropertyCategoryCodeSequence[0]) == tuple(organ.terminology["category"])
        assert _triplet(observation.SegmentedPropertyCategoryCodeSequence[0]) == tuple(organ.terminology["category"])
        for item in (kind, identification):
            modifiers = [_triplet(m) for m in item.get("SegmentedPropertyTypeModifierCodeSequence", [])]
            assert modifiers == ([_expected_side(organ)] if _expected_side(organ) else [])


def test_dcmqi_reads_every_organ_with_name_code_laterality_and_voxels(written, tmp_path):
    segimage2itkimage = _tool("segimage2itkimage")
    if segimage2itkimage is None:
        pytest.skip("dcmqi not installed (pip install -r requirements-dev.lock: dcmqi)")
    root, labels, present, _organs, _files = written
    done = subprocess.run([segimage2itkimage, "--inputDICOM", str(root / "seg.dcm"), "--outputDirectory", str(tmp_path), "-t", "nifti", "-p", "seg"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    groups = json.loads((tmp_path / "seg-meta.json").read_text())["segmentAttributes"]
    attributes = [segment for group in groups for segment in group]
    assert [a["SegmentLabel"] for a in attributes] == [o.name for o in present]
    label_array = sitk.GetArrayViewFromImage(labels)
    for number, (attribute, organ) in enumerate(zip(attributes, present), start=1):
        code = attribute["SegmentedPropertyTypeCodeSequence"]
        assert (code["CodeValue"], code["CodingSchemeDesignator"], code["CodeMeaning"]) == tuple(organ.terminology["type"])
        side = attribute.get("SegmentedPropertyTypeModifierCodeSequence")
        assert ((side["CodeValue"], side["CodingSchemeDesignator"], side["CodeMeaning"]) if side else None) == _expected_side(organ)
        # dcmqi writes one file per non-overlapping group; each holds its segment's number where it lies.
        read = sitk.ReadImage(str(tmp_path / f"seg-{number}.nii.gz"))
        on_grid = sitk.Resample(read, labels, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(on_grid) > 0, label_array == organ.label)


def test_rt_utils_reads_every_organ_with_its_voxels(written):
    rt_utils = pytest.importorskip("rt_utils")
    root, labels, present, _organs, _files = written
    structure = rt_utils.RTStructBuilder.create_from(dicom_series_path=str(root / "series"), rt_struct_path=str(root / "rtstruct.dcm"))
    assert structure.get_roi_names() == [organ.name for organ in present]
    label_array = sitk.GetArrayViewFromImage(labels)
    for organ in present:
        mask = np.moveaxis(structure.get_roi_mask_by_name(organ.name), -1, 0)  # rt-utils: (row, column, slice)
        expected = label_array == organ.label
        assert mask.shape == expected.shape
        # rt-utils fills the polygons through the boundary midpoints with OpenCV, whose pixel rule may take
        # or leave the voxels the outline passes beside: equal up to one voxel of the boundary.
        from scipy import ndimage

        assert not (mask & ~ndimage.binary_dilation(expected)).any()
        assert not (expected & ~mask & ndimage.binary_erosion(expected)).any()
        if organ.name == "mandible":
            assert not mask[2, 7:10, 21:26].any()  # the hole stays a hole (its inner voxels, beyond the boundary rule)
