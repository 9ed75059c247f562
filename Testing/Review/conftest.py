"""Fixtures of the review suite (``sdmorganseg snapshot`` and ``review``), which needs the review extra and
runs in its own virtual environment (``.ci/run``; README, "Review in a browser").

Outside CI a test whose tool is missing (the review extra, Chromium) skips and says why; under
``CI=true`` it fails instead, so CI never passes by skipping.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[2]
HIPPOCAMPUS = REPO / "Testing" / "Data" / "hippocampus"
sys.path.insert(0, str(REPO / "SDMOrganSeg"))
IN_CI = os.environ.get("CI", "").lower() == "true"


def require(condition: bool, reason: str) -> None:
    """Skip (outside CI) or fail (under CI=true) when ``condition`` is false."""
    if not condition:
        if IN_CI:
            pytest.fail(f"CI needs this: {reason}")
        pytest.skip(reason)


def require_review_extra() -> None:
    import importlib.util

    require(importlib.util.find_spec("trame_slicer") is not None, "the review extra is not installed (pip install -e '.[review]')")


def _segment(cases: list[str], out: Path, *extra: str) -> Path:
    from SDMOrganSegLib.cli import main

    for case in cases:
        image = HIPPOCAMPUS / "imagesTr" / f"{case}.nii.gz"
        assert main(["segment", str(image), "--out", str(out / case), "--quiet", *extra]) == 0
    return out


@pytest.fixture(scope="session")
def segmented(tmp_path_factory) -> Path:
    """The three bundled hippocampus cases segmented by the shipped model (the real ``segment`` command)."""
    require_review_extra()
    return _segment(["hippocampus_001", "hippocampus_003", "hippocampus_004"], tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="session")
def segmented_without_tta(tmp_path_factory) -> Path:
    """The same cases without test-time augmentation: a second run that differs a little, for --compare."""
    require_review_extra()
    return _segment(["hippocampus_001", "hippocampus_003", "hippocampus_004"], tmp_path_factory.mktemp("run-no-tta"), "--no-tta")


def make_case(folder: Path, image: sitk.Image, labels: sitk.Image, organs: dict[str, tuple[int, tuple[float, float, float]]]) -> Path:
    """A case folder as ``segment`` writes it (image beside it, labels, SDMs, summary), without contour files."""
    from SDMOrganSegLib.common.files import safe_name
    from SDMOrganSegLib.method.sdm import normalized_sdm

    folder.mkdir(parents=True)
    sitk.WriteImage(image, str(folder / "image.nii.gz"))
    sitk.WriteImage(labels, str(folder / "labels.nii.gz"))
    array = sitk.GetArrayFromImage(labels)
    for name, (label, _) in organs.items():
        sdm = sitk.GetImageFromArray(normalized_sdm(array == label, labels.GetSpacing()).astype(np.float32))
        sdm.CopyInformation(labels)
        sitk.WriteImage(sdm, str(folder / f"sdm_{safe_name(name)}.nii.gz"))
    summary = {
        "model": "synthetic", "input": str(folder / "image.nii.gz"), "sdm_levels": [0.0, 0.1, 0.2, 0.3],
        "organs": {name: {"label": label, "color": list(color), "volume_ml": float(np.count_nonzero(array == label)) / 1000} for name, (label, color) in organs.items()},
    }
    (folder / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return folder


def break_grid(case: Path, target: Path) -> Path:
    """A copy of a case whose label map was cropped: its files disagree in grid."""
    shutil.copytree(case, target)
    labels = sitk.ReadImage(str(target / "labels.nii.gz"))
    sitk.WriteImage(labels[:-2, :, :], str(target / "labels.nii.gz"))
    return target
