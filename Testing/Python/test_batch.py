"""Scripts/batch.py end to end on plain Python (slicer-core), on three real hippocampus cases, a DICOM series
made from a fourth (which has no reference) and a bad file.

Outputs are read back with slicerio (segment names and colours, as Slicer writes them), SimpleITK, VTK and
highdicom: per case the command line's files under the command line's names, plus the Slicer segmentation.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' module found is not slicer-core (no vtkMRMLScene)", allow_module_level=True)
torch = pytest.importorskip("torch", reason="PyTorch is not installed")
slicerio = pytest.importorskip("slicerio", reason="slicerio is not installed")

import SimpleITK as sitk  # noqa: E402
import vtk  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "SDMOrganSeg"))

from SDMOrganSegLib.formats import modelfiles  # noqa: E402
from SDMOrganSegLib.common.files import safe_name  # noqa: E402
from SDMOrganSegLib.formats.modelfiles import Organ  # noqa: E402
from conftest import calibrated_model, write_dicom_series  # noqa: E402

BATCH = REPO / "SDMOrganSeg" / "Scripts" / "batch.py"
HIPPOCAMPUS = REPO / "Testing" / "Data" / "hippocampus"
#: Input file name -> test data case; the third name needs sanitising to become a folder name.
INPUTS = {
    "hippocampus_001.nii.gz": "hippocampus_001",
    "hippocampus_003.nii.gz": "hippocampus_003",
    "../evil name (copy).nii.gz": "hippocampus_004",
}
BAD = "broken_case.nii.gz"
DICOM_CASE = "dicom_case"  # a DICOM series folder made from hippocampus_007; no reference has its name


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A random-weight model whose organs each cover a few per cent of a hippocampus crop."""
    organs = [Organ("anterior hippocampus", 1, (0.9, 0.3, 0.2)), Organ("posterior hippocampus", 2, (0.2, 0.5, 0.9))]
    image = HIPPOCAMPUS / "imagesTr" / "hippocampus_001.nii.gz"
    return calibrated_model(tmp_path_factory.mktemp("batch_model"), "test-hippocampus", organs, image, [0.05, 0.03])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """An input folder (three real cases, one bad file) and a reference folder with the same names."""
    root = tmp_path_factory.mktemp("batch_data")
    images, references = root / "images", root / "references"
    images.mkdir()
    references.mkdir()
    for name, case in INPUTS.items():
        flat = Path(name).name  # the "../" only shows that names are sanitised; the file sits in the folder
        shutil.copy(HIPPOCAMPUS / "imagesTr" / f"{case}.nii.gz", images / flat)
        shutil.copy(HIPPOCAMPUS / "labelsTr" / f"{case}.nii.gz", references / flat)
    (images / BAD).write_bytes(b"this is not a NIfTI file" * 40)
    (references / BAD).write_bytes(b"")
    write_dicom_series(HIPPOCAMPUS / "imagesTr" / "hippocampus_007.nii.gz", root / DICOM_CASE)
    return images, references


def run_batch(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BATCH), *map(str, args)], capture_output=True, text=True, timeout=600, cwd=str(REPO)
    )


def _load_batch_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sdmorganseg_batch", BATCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, data, model):
    images, references = data
    output = tmp_path_factory.mktemp("batch_out") / "out"
    process = run_batch(
        "--input", images, images.parent / DICOM_CASE, "--output", output, "--model", model, "--reference", references,
        "--device", "cpu", "--pictures", "--format", "nifti,dicom-seg", "--tta",
    )
    return output, process


def _summary(output: Path) -> dict[str, dict[str, str]]:
    with open(output / "summary.csv", newline="", encoding="utf-8") as handle:
        return {row["case"]: row for row in csv.DictReader(handle)}


def _ok_cases() -> list[str]:
    return ["evil_name_copy", "hippocampus_001", "hippocampus_003"]


def _all_ok_cases() -> list[str]:
    return sorted(_ok_cases() + [DICOM_CASE])


def test_bad_case_is_skipped_and_reported(first_run):
    output, process = first_run
    assert process.returncode == 1, process.stdout + process.stderr
    assert "Traceback" not in process.stdout + process.stderr
    summary = _summary(output)
    assert sorted(summary) == sorted(_all_ok_cases() + ["broken_case"])
    bad = summary["broken_case"]
    assert bad["status"] == "failed"
    assert "cannot read" in bad["reason"] and "\n" not in bad["reason"]
    assert [line for line in process.stdout.splitlines() if "broken_case" in line and "FAILED" in line]
    assert [line for line in process.stderr.splitlines() if line.startswith("sdmorganseg: error: broken_case: cannot read")]
    assert not (output / "broken_case").exists()
    for case in _ok_cases():
        assert summary[case]["status"] == "ok" and summary[case]["reason"] == ""
        assert float(summary[case]["volume_ml_anterior_hippocampus"]) > 0
        assert 0 <= float(summary[case]["dice_anterior_hippocampus"]) <= 1
        assert float(summary[case]["hd95_mm_posterior_hippocampus"]) >= 0


