"""Training and fine-tuning from the scene, on a real (headless) Slicer scene from slicer-core.

Volumes and segmentations of the six real hippocampus cases are loaded as a user has them after correcting
results in the Segment Editor (label maps loaded as segmentations, segments named as organs). They become a
training folder; a short fine-tuning of the shipped model runs in the background process the panel uses,
is cancelled (the last checkpoint is kept, the scene is as it was), resumed, and its model segments a volume.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' module found is not slicer-core (no vtkMRMLScene)", allow_module_level=True)
import SimpleITK as sitk  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "SDMOrganSeg"))

from SDMOrganSegLib.mrml import headless, mrmllogic, mrmltraining  # noqa: E402
from SDMOrganSegLib.formats import modelfiles  # noqa: E402
from SDMOrganSegLib.common.errors import SDMOrganSegError  # noqa: E402
from SDMOrganSegLib.formats.finetuning import FINE_TUNING_LEARNING_RATE  # noqa: E402
from conftest import HIPPOCAMPUS, hippocampus_cases, needs_torch  # noqa: E402

ORGANS = {1: "anterior hippocampus", 2: "posterior hippocampus"}


@pytest.fixture(scope="module")
def session():
    return headless.start()


def _counts(scene) -> tuple[int, int]:
    return scene.GetNumberOfNodes(), scene.GetSubjectHierarchyNode().GetNumberOfItems()


def _pair(case: str, names=("Anterior_Hippocampus", "posterior hippocampus")):
    """A volume and its (corrected) segmentation, segments named as organs, spelled as users do."""
    volume = headless.load_volume(HIPPOCAMPUS / "imagesTr" / f"{case}.nii.gz", name=case)
    segmentation = headless.load_segmentation(HIPPOCAMPUS / "labelsTr" / f"{case}.nii.gz", name=f"{case} corrected")
    content = segmentation.GetSegmentation()
    for index, name in enumerate(names):
        content.GetNthSegment(index).SetName(name)
    return volume, segmentation


@pytest.fixture(scope="module")
def pairs(session):
    return [_pair(case) for case in hippocampus_cases()]


def _file_labels(case: str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(HIPPOCAMPUS / "labelsTr" / f"{case}.nii.gz"))).astype(np.int64)


# --- the scene as a training folder -------------------------------------------------------------------------------


def test_scene_pairs_become_a_training_folder_and_the_scene_is_unchanged(session, pairs, tmp_path):
    before = _counts(session.scene)
    names = mrmltraining.export_training_folder(pairs, ORGANS, tmp_path / "data", session.scene)
    assert _counts(session.scene) == before, "temporary label maps must be removed"
    assert names == [volume.GetName() for volume, _segmentation in pairs]  # the volume names (unique in the scene)
    assert json.loads((tmp_path / "data" / "labels.json").read_text()) == {"labels": {"1": "anterior hippocampus", "2": "posterior hippocampus"}}
    assert not (tmp_path / "data" / "annotations.json").exists(), "every organ is contoured in every case"
    for name, case in zip(names, hippocampus_cases()):
        image = sitk.ReadImage(str(tmp_path / "data" / "imagesTr" / f"{name}.nii.gz"))
        original = sitk.ReadImage(str(HIPPOCAMPUS / "imagesTr" / f"{case}.nii.gz"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(original))
        np.testing.assert_allclose(image.GetOrigin(), original.GetOrigin(), atol=1e-5)
        np.testing.assert_allclose(image.GetDirection(), original.GetDirection(), atol=1e-6)
        labels = sitk.ReadImage(str(tmp_path / "data" / "labelsTr" / f"{name}.nii.gz"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), _file_labels(case))
        assert labels.GetSize() == image.GetSize()
    # Exported again unchanged: no file is rewritten, so a resumed run keeps its preprocessed cache.
    times = {p: p.stat().st_mtime_ns for p in (tmp_path / "data").rglob("*.nii.gz")}
    time.sleep(0.05)
    mrmltraining.export_training_folder(pairs, ORGANS, tmp_path / "data", session.scene)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "data").rglob("*.nii.gz")} == times
    # Other pairs for a new run: the cases of the earlier export are removed with prune (not without).
    mrmltraining.export_training_folder(pairs[2:], ORGANS, tmp_path / "data", session.scene, prune=True)
    assert sorted(p.name for p in (tmp_path / "data" / "imagesTr").iterdir()) == sorted(f"{name}.nii.gz" for name in names[2:])
    assert sorted(p.name for p in (tmp_path / "data" / "labelsTr").iterdir()) == sorted(f"{name}.nii.gz" for name in names[2:])


def test_segments_are_mapped_to_the_organs_by_name_not_by_order(session, tmp_path):
    volume, segmentation = _pair("hippocampus_001", names=("POSTERIOR hippocampus", "anterior-hippocampus"))
    other = _pair("hippocampus_003")
    case = mrmltraining.export_training_folder([(volume, segmentation), other], ORGANS, tmp_path, session.scene)[0]
    assert case == volume.GetName()
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "labelsTr" / f"{case}.nii.gz")))
    original = _file_labels("hippocampus_001")
    np.testing.assert_array_equal(labels == 2, original == 1)  # the file's label 1 was named posterior
    np.testing.assert_array_equal(labels == 1, original == 2)
    for node in (volume, segmentation, *other):
        session.scene.RemoveNode(node)


def test_an_unknown_segment_name_is_refused_in_one_line_and_nothing_is_written(session, pairs, tmp_path):
    volume, segmentation = _pair("hippocampus_004", names=("anterior hippocampus", "tumour"))
    before = _counts(session.scene)
    with pytest.raises(SDMOrganSegError) as caught:
        mrmltraining.export_training_folder([pairs[0], (volume, segmentation)], ORGANS, tmp_path / "data", session.scene)
    message = str(caught.value)
    assert "'tumour'" in message and "anterior hippocampus, posterior hippocampus" in message and "\n" not in message
    assert not (tmp_path / "data").exists()
    assert _counts(session.scene) == before
    with pytest.raises(SDMOrganSegError, match="at least 2"):
        mrmltraining.export_training_folder(pairs[:1], ORGANS, tmp_path / "data", session.scene)
    session.scene.RemoveNode(volume)
    session.scene.RemoveNode(segmentation)


def test_an_organ_without_a_segment_is_not_contoured_there(session, pairs, tmp_path):
    volume, segmentation = _pair("hippocampus_006")
    segmentation.GetSegmentation().RemoveSegment(segmentation.GetSegmentation().GetNthSegmentID(1))
    first, case = mrmltraining.export_training_folder([pairs[0], (volume, segmentation)], ORGANS, tmp_path, session.scene)
    assert json.loads((tmp_path / "annotations.json").read_text()) == {
        first: ["anterior hippocampus", "posterior hippocampus"], case: ["anterior hippocampus"],
    }
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "labelsTr" / f"{case}.nii.gz")))
    np.testing.assert_array_equal(labels, np.where(_file_labels("hippocampus_006") == 1, 1, 0))
    session.scene.RemoveNode(volume)
    session.scene.RemoveNode(segmentation)


def test_scratch_organs_come_from_the_segment_names(session, pairs):
    assert mrmltraining.scene_organs(pairs) == {1: "Anterior_Hippocampus", 2: "posterior hippocampus"}


def test_the_output_folder_must_be_new_empty_or_a_run(tmp_path):
    assert mrmltraining.check_run_folder(tmp_path / "new") == tmp_path / "new"
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.docx").write_text("precious")
    with pytest.raises(SDMOrganSegError, match="holds other files \\(thesis.docx\\)"):
        mrmltraining.check_run_folder(tmp_path / "home")
    with pytest.raises(SDMOrganSegError, match="choose an output folder"):
        mrmltraining.check_run_folder(".")


def test_a_model_to_fine_tune_brings_its_loss_mode():
    """What the panel's loss selector switches to when a model is chosen to start from."""
    assert mrmltraining.training_mode_of("hippocampus") == "dual"  # two heads: only dual keeps them
    assert mrmltraining.training_mode_of(str(modelfiles.shipped_models()["headneck-oar"])) == modelfiles.read_card(
        modelfiles.shipped_models()["headneck-oar"]).training["config"]["mode"]
    assert mrmltraining.training_mode_of("scratch:cpu") is None and mrmltraining.training_mode_of("no-such-model") is None


