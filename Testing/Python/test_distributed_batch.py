"""``torchrun --nproc-per-node=2 SDMOrganSeg/Scripts/batch.py`` (two CPU ranks, slicer-core) against one
process on the same four real hippocampus cases with references: the same files case by case, each
summary.json naming the rank that wrote it, one summary.csv gathered on rank 0; and the rerun after a
crash, which keeps the complete cases and does the rest.
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

import SimpleITK as sitk  # noqa: E402
from conftest import HIPPOCAMPUS, REPO, single_threaded_environment, torchrun  # noqa: E402

from SDMOrganSegLib.engines import distributed  # noqa: E402

BATCH = REPO / "SDMOrganSeg" / "Scripts" / "batch.py"
CASES = ["hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_006"]


def run_batch(processes: int, images: Path, output: Path, *extra: str) -> subprocess.CompletedProcess:
    launcher = torchrun(processes) if processes > 1 else [sys.executable]
    arguments = [str(BATCH), "--input", str(images), "--output", str(output), "--reference", str(HIPPOCAMPUS / "labelsTr"), "--device", "cpu", *extra]
    return subprocess.run(launcher + arguments, capture_output=True, text=True, timeout=600, cwd=str(REPO), env=single_threaded_environment())


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cohort") / "images"
    folder.mkdir()
    for case in CASES:
        shutil.copy(HIPPOCAMPUS / "imagesTr" / f"{case}.nii.gz", folder)
    return folder


@pytest.fixture(scope="module")
def cohort(images, tmp_path_factory) -> dict[int, tuple[Path, subprocess.CompletedProcess]]:
    root = tmp_path_factory.mktemp("cohort_out")
    return {processes: (root / f"ranks{processes}", run_batch(processes, images, root / f"ranks{processes}", "--pictures")) for processes in (1, 2)}


def _rows(output: Path) -> dict[str, dict[str, str]]:
    with open(output / "summary.csv", newline="", encoding="utf-8") as handle:
        return {row["case"]: row for row in csv.DictReader(handle)}


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_two_ranks_write_every_case_as_one_process_does(cohort, images):
    (one, single), (two, double) = cohort[1], cohort[2]
    assert single.returncode == 0, single.stdout + single.stderr
    assert double.returncode == 0, double.stdout + double.stderr
    assert "Traceback" not in double.stdout + double.stderr
    # The deal every rank computes: by input size, largest first to the emptiest rank.
    deal = distributed.shard([(images / f"{case}.nii.gz").stat().st_size for case in CASES], 2)
    expected_rank = {CASES[index]: rank for rank, share in enumerate(deal) for index in share}
    assert sorted(expected_rank.values()) == [0, 0, 1, 1]
    for case in CASES:
        first, second = json.loads((one / case / "summary.json").read_text()), json.loads((two / case / "summary.json").read_text())
        assert (first["rank"], first["world_size"]) == (0, 1)
        assert (second["rank"], second["world_size"]) == (expected_rank[case], 2)
        assert first["outputs"] == second["outputs"]
        for name in first["outputs"]:
            if name.endswith(".nii.gz"):  # label map and SDMs: the same voxels
                np.testing.assert_array_equal(_array(two / case / name), _array(one / case / name), err_msg=f"{case}/{name}")
        assert (two / case / "metrics.csv").read_text() == (one / case / "metrics.csv").read_text()
        assert f"{case}: ok" in double.stdout and f"(rank {expected_rank[case]})" in double.stdout
    # One table, on rank 0, in input order, the same as one process's but for the seconds.
    assert list(_rows(two)) == list(_rows(one)) == CASES
    for case in CASES:
        assert {k: v for k, v in _rows(two)[case].items() if k != "seconds"} == {k: v for k, v in _rows(one)[case].items() if k != "seconds"}
    assert double.stdout.count("4 of 4 case(s) succeeded") == 1
    assert (two / "overview.png").read_bytes().startswith(b"\x89PNG")


def _fingerprints(folder: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_rerun_after_a_crash_keeps_complete_cases_and_does_the_rest(cohort, images, tmp_path):
    """What a crash leaves: complete case folders (summary.json is moved in last), no summary.csv, cases
    not yet done. The same command on 2 ranks keeps the complete cases untouched, segments the missing one,
    and writes the whole table; with other settings, a complete case is refused as before, not mixed in."""
    reference, _ = cohort[2]
    output = tmp_path / "crashed"
    shutil.copytree(reference, output)
    (output / "summary.csv").unlink()
    (output / "overview.png").unlink()
    shutil.rmtree(output / CASES[2])
    kept = _fingerprints(output)

    again = run_batch(2, images, output, "--pictures")
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("complete from an earlier run, skipped") == 3 and f"{CASES[2]}: ok" in again.stdout
    after = _fingerprints(output)
    assert {name: after[name] for name in kept} == kept  # nothing of the complete cases was rewritten
    np.testing.assert_array_equal(_array(output / CASES[2] / "labels.nii.gz"), _array(reference / CASES[2] / "labels.nii.gz"))
    rows, expected = _rows(output), _rows(reference)
    for case in CASES:
        ignore = ("seconds", "notes")
        assert {k: v for k, v in rows[case].items() if k not in ignore} == {k: v for k, v in expected[case].items() if k not in ignore}
        assert ("complete from an earlier run" in rows[case]["notes"]) == (case != CASES[2])
    assert (output / "overview.png").read_bytes().startswith(b"\x89PNG")

    # Other settings (TTA the other way than the shipped model's card does it): the complete cases are not
    # taken as this run's, and not replaced either.
    (output / "summary.csv").unlink()
    (output / "overview.png").unlink()
    from SDMOrganSegLib.formats.modelfiles import read_card, resolve_model

    other_tta = "--no-tta" if read_card(resolve_model(None)).inference.get("tta") else "--tta"
    other = run_batch(2, images, output, "--pictures", other_tta)
    assert other.returncode == 1
    assert all(row["status"] == "failed" and "already exists" in row["reason"] for row in _rows(output).values())


def test_set_up_errors_stop_every_rank_with_one_line(cohort, images):
    output, _ = cohort[2]
    before = _fingerprints(output)
    refused = run_batch(2, images, output)
    text = refused.stdout + refused.stderr
    assert refused.returncode != 0
    assert len([line for line in text.splitlines() if line.startswith("sdmorganseg: error:") and "already exists (an earlier run)" in line]) == 1, text
    assert "[rank0]:" not in text and "[rank1]:" not in text
    assert _fingerprints(output) == before