def test_a_case_without_a_reference_is_segmented_with_a_note(first_run):
    output, process = first_run
    row = _summary(output)[DICOM_CASE]
    assert row["status"] == "ok" and row["dice_anterior_hippocampus"] == "" and float(row["volume_ml_anterior_hippocampus"]) > 0
    assert "metrics skipped" in row["notes"] and f"note: {DICOM_CASE}: no reference label map" in process.stderr
    assert not (output / DICOM_CASE / "metrics.csv").exists()
    assert any("metrics skipped" in note for note in json.loads((output / DICOM_CASE / "summary.json").read_text())["notes"])
    # The NIfTI cases get a note instead of DICOM files.
    assert "not a DICOM series, so no seg.dcm" in _summary(output)["hippocampus_001"]["notes"]
    assert not (output / "hippocampus_001" / "seg.dcm").exists()


def test_dicom_case_gets_a_segmentation_object_equal_to_its_label_map(first_run, data, model):
    highdicom = pytest.importorskip("highdicom")
    pydicom = pytest.importorskip("pydicom")
    from SDMOrganSegLib.images.imageio import dicom_series_files

    output, _process = first_run
    sources = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in dicom_series_files(data[0].parent / DICOM_CASE)]
    seg = highdicom.seg.segread(str(output / DICOM_CASE / "seg.dcm"))
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID and seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    numbers = seg.get_pixels_by_source_instance([s.SOPInstanceUID for s in sources], combine_segments=True, assert_missing_frames_are_empty=True)
    card = modelfiles.read_card(model)
    lookup = np.array([0] + [o.label for o in card.organs])
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(output / DICOM_CASE / "labels.nii.gz")))
    np.testing.assert_array_equal(lookup[numbers], labels)
    assert [seg.get_segment_description(n).segment_label for n in seg.segment_numbers] == [o.name for o in card.organs]
    summary = json.loads((output / DICOM_CASE / "summary.json").read_text())
    assert (summary["tta"], summary["largest_component"]) == (True, False)


def test_names_are_sanitised_inside_the_output_folder(first_run):
    output, _process = first_run
    assert sorted(p.name for p in output.iterdir() if p.is_dir()) == _all_ok_cases()
    assert not (output.parent / "evil name (copy)").exists()
    assert not list(output.rglob(".staging-*")) and not list(output.rglob("*.part*")), "no temporary files may remain"