def test_a_data_folder_is_used_as_it_is(tmp_path):
    fields = mrmltraining.prepare_training(tmp_path / "run", "scratch:paper", "dice", 30, data_dir=HIPPOCAMPUS)
    assert fields["data_dir"] == str(HIPPOCAMPUS) and fields["preset"] == "paper" and fields["mode"] == "dice"
    assert fields["validate_every"] == 3 and fields["model_name"] == "run" and "init_model" not in fields
    fine = mrmltraining.prepare_training(tmp_path / "run", "hippocampus", "dual", 5, data_dir=HIPPOCAMPUS)
    assert fine["init_model"] == str(modelfiles.shipped_models()["hippocampus"])
    assert fine["learning_rate"] == FINE_TUNING_LEARNING_RATE and fine["spacing"] == (1.0, 1.0, 1.0) and fine["mode"] == "dual"
    with pytest.raises(SDMOrganSegError, match="mode sdm\\+dice: single output head\\(s\\) \\(the model's: dual\\)"):
        mrmltraining.prepare_training(tmp_path / "run", "hippocampus", "sdm+dice", 5, data_dir=HIPPOCAMPUS)
    with pytest.raises(SDMOrganSegError, match="mode dice: output activation none \\(the model's: tanh\\)"):
        mrmltraining.prepare_training(tmp_path / "run", "hippocampus", "dice", 5, data_dir=HIPPOCAMPUS)


