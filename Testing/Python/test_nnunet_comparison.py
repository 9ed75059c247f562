"""docs/nnunet: the OpenKBP export to an nnU-Net raw dataset and the validation scoring of the nnU-Net comparison
(docs/headneck.md), on a tiny synthetic OpenKBP-like folder. nnU-Net itself is not needed."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[2]
ORGANS = {"1": "brainstem", "2": "spinal cord"}


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "docs" / "nnunet" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write(array: np.ndarray, path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((2.0, 2.0, 2.0))
    sitk.WriteImage(image, str(path))


def cube(low: int, high: int, value: int = 1) -> np.ndarray:
    labels = np.zeros((12, 12, 12), np.uint8)
    labels[low:high, low:high, low:high] = value
    return labels


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """Three cases: hn_001 trains; hn_201 and hn_202 validate. The spinal cord is contoured only in hn_201."""
    root = tmp_path / "openkbp"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for case in ("hn_001", "hn_201", "hn_202"):
        write(np.full((12, 12, 12), -1000, np.int16), root / "imagesTr" / f"{case}.nii.gz")
        labels = cube(2, 6)  # brainstem: a 4^3 cube
        labels[8:10, 8:10, 8:10] = 2  # spinal cord voxels, also where it is not contoured (then unknown)
        write(labels, root / "labelsTr" / f"{case}.nii.gz")
    (root / "labels.json").write_text(json.dumps({"labels": ORGANS}))
    (root / "splits.json").write_text(json.dumps({"train": ["hn_001"], "validation": ["hn_201", "hn_202"]}))
    annotations = {"hn_001": ["brainstem", "spinal cord"], "hn_201": ["brainstem", "spinal cord"], "hn_202": ["brainstem"]}
    (root / "annotations.json").write_text(json.dumps(annotations))
    return root


def test_export_writes_nnunet_layout_and_refuses_to_overwrite(data: Path, tmp_path: Path, capsys) -> None:
    export = load("export_openkbp")
    export.main(["--data", str(data), "--out", str(tmp_path / "raw")])
    root = tmp_path / "raw" / "Dataset501_OpenKBP"
    assert sorted(p.name for p in (root / "imagesTr").iterdir()) == ["hn_001_0000.nii.gz"]
    assert sorted(p.name for p in (root / "labelsTr").iterdir()) == ["hn_001.nii.gz"]
    assert sorted(p.name for p in (root / "imagesVal").iterdir()) == ["hn_201_0000.nii.gz", "hn_202_0000.nii.gz"]
    assert (root / "labelsTr" / "hn_001.nii.gz").resolve() == (data / "labelsTr" / "hn_001.nii.gz").resolve()
    dataset = json.loads((root / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "CT"}
    assert dataset["labels"] == {"background": 0, "brainstem": 1, "spinal cord": 2}
    assert dataset["numTraining"] == 1 and dataset["file_ending"] == ".nii.gz"

    with pytest.raises(SystemExit) as refused:
        export.main(["--data", str(data), "--out", str(tmp_path / "raw")])
    assert "exists" in str(refused.value) and "nothing is overwritten" in str(refused.value)
    with pytest.raises(SystemExit) as missing:
        export.main(["--data", str(tmp_path), "--out", str(tmp_path / "raw2")])
    assert "has no splits.json" in str(missing.value)


def test_scoring_ignores_unannotated_organs_and_pairs_cases(data: Path, tmp_path: Path) -> None:
    score = load("score_validation")
    perfect, shifted = tmp_path / "perfect", tmp_path / "shifted"
    perfect.mkdir()
    shifted.mkdir()
    for case in ("hn_201", "hn_202"):
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "labelsTr" / f"{case}.nii.gz")))
        write(reference, perfect / f"{case}.nii.gz")
        moved = cube(3, 7)  # the brainstem cube one voxel further along every axis; no spinal cord at all
        write(moved, shifted / f"{case}.nii.gz")
    out_csv = tmp_path / "cases.csv"
    markdown = tmp_path / "table.md"
    score.main(["--data", str(data), "--pred", f"A={perfect}/{{case}}.nii.gz", "--pred", f"B={shifted}/{{case}}.nii.gz",
                "--work", str(tmp_path / "work"), "--csv", str(out_csv), "--markdown", str(markdown)])
    rows = list(csv.DictReader(out_csv.open()))
    # brainstem in both cases, spinal cord only where contoured (hn_201): 3 rows per method
    assert sorted((r["method"], r["case"], r["organ"]) for r in rows) == sorted(
        [(m, "hn_201", "brainstem") for m in "AB"] + [(m, "hn_202", "brainstem") for m in "AB"]
        + [(m, "hn_201", "spinal cord") for m in "AB"])
    by_key = {(r["method"], r["case"], r["organ"]): r for r in rows}
    assert float(by_key["A", "hn_201", "brainstem"]["dice"]) == 1.0
    # 4^3 cubes offset by one voxel on each axis overlap in 3^3: Dice = 2 * 27 / (64 + 64)
    assert float(by_key["B", "hn_202", "brainstem"]["dice"]) == pytest.approx(54 / 128, abs=1e-4)
    assert float(by_key["B", "hn_201", "spinal cord"]["dice"]) == 0.0
    assert math.isinf(float(by_key["B", "hn_201", "spinal cord"]["hd95"]))
    table = markdown.read_text()
    assert "| spinal cord | 1 | A | 1.000 ± 0.000 |" in table
    assert "| B | 0.000 ± 0.000 | — (1 empty) |" in table
    # A new method beside the earlier ones, whose predictions are gone: --scored takes their rows as they are,
    # after the new reference (C: the shifted maps again, so B's rows pair with identical values).
    again = tmp_path / "again.csv"
    score.main(["--data", str(data), "--pred", f"C={shifted}/{{case}}.nii.gz", "--scored", str(out_csv),
                "--work", str(tmp_path / "work"), "--csv", str(again), "--markdown", str(markdown)])
    merged = list(csv.DictReader(again.open()))
    assert sorted({r["method"] for r in merged}) == ["A", "B", "C"] and len(merged) == 9
    table = markdown.read_text()
    assert "(vs C)" in table and "| spinal cord | 1 | C | 0.000 ± 0.000 | — (1 empty) |" in table
    assert "| B | 0.000 ± 0.000 | — (1 empty) | — | 1 / 1 |" in table  # the same maps as C: no difference


def test_pred_argument_needs_a_case_placeholder() -> None:
    score = load("score_validation")
    with pytest.raises(Exception) as error:
        score.parse_pred("nnU-Net=/preds/hn.nii.gz")
    assert "{case}" in str(error.value)
