"""Reading segment outputs back for review (``reviewcases``): which cases a path holds, worst first, broken
cases with their reason, nothing written; and the review commands' one-line refusals where the review extra
is not installed. No Slicer, no PyTorch, no browser (the page itself: Testing/Review)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import REPO

from SDMOrganSegLib.common.errors import SDMOrganSegError
from SDMOrganSegLib.review.reviewcases import compare_dice, find_cases, largest_area_slice, load_case, read_sdm

ORGANS = {"liver": (1, (0.8, 0.2, 0.2)), "spleen": (2, (0.2, 0.2, 0.8))}


def _case(folder: Path, shift: int = 0, metrics: dict | None = None, relative_input: bool = False) -> Path:
    """A case folder as ``segment`` writes it (no contours: they are computed in memory when missing)."""
    from SDMOrganSegLib.method.sdm import normalized_sdm

    folder.mkdir(parents=True)
    array = np.zeros((12, 16, 20), np.uint8)
    array[3:8, 4:10, 5 + shift:11 + shift] = 1
    array[3:8, 4:10, 13:17] = 2
    labels = sitk.GetImageFromArray(array)
    labels.SetSpacing((1.0, 1.5, 2.0))
    image = sitk.Cast(labels, sitk.sitkFloat32) * 100 + 10
    sitk.WriteImage(image, str(folder / "image.nii.gz"))
    sitk.WriteImage(labels, str(folder / "labels.nii.gz"))
    for name, (value, _) in ORGANS.items():
        sdm = sitk.GetImageFromArray(normalized_sdm(array == value, labels.GetSpacing()))
        sdm.CopyInformation(labels)
        sitk.WriteImage(sdm, str(folder / f"sdm_{name}.nii.gz"))
    summary = {"model": "test", "input": "image.nii.gz" if relative_input else str(folder / "image.nii.gz"), "sdm_levels": [0.0, 0.1],
               "organs": {n: {"label": v, "color": list(c), "volume_ml": 1.0} for n, (v, c) in ORGANS.items()}}
    (folder / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    if metrics:
        rows = ["organ,dice,hd_mm,hd95_mm,asd_mm,status"] + [f"{n},{d},1.0,1.0,0.5,scored" for n, d in metrics.items()]
        (folder / "metrics.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


def _listing(folder: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def test_worst_first_broken_last_with_reasons(tmp_path):
    _case(tmp_path / "good", metrics={"liver": 0.9, "spleen": 0.8})
    _case(tmp_path / "bad", metrics={"liver": 0.5, "spleen": 0.7})
    _case(tmp_path / "unscored")
    cropped = _case(tmp_path / "cropped")
    sitk.WriteImage(sitk.ReadImage(str(cropped / "labels.nii.gz"))[:-1, :, :], str(cropped / "labels.nii.gz"))
    gone = _case(tmp_path / "gone")
    (gone / "image.nii.gz").unlink()
    (tmp_path / "half").mkdir()
    sitk.WriteImage(sitk.ReadImage(str(tmp_path / "good" / "labels.nii.gz")), str(tmp_path / "half" / "labels.nii.gz"))
    (tmp_path / "notes").mkdir()  # no outputs at all: not a case
    before = _listing(tmp_path)
    cases = find_cases(tmp_path)
    assert [c.name for c in cases] == ["bad", "good", "unscored", "cropped", "gone", "half"]
    assert cases[0].mean_dice == pytest.approx(0.6) and cases[1].mean_dice == pytest.approx(0.85)
    reasons = {c.name: c.error for c in cases}
    assert reasons["good"] is None and reasons["unscored"] is None
    assert "disagree in grid" in reasons["cropped"] and "size" in reasons["cropped"]
    assert "is gone" in reasons["gone"]
    assert "no summary.json" in reasons["half"]
    with pytest.raises(SDMOrganSegError, match="disagree in grid"):
        load_case(cases[3])
    data = load_case(cases[0])
    assert set(data.computed.surfaces) == set(ORGANS) and data.computed.surfaces["liver"][0.0].GetNumberOfPoints() > 0
    assert _listing(tmp_path) == before, "reading cases for review wrote into the reviewed folder"


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "absent", "does not exist"),
    (lambda p: (p / "file.txt").write_text("x") and p / "file.txt", "is a file"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "holds no segmentation outputs"),
])
def test_unusable_paths_are_refused(tmp_path, make, message):
    with pytest.raises(SDMOrganSegError, match=message):
        find_cases(make(tmp_path))


def test_one_case_folder_relative_input_and_compare_dice(tmp_path, monkeypatch):
    first = _case(tmp_path / "a" / "case", relative_input=True)
    second = _case(tmp_path / "b" / "case", shift=1)
    monkeypatch.chdir(tmp_path)
    [case] = find_cases(first)  # a case folder itself; its input named relative to the folder
    assert case.error is None and case.image_path == (first / "image.nii.gz").resolve()
    scores = compare_dice(load_case(case), load_case(find_cases(second)[0]))
    # liver: 5 x 6 x 6 boxes shifted by one voxel along x overlap in 5 x 6 x 5: Dice = 2 * 150 / 360
    assert scores["liver"] == pytest.approx(2 * 150 / 360) and scores["spleen"] == 1.0


def test_sdms_are_read_only_where_contours_are_missing_and_on_demand(tmp_path):
    from SDMOrganSegLib.images.contours import iso_surfaces, level_tag, write_polydata

    folder = _case(tmp_path / "case")
    (folder / "contours").mkdir()
    liver = sitk.ReadImage(str(folder / "sdm_liver.nii.gz"))
    for level, surface in iso_surfaces(liver, (0.0, 0.1)).items():
        write_polydata(surface, str(folder / "contours" / f"liver_{level_tag(level)}.vtp"))
    [case] = find_cases(folder)
    data = load_case(case)
    assert set(data.computed.sdms) == {"spleen"}, "the liver's contours are on disk: its SDM is read when shown"
    assert data.computed.surfaces["liver"][0.1].GetNumberOfPoints() == iso_surfaces(liver, (0.1,))[0.1].GetNumberOfPoints()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_sdm(case, "liver")), sitk.GetArrayViewFromImage(liver).astype(np.float32))
    (folder / "sdm_liver.nii.gz").write_bytes(b"not a volume")
    with pytest.raises(SDMOrganSegError, match="^case case: the SDM of liver cannot be read") as error:
        read_sdm(case, "liver")
    assert "\n" not in str(error.value)


def test_largest_area_slice():
    array = np.zeros((5, 6, 7), np.uint8)
    array[1, 1:3, 1:3] = 1
    array[3, 0:5, 0:5] = 2
    image = sitk.GetImageFromArray(array)
    assert largest_area_slice(image, 0) == 3 and largest_area_slice(image, 2) in (1, 2)
    assert largest_area_slice(sitk.GetImageFromArray(np.zeros((5, 6, 7), np.uint8)), 0) == 2


@pytest.mark.skipif(__import__("importlib").util.find_spec("trame_slicer") is not None, reason="the review extra is installed here")
@pytest.mark.parametrize("command", [["snapshot", "CASE", "--out", "OUT"], ["review", "CASE"]])
def test_without_the_review_extra_the_commands_say_how_to_install_it(tmp_path, command):
    case = _case(tmp_path / "case")
    argv = [str(case) if a == "CASE" else str(tmp_path / "x.png") if a == "OUT" else a for a in command]
    env = {**os.environ, "PYTHONPATH": str(REPO / "SDMOrganSeg")}
    done = subprocess.run([sys.executable, "-m", "SDMOrganSegLib.cli", *argv, *(["--port", "0"] if command[0] == "review" else [])],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "review extra" in done.stderr and "requirements-review.lock" in done.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("option, message", [(["--slice", "-1"], "expected auto or a slice index"), (["--size", "10x10"], "out of range"), (["--size", "big"], "must look like 800x600")])
def test_snapshot_options_are_checked(tmp_path, capsys, option, message):
    from SDMOrganSegLib.cli import main

    case = _case(tmp_path / "case")
    try:
        code = main(["snapshot", str(case), "--out", str(tmp_path / "x.png"), *option])
    except SystemExit as exit_:  # argparse's own check
        code = exit_.code
    error = capsys.readouterr().err
    assert code == 2 and message in error and error.count("\n") == 1
