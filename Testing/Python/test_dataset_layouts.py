"""`train` reads nnU-Net v2 raw datasets and Medical Segmentation Decathlon task folders through their
dataset.json, built here from the real hippocampus cases, and refuses multi-channel ones."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HIPPOCAMPUS, REPO, hippocampus_cases

from SDMOrganSegLib.formats.dataset import find_cases, read_label_names
from SDMOrganSegLib.common.errors import SDMOrganSegError
from SDMOrganSegLib.formats.modelfiles import shipped_models


def nnunet_dataset(root: Path, channels: dict[str, str] | None = None) -> Path:
    """Dataset004_Hippocampus in nnU-Net v2's raw layout: imagesTr/CASE_0000.nii.gz, labelsTr/CASE.nii.gz."""
    folder = root / "Dataset004_Hippocampus"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for case in hippocampus_cases():
        shutil.copy(HIPPOCAMPUS / "imagesTr" / f"{case}.nii.gz", folder / "imagesTr" / f"{case}_0000.nii.gz")
        shutil.copy(HIPPOCAMPUS / "labelsTr" / f"{case}.nii.gz", folder / "labelsTr" / f"{case}.nii.gz")
    description = {
        "channel_names": channels or {"0": "MRI"},
        "labels": {"background": 0, "Anterior": 1, "Posterior": 2},
        "numTraining": len(hippocampus_cases()),
        "file_ending": ".nii.gz",
    }
    (folder / "dataset.json").write_text(json.dumps(description, indent=1))
    return folder


def msd_task(root: Path, modality: dict[str, str] | None = None) -> Path:
    """Task04_Hippocampus as the Decathlon ships it: dataset.json with 'training' pairs (and a macOS '._' file
    beside the images, which the pairs leave out)."""
    folder = root / "Task04_Hippocampus"
    shutil.copytree(HIPPOCAMPUS, folder)
    (folder / "labels.json").unlink()
    (folder / "imagesTr" / "._hippocampus_001.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    description = {
        "name": "Hippocampus",
        "modality": modality or {"0": "MRI"},
        "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
        "numTraining": len(hippocampus_cases()),
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in hippocampus_cases()],
        "test": [],
    }
    (folder / "dataset.json").write_text(json.dumps(description, indent=1))
    return folder


@pytest.mark.parametrize("make", [nnunet_dataset, msd_task])
def test_dataset_json_layouts_give_the_same_cases_and_names(make, tmp_path):
    folder = make(tmp_path)
    cases = find_cases(folder)
    assert [c.name for c in cases] == hippocampus_cases()
    for case in cases:
        assert case.image.read_bytes() == (HIPPOCAMPUS / "imagesTr" / f"{case.name}.nii.gz").read_bytes()
        assert case.label.read_bytes() == (HIPPOCAMPUS / "labelsTr" / f"{case.name}.nii.gz").read_bytes()
    assert read_label_names(folder) == {1: "Anterior", 2: "Posterior"}


def test_labels_json_still_wins_over_dataset_json(tmp_path):
    folder = nnunet_dataset(tmp_path)
    (folder / "labels.json").write_text(json.dumps({"labels": {"1": "anterior hippocampus", "2": "posterior hippocampus"}}))
    assert read_label_names(folder) == {1: "anterior hippocampus", 2: "posterior hippocampus"}


@pytest.mark.parametrize("make, key", [(nnunet_dataset, "channels"), (msd_task, "modality")])
def test_multi_channel_datasets_are_refused_in_one_line(make, key, tmp_path):
    folder = make(tmp_path, {"0": "T2", "1": "ADC"})
    for read in (find_cases, read_label_names):
        with pytest.raises(SDMOrganSegError, match=r"2 input channels \(0: T2, 1: ADC\); SDMOrganSeg trains on single-channel images") as error:
            read(folder)
        assert "\n" not in str(error.value)


def test_missing_or_region_based_entries_are_named(tmp_path):
    folder = nnunet_dataset(tmp_path)
    (folder / "labelsTr" / "hippocampus_004.nii.gz").unlink()
    with pytest.raises(SDMOrganSegError, match="case hippocampus_004: the label map .*hippocampus_004.nii.gz listed by"):
        find_cases(folder)
    description = json.loads((folder / "dataset.json").read_text())
    description["labels"] = {"background": 0, "whole": [1, 2], "Posterior": 2}
    (folder / "dataset.json").write_text(json.dumps(description))
    with pytest.raises(SDMOrganSegError, match="region-based label 'whole'"):
        read_label_names(folder)


def test_train_command_runs_on_an_nnunet_dataset(tmp_path):
    pytest.importorskip("torch", reason="training needs PyTorch")
    folder = nnunet_dataset(tmp_path)
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "SDMOrganSegLib.cli", "train", str(folder), "--out", str(run), "--epochs", "1",
         "--max-cases", "1", "--patch", "16,16,16", "--threads", "1", "--device", "cpu", "--name", "hippocampus"],
        capture_output=True, text=True, cwd=REPO, env={"PYTHONPATH": str(REPO / "SDMOrganSeg"), "PATH": "/usr/bin:/bin"}, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    card = json.loads((run / "best" / "model.json").read_text())
    assert [o["name"] for o in card["organs"]] == ["Anterior", "Posterior"] and card["name"] == "hippocampus"
    if "hippocampus" in shipped_models():  # named like the shipped model: the trainer says how to pick this one
        assert f"like a shipped model, and --model hippocampus picks the shipped one: use this run's folder ({run / 'best'})" in done.stderr
    split = json.loads((run / "split.json").read_text())
    assert sorted(split["train"] + split["validation"]) == hippocampus_cases()

    (folder / "dataset.json").write_text(json.dumps({**json.loads((folder / "dataset.json").read_text()), "channel_names": {"0": "T2", "1": "ADC"}}))
    refused = subprocess.run(
        [sys.executable, "-m", "SDMOrganSegLib.cli", "train", str(folder), "--out", str(tmp_path / "run2")],
        capture_output=True, text=True, cwd=REPO, env={"PYTHONPATH": str(REPO / "SDMOrganSeg"), "PATH": "/usr/bin:/bin"}, timeout=600,
    )
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "single-channel" in refused.stderr
