"""End to end on real cases: `sdmorganseg segment` then `sdmorganseg evaluate`, and the `sdm` command."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import CT, HIPPOCAMPUS, REPO
from vtk.util import numpy_support

from SDMOrganSegLib.images.contours import iso_surface
from SDMOrganSegLib.common.files import safe_name
from SDMOrganSegLib.formats.modelfiles import load_model, shipped_models
from SDMOrganSegLib.method.sdm import normalized_sdm


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "SDMOrganSegLib.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env={"PYTHONPATH": str(REPO / "SDMOrganSeg"), "PATH": "/usr/bin:/bin"})


SHIPPED = shipped_models().get("hippocampus")


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    """The shipped model when present (real segmentation), else the random-weight one (plumbing only)."""
    return SHIPPED or tiny_model_dir


def test_segment_then_evaluate_real_case(model_dir, tmp_path):
    case = "hippocampus_003"
    image_path = HIPPOCAMPUS / "imagesTr" / f"{case}.nii.gz"
    out = tmp_path / "out"
    result = run_cli("segment", str(image_path), "--model", str(model_dir), "--out", str(out), "--device", "cpu", "--quiet")
    assert result.returncode == 0, result.stderr
    card = load_model(model_dir).card
    names = {"labels.nii.gz", "summary.json"} | {f"sdm_{safe_name(o)}.nii.gz" for o in card.organ_names}
    assert names <= {p.name for p in out.iterdir()}
    assert len(list((out / "contours").glob("*.vtp"))) == 4 * len(card.organs)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left behind

    source = sitk.ReadImage(str(image_path))
    labels = sitk.ReadImage(str(out / "labels.nii.gz"))
    for getter in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        np.testing.assert_allclose(getattr(labels, getter)(), getattr(source, getter)(), atol=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["coordinate_system"] == "LPS" and summary["device"].startswith("cpu")
    sdm = card.training.get("sdm", {})
    if sdm.get("normalization") == "clip":  # the shipped model: each contour level is a distance, level x scale
        assert summary["sdm_normalization"] == sdm
        assert summary["sdm_levels_mm"] == {f"{level:g}": pytest.approx(level * sdm["scale_mm"]) for level in (0.0, 0.1, 0.2, 0.3)}
    voxels = np.bincount(sitk.GetArrayFromImage(labels).ravel(), minlength=3)
    assert summary["organs"][card.organ_names[0]]["volume_ml"] == pytest.approx(voxels[1] * np.prod(source.GetSpacing()) / 1000, abs=1e-3)

    reference = HIPPOCAMPUS / "labelsTr" / f"{case}.nii.gz"
    evaluation = run_cli("evaluate", str(out / "labels.nii.gz"), str(reference), "--model", str(model_dir), "--json", str(tmp_path / "m.json"), "--csv", str(tmp_path / "m.csv"))
    assert evaluation.returncode == 0, evaluation.stderr
    metrics = json.loads((tmp_path / "m.json").read_text())
    mean = metrics.pop("mean")
    assert set(metrics) == set(card.organ_names)
    for values in metrics.values():
        assert set(values) == {"dice", "hd", "hd95", "asd"}
    assert mean["organs"] == len(card.organs)
    assert mean["dice"] == pytest.approx(np.mean([v["dice"] for v in metrics.values()]))
    if SHIPPED:
        # hippocampus_003 is a validation case: the shipped model must really segment it.
        assert min(v["dice"] for v in metrics.values()) > 0.75

    # Without --model or --labels the organ names come from the summary.json beside the prediction.
    beside = run_cli("evaluate", str(out / "labels.nii.gz"), str(reference), "--json", str(tmp_path / "beside.json"))
    assert beside.returncode == 0, beside.stderr
    assert json.loads((tmp_path / "beside.json").read_text()) == {**metrics, "mean": mean}

    # Partially annotated reference: only the organs listed for its case (the file name) are scored.
    annotations = tmp_path / "annotations.json"
    annotations.write_text(json.dumps({case: [card.organ_names[0]], "other_case": card.organ_names}))
    partial = run_cli("evaluate", str(out / "labels.nii.gz"), str(reference), "--ignore-unannotated", str(annotations), "--json", str(tmp_path / "partial.json"))
    assert partial.returncode == 0, partial.stderr
    scored = json.loads((tmp_path / "partial.json").read_text())
    assert scored[card.organ_names[0]] == metrics[card.organ_names[0]] and scored[card.organ_names[1]] == {"status": "unannotated"}
    assert scored["mean"] == {**metrics[card.organ_names[0]], "organs": 1}
    assert "not annotated in the reference: not scored" in partial.stdout


def test_evaluate_leaves_organs_in_neither_map_out_of_the_mean(tmp_path):
    """A labels file naming more organs than the maps hold: the extra organs are reported, not scored."""
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"labels": {"1": "anterior", "2": "posterior", "3": "tail", "4": "head"}}))
    reference = HIPPOCAMPUS / "labelsTr" / "hippocampus_001.nii.gz"
    shifted = sitk.ReadImage(str(reference))
    array = np.roll(sitk.GetArrayFromImage(shifted), 1, axis=2)
    moved = sitk.GetImageFromArray(array)
    moved.CopyInformation(shifted)
    sitk.WriteImage(moved, str(tmp_path / "pred.nii.gz"))
    result = run_cli("evaluate", str(tmp_path / "pred.nii.gz"), str(reference), "--labels", str(labels), "--json", str(tmp_path / "m.json"), "--csv", str(tmp_path / "m.csv"))
    assert result.returncode == 0, result.stderr
    document = json.loads((tmp_path / "m.json").read_text())
    assert document["tail"] == document["head"] == {"status": "absent"}
    assert document["mean"]["organs"] == 2
    assert document["mean"]["dice"] == pytest.approx((document["anterior"]["dice"] + document["posterior"]["dice"]) / 2)
    assert document["mean"]["dice"] < 0.95  # it read close to 1 when the two absent organs counted as perfect
    rows = (tmp_path / "m.csv").read_text().splitlines()
    assert rows[0] == "organ,dice,hd_mm,hd95_mm,asd_mm,status" and rows[-1].startswith("mean,") and rows[-1].endswith(",mean of 2 organs")


@pytest.mark.parametrize("spacing", [None, (0.8, 1.0, 1.7)])
def test_level_zero_contour_lies_where_sdm_changes_sign(spacing):
    labels = sitk.ReadImage(str(HIPPOCAMPUS / "labelsTr" / "hippocampus_004.nii.gz"))
    if spacing:
        labels.SetSpacing(spacing)
        labels.SetDirection((0.0, -1.0, 0.0, 0.6, 0.0, -0.8, 0.8, 0.0, 0.6))  # oblique
    sdm = sitk.GetImageFromArray(normalized_sdm(sitk.GetArrayFromImage(labels) == 1, labels.GetSpacing()))
    sdm.CopyInformation(labels)
    surface = iso_surface(sdm, 0.0)
    points = numpy_support.vtk_to_numpy(surface.GetPoints().GetData())
    assert len(points) > 100
    array = sitk.GetArrayFromImage(sdm)
    for point in points[:: max(1, len(points) // 300)]:
        index = np.asarray(sdm.TransformPhysicalPointToContinuousIndex([float(c) for c in point]))  # (x, y, z)
        low = np.floor(index).astype(int)
        corners = array[low[2] : low[2] + 2, low[1] : low[1] + 2, low[0] : low[0] + 2]
        # The point lies in a voxel cell whose corners have both signs, and the trilinear value there is ~0.
        assert corners.min() < 0 < corners.max(), (point, index)
        frac = index - low
        weights = np.einsum("i,j,k->ijk", [1 - frac[2], frac[2]], [1 - frac[1], frac[1]], [1 - frac[0], frac[0]])
        assert abs(float((weights * corners).sum())) < 1e-3 * float(np.abs(corners).max())


def test_sdm_command_matches_library(tmp_path):
    label_path = HIPPOCAMPUS / "labelsTr" / "hippocampus_001.nii.gz"
    out = tmp_path / "sdm.nrrd"
    result = run_cli("sdm", str(label_path), str(out), "--label", "2")
    assert result.returncode == 0, result.stderr
    labels = sitk.ReadImage(str(label_path))
    expected = normalized_sdm(sitk.GetArrayFromImage(labels) == 2, labels.GetSpacing())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out))), expected)
    again = run_cli("sdm", str(label_path), str(out), "--label", "2")
    assert again.returncode == 2 and "--overwrite" in again.stderr and "Traceback" not in again.stderr


def test_ct_volume_through_sliding_window_keeps_geometry(tiny_model_dir):
    from SDMOrganSegLib.engines.inference import segment_image

    image = sitk.ReadImage(str(CT / "example_ct_sm.nii.gz"))
    model = load_model(tiny_model_dir)
    model.card.spacing = None  # run at the CT's own 3 mm grid: plumbing, not accuracy
    fractions, messages = [], []
    result = segment_image(image, model, "cpu", window=(64, 64, 16), progress=lambda f, m: (fractions.append(f), messages.append(m)))
    assert result.labels.GetSize() == image.GetSize()
    assert result.labels.GetSpacing() == image.GetSpacing()
    assert all(s.GetSize() == image.GetSize() for s in result.sdms.values())
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    # 25 % overlap: x starts 0, 48, 58; y 0, 37; z 0, 12, 14 -> 3 * 2 * 3 tiles
    assert sum("tile" in m for m in messages) == 18


def test_help_for_every_command():
    for command in ("segment", "evaluate", "sdm", "train"):
        result = run_cli(command, "--help")
        assert result.returncode == 0 and "usage: sdmorganseg" in result.stdout


def test_train_help_shows_every_default():
    from SDMOrganSegLib.cli import build_parser

    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    text = " ".join(train.format_help().split())
    for action in train._actions:
        if action.option_strings and action.default not in (None, False) and action.default is not argparse.SUPPRESS:
            shown = {"--patch": "32,48,32", "--lr": "5e-4", "--sdm-weight": "10", "--sdm-scale": "5", "--heaviside-k": "1500"}.get(action.option_strings[0], str(action.default))
            assert f"default {shown}" in text, action.option_strings


def test_unwritable_output_name_is_the_users_file(tmp_path):
    label_path = HIPPOCAMPUS / "labelsTr" / "hippocampus_001.nii.gz"
    for name in ("sdm.xyz", "sdm.png"):
        result = run_cli("sdm", str(label_path), str(tmp_path / name))
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert f"cannot write {tmp_path / name}:" in result.stderr and ".part" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_progress_in_a_log_file_is_plain_lines(tiny_model_dir, tmp_path):
    """stderr redirected to a file (a batch job's log): progress as a few whole lines, no carriage returns."""
    image = HIPPOCAMPUS / "imagesTr" / "hippocampus_003.nii.gz"
    done = run_cli("segment", str(image), "--model", str(tiny_model_dir), "--out", str(tmp_path / "out"), "--device", "cpu", "--window", "32,32,32")
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr
    progress = [line for line in done.stderr.splitlines() if line.startswith("[")]
    assert progress[0].startswith("[  0%]") and progress[-1].startswith("[100%] done")
    # Every tile would be a line otherwise: at most one per stage change or 10 %.
    assert 3 <= len(progress) <= 20, progress


def test_a_run_on_a_finer_grid_than_the_model_contours_on_the_model_grid(model_dir, tmp_path):
    """The input-grid SDMs of a resampled run are linear interpolations of the model's: their surfaces add
    triangles (here about 4x for a grid twice as fine), not detail. The contours come from the model's grid,
    and still lie on the output label map's boundary."""
    from scipy.ndimage import distance_transform_edt

    from SDMOrganSegLib.engines.inference import segment_image
    from SDMOrganSegLib.engines.outputs import write_result
    from SDMOrganSegLib.images.contours import iso_surfaces, read_polydata

    source = sitk.ReadImage(str(HIPPOCAMPUS / "imagesTr" / "hippocampus_003.nii.gz"), sitk.sitkFloat32)
    model = load_model(model_dir)
    fine_spacing = tuple(s / 2 for s in model.card.spacing)
    size = [int(round(n * s / f)) for n, s, f in zip(source.GetSize(), source.GetSpacing(), fine_spacing)]
    image = sitk.Resample(source, size, sitk.Transform(), sitk.sitkLinear, source.GetOrigin(), fine_spacing, source.GetDirection())
    result = segment_image(image, model, "cpu")
    assert set(result.model_grid_sdms) == set(model.card.organ_names)
    labels = sitk.GetArrayFromImage(result.labels)
    write_result(result, tmp_path / "out")
    for organ in model.card.organs:
        coarse = result.model_grid_sdms[organ.name]
        assert coarse.GetSpacing() == pytest.approx(model.card.spacing)
        surface = read_polydata(tmp_path / "out" / "contours" / f"{safe_name(organ.name)}_0.vtp")
        fine_triangles = iso_surfaces(result.sdms[organ.name], [0.0])[0.0].GetNumberOfCells()
        assert surface.GetNumberOfCells() == iso_surfaces(coarse, [0.0])[0.0].GetNumberOfCells() > 100
        assert surface.GetNumberOfCells() < fine_triangles / 3
        # Each vertex lies on the model grid's trilinear zero level, of which the output's SDM is a sampling,
        # so within a fine cell of a voxel on the label map's boundary: at most sqrt(3) fine voxels from one.
        inside = labels == organ.label
        boundary = inside & ~(np.roll(inside, 1, 0) & np.roll(inside, -1, 0) & np.roll(inside, 1, 1) & np.roll(inside, -1, 1) & np.roll(inside, 1, 2) & np.roll(inside, -1, 2))
        distance = distance_transform_edt(~boundary, sampling=fine_spacing[::-1])
        points = numpy_support.vtk_to_numpy(surface.GetPoints().GetData())
        index = np.rint([result.labels.TransformPhysicalPointToContinuousIndex([float(c) for c in p]) for p in points]).astype(int)[:, ::-1]
        assert distance[tuple(index.T)].max() <= np.sqrt(3) * max(fine_spacing) + 1e-6