def test_progress_is_read_from_the_log(tmp_path):
    assert mrmltraining.read_training_progress(tmp_path, 10) is None
    rows = [
        {"epoch": 0, "val_mean_dice": 0.84}, {"epoch": 1, "loss": -5.8, "eta_s": 300},
        {"epoch": 2, "loss": -5.9, "val_mean_dice": 0.85, "eta_s": 240}, {"epoch": 3, "loss": -5.95, "eta_s": 200},
    ]
    with open(tmp_path / "log.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["epoch", "val_mean_dice", "loss", "eta_s"])
        writer.writeheader()
        writer.writerows(rows)
    progress = mrmltraining.read_training_progress(tmp_path, 10)
    assert (progress.epoch, progress.fraction, progress.base_dice, progress.best_dice, progress.validated_epoch) == (3, 0.3, 0.84, 0.85, 2)
    assert progress.describe() == (
        "Epoch 3/10: loss -5.9500, validation Dice 0.850 (epoch 2; best 0.850; before fine-tuning 0.840), about 3 min left"
    )


# --- a short fine-tuning in the background: cancel, resume, a model that segments ------------------------------------


def _wait_for_epoch(run, epoch: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert run.poll() == "running", f"{run.state}: {run.message}"
        progress = run.training_progress()
        if progress is not None and progress.epoch >= epoch:
            return
        assert time.monotonic() < deadline, "no epoch finished in time"
        time.sleep(0.05)


def test_fine_tuning_from_the_scene_cancel_resume_and_segment(session, pairs, tmp_path):
    needs_torch()
    scene = session.scene
    run_dir = tmp_path / "hippocampus-clinic"
    before = _counts(scene)
    config = mrmltraining.prepare_training(run_dir, "hippocampus", "dual", 6, "cpu", pairs=pairs[:5], scene=scene, threads=1)
    assert _counts(scene) == before
    assert config["validate_every"] == 1 and config["init_model"] == str(modelfiles.shipped_models()["hippocampus"])

    run = mrmltraining.TrainingRun(config, python=sys.executable)
    try:
        run.start()
        _wait_for_epoch(run, 1)
        run.cancel()
        assert run.wait(timeout=120) == "cancelled"
        assert "checkpoint" in run.message and "resume" in run.message
    finally:
        run.cleanup()
    assert _counts(scene) == before, "a cancelled run leaves the scene as it was"
    stopped = mrmltraining.read_training_progress(run_dir, 6)
    assert 1 <= stopped.epoch < 6 and stopped.base_dice is not None
    assert (run_dir / "checkpoint.pt").is_file() and mrmltraining.can_resume(run_dir)
    assert not (run_dir / "last").exists()

    # Resume: the same request (the pairs are exported again, unchanged) continues after the last checkpoint.
    config = mrmltraining.prepare_training(run_dir, "hippocampus", "dual", 6, "cpu", pairs=pairs[:5], scene=scene, threads=1)
    run = mrmltraining.TrainingRun(config, python=sys.executable)
    try:
        run.start()
        assert run.wait(timeout=600) == "done", run.message
        result = run.result()
    finally:
        run.cleanup()
    log = (run_dir / "training.log").read_text()
    assert f"resuming after epoch {stopped.epoch}" in log
    epochs = [int(row["epoch"]) for row in csv.DictReader(open(run_dir / "log.csv"))]
    assert epochs == list(range(0, 7)), "one log row per epoch, none repeated or lost across the cancel"

    model_dir = Path(result["model_dir"])
    assert model_dir == run_dir / "best"
    model = modelfiles.load_model(model_dir)
    card, base = model.card, modelfiles.read_card(modelfiles.shipped_models()["hippocampus"])
    assert card.name == "hippocampus-clinic"
    assert card.organs == base.organs and [o.terminology for o in card.organs] == [o.terminology for o in base.organs]
    for organ, base_organ in zip(card.organs, base.organs):
        assert organ.volume_ml[0] <= base_organ.volume_ml[0] and organ.volume_ml[1] >= base_organ.volume_ml[1]
    assert (card.spacing, card.intensity, card.heaviside_k, card.window, card.modality) == (
        base.spacing, base.intensity, base.heaviside_k, base.window, base.modality
    )
    assert card.training["sdm"] == {"normalization": "clip", "scale_mm": 5.0} and card.inference == {"tta": True} and card.architecture == base.architecture
    assert card.training["base_model"]["name"] == "hippocampus" and card.training["base_model"]["weights_sha256"] == base.weights_sha256
    assert card.training["config"]["learning_rate"] == FINE_TUNING_LEARNING_RATE and card.training["data"] == str(run_dir / "data")
    assert card.metrics["split"] == "validation" and set(card.metrics["per_organ"]) == set(ORGANS.values())
    assert result["summary"] == card.metrics["per_organ"] and result["epoch"] == card.metrics["epoch"]

    # The new model segments a volume of the scene as the shipped one does: named, coloured organs.
    volume = headless.load_volume(HIPPOCAMPUS / "imagesTr" / "hippocampus_011.nii.gz")
    outputs = mrmllogic.SDMSegmentationLogic(scene).segment_volume(volume, model_dir, "cpu", "0")
    segments = outputs.segmentation.GetSegmentation()
    assert [segments.GetNthSegment(i).GetName() for i in range(2)] == list(ORGANS.values())
    np.testing.assert_allclose(segments.GetNthSegment(0).GetColor(), base.organs[0].color)
    labels = sitk.GetArrayViewFromImage(outputs.computed.labels)
    reference = _file_labels("hippocampus_011")
    for value in ORGANS:
        dice = 2 * np.sum((labels == value) & (reference == value)) / (np.sum(labels == value) + np.sum(reference == value))
        assert dice > 0.7, f"organ {value}: Dice {dice:.3f}"