@pytest.mark.parametrize("case", _ok_cases())
def test_segmentation_reads_back_with_names_colours_and_geometry(first_run, model, case):
    output, _process = first_run
    # The command line's files under its names, the Slicer segmentation beside them.
    summary = json.loads((output / case / "summary.json").read_text())
    expected_files = {"labels.nii.gz", "summary.json", f"{case}.seg.nrrd", "metrics.csv", f"{case}.png"}
    assert expected_files <= set(summary["outputs"]) and all((output / case / name).is_file() for name in summary["outputs"])
    assert summary["model"] == "test-hippocampus" and summary["reference"].endswith(".nii.gz")
    card = modelfiles.read_card(model)
    segmentation = slicerio.read_segmentation(str(output / case / f"{case}.seg.nrrd"))
    segments = segmentation["segments"]
    assert [s["name"] for s in segments] == [o.name for o in card.organs]
    for segment, organ in zip(segments, card.organs):
        np.testing.assert_allclose(segment["color"], organ.color, atol=1e-4)
    case_id = "hippocampus_004" if case == "evil_name_copy" else case
    image = sitk.ReadImage(str(HIPPOCAMPUS / "imagesTr" / f"{case_id}.nii.gz"))
    ijk_to_lps = np.asarray(segmentation["ijkToLPS"])
    expected = np.eye(4)
    expected[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    expected[:3, 3] = image.GetOrigin()
    offset = np.asarray(segmentation.get("referenceImageExtentOffset", [0, 0, 0]), dtype=float)
    expected[:3, 3] += expected[:3, :3] @ offset
    np.testing.assert_allclose(ijk_to_lps, expected, atol=1e-4)

    labels = sitk.ReadImage(str(output / case / "labels.nii.gz"))
    assert labels.GetSize() == image.GetSize()
    label_array = sitk.GetArrayFromImage(labels)
    for organ in card.organs:
        sdm = sitk.ReadImage(str(output / case / f"sdm_{safe_name(organ.name)}.nii.gz"))
        assert sdm.GetSize() == image.GetSize()
        np.testing.assert_allclose(sdm.GetOrigin(), image.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(sdm.GetDirection(), image.GetDirection(), atol=1e-6)
        np.testing.assert_allclose(sdm.GetSpacing(), image.GetSpacing(), atol=1e-6)
        values = sitk.GetArrayViewFromImage(sdm)
        assert values.min() < 0 < values.max()
        # The file holds the SDM the segment came from: every voxel of the segment is inside (SDM < 0).
        segment = next(s for s in segments if s["name"] == organ.name)
        voxels = np.asarray(segmentation["voxels"])
        layer = voxels[..., segment.get("layer", 0)] if voxels.ndim == 4 else voxels
        in_segment = int(np.count_nonzero(layer == segment["labelValue"]))
        inside = int(np.count_nonzero(values < 0))
        assert 0.8 * inside <= in_segment <= inside, (in_segment, inside)
        # labels.nii.gz holds the same voxels as the segment.
        assert int(np.count_nonzero(label_array == organ.label)) == in_segment
        for level in ("0", "0.1", "0.2", "0.3"):
            reader = vtk.vtkXMLPolyDataReader()
            reader.SetFileName(str(output / case / "contours" / f"{safe_name(organ.name)}_{level}.vtp"))
            reader.Update()
            assert reader.GetOutput().GetNumberOfPoints() > 0
    picture = (output / case / f"{case}.png").read_bytes()
    assert picture.startswith(b"\x89PNG")


def test_metrics_csv_agrees_with_the_summary(first_run):
    output, _process = first_run
    summary = _summary(output)
    for case in _ok_cases():
        with open(output / case / "metrics.csv", newline="", encoding="utf-8") as handle:
            rows = {row["organ"]: row for row in csv.DictReader(handle)}
        assert sorted(rows) == ["anterior hippocampus", "mean", "posterior hippocampus"]
        assert float(rows["anterior hippocampus"]["dice"]) == pytest.approx(float(summary[case]["dice_anterior_hippocampus"]))
        assert float(rows["posterior hippocampus"]["asd_mm"]) == pytest.approx(float(summary[case]["asd_mm_posterior_hippocampus"]))


def _fingerprints(folder: Path) -> dict[str, tuple[int, str]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_nothing_is_overwritten_without_overwrite(first_run, data, model, tmp_path):
    output, _process = first_run
    images, _references = data
    before = _fingerprints(output)
    again = run_batch("--input", images, "--output", output, "--model", model, "--device", "cpu")
    assert again.returncode == 2
    assert "--overwrite" in again.stderr and "Traceback" not in again.stderr
    assert _fingerprints(output) == before

    # Without summary.csv, an existing case is refused on its own and left untouched; a new case is written.
    copy = tmp_path / "copy"
    shutil.copytree(output, copy)
    (copy / "summary.csv").unlink()
    kept = _fingerprints(copy)
    new_case = tmp_path / "hippocampus_006.nii.gz"
    shutil.copy(HIPPOCAMPUS / "imagesTr" / "hippocampus_006.nii.gz", new_case)
    # In this process (the first run already covered the script as a program): saves the start-up time.
    batch = _load_batch_module()
    assert batch.main([
        "--input", str(images / "hippocampus_001.nii.gz"), str(new_case), "--output", str(copy), "--model", str(model), "--device", "cpu",
        "--largest-component", "--format", "nrrd",
    ]) == 1
    summary = _summary(copy)
    assert summary["hippocampus_001"]["status"] == "failed" and "already exists" in summary["hippocampus_001"]["reason"]
    assert summary["hippocampus_006"]["status"] == "ok"
    after = _fingerprints(copy)
    assert {k: v for k, v in after.items() if k in kept} == kept
    assert "hippocampus_006/hippocampus_006.seg.nrrd" in after and "hippocampus_006/labels.nrrd" in after
    summary = json.loads((copy / "hippocampus_006" / "summary.json").read_text())
    assert summary["largest_component"] is True and summary["tta"] is False


def test_pictures_and_overview(first_run):
    """Every case picture and the overview exist as PNGs of a readable size (look at them: docs/ has none)."""
    from PIL import Image

    output, _process = first_run
    for case in _all_ok_cases():
        with Image.open(output / case / f"{case}.png") as picture:
            assert picture.format == "PNG" and picture.size[0] >= 1200 and picture.size[1] >= 550
    with Image.open(output / "overview.png") as overview:
        assert overview.format == "PNG" and overview.size[0] >= 4 * 200
