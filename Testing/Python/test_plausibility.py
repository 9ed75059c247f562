"""Does the input fit the model? A CT given to an MR model (or an MR to a CT model) is refused before the
network unless forced, then a warning; warnings for an input far larger than the training crops and organ
volumes far outside the training range; none for fitting inputs."""

from __future__ import annotations

import dataclasses

import pytest
import SimpleITK as sitk
from conftest import CT, HIPPOCAMPUS, REPO

from SDMOrganSegLib.method.plausibility import input_warnings, looks_like_ct, modality_mismatch, volume_warnings

HIPPOCAMPUS_MODEL = REPO / "Resources" / "Models" / "hippocampus"
CT_IMAGE = CT / "example_ct_sm.nii.gz"
MR_IMAGE = HIPPOCAMPUS / "imagesTr" / "hippocampus_003.nii.gz"


def _warnings(notes):
    return [n for n in notes if n.startswith("warning: ")]


def test_ct_and_mr_are_told_apart():
    assert looks_like_ct(sitk.ReadImage(str(CT_IMAGE)))
    assert not looks_like_ct(sitk.ReadImage(str(MR_IMAGE)))


def test_ct_given_to_the_hippocampus_model_is_refused_before_the_network_unless_forced(monkeypatch):
    pytest.importorskip("torch")
    from SDMOrganSegLib.engines import inference
    from SDMOrganSegLib.common.errors import InputMismatchError
    from SDMOrganSegLib.formats.modelfiles import load_model

    model = load_model(HIPPOCAMPUS_MODEL)
    assert model.card.modality == "MR" and model.card.input_extent_mm and all(o.volume_ml for o in model.card.organs)
    ct = sitk.ReadImage(str(CT_IMAGE))[0:32, 30:62, 5:20]  # 96 x 96 x 45 mm of body and the air beside it: quick
    calls = []
    real_predict = inference.predict_array
    monkeypatch.setattr(inference, "predict_array", lambda *a, **k: calls.append(1) or real_predict(*a, **k))
    with pytest.raises(InputMismatchError) as refused:
        inference.segment_image(ct, model, "cpu")
    assert calls == []  # refused before the network ran
    message = str(refused.value)
    assert "this model is for MR" in message and "looks like a CT" in message and message.endswith("or segment it anyway with --force")
    assert "\n" not in message and refused.value.reason in message
    # Forced: segmented, and the mismatch is a warning in the notes (with the extent warning).
    ct_notes = _warnings(inference.segment_image(ct, model, "cpu", force=True).notes)
    assert calls == [1]
    assert any("this model is for MR" in n and "looks like a CT" in n and "--force" in n for n in ct_notes)
    assert any("far more than the images this model was trained on" in n for n in ct_notes)
    assert all("\n" not in n for n in ct_notes)
    assert _warnings(inference.segment_image(sitk.ReadImage(str(MR_IMAGE)), model, "cpu").notes) == []


def test_mr_given_to_a_ct_model_warns_and_a_ct_does_not():
    ct = sitk.ReadImage(str(CT_IMAGE))
    extent = [size * spacing for size, spacing in zip(ct.GetSize(), ct.GetSpacing())]
    mr_notes = input_warnings(sitk.ReadImage(str(MR_IMAGE)), "CT", "head and neck planning CT", extent)
    assert len(mr_notes) == 1 and "this model is for CT (head and neck planning CT)" in mr_notes[0] and "-1000 HU" in mr_notes[0]
    assert input_warnings(ct, "CT", "head and neck planning CT", extent) == []
    # A CT rescaled to [0, 1] has no air in HU either.
    rescaled = sitk.RescaleIntensity(sitk.Cast(ct, sitk.sitkFloat32), 0.0, 1.0)
    assert "no air at about -1000 HU" in input_warnings(rescaled, "CT", "", None)[0]
    # A card without modality or extent (older models) checks nothing.
    assert input_warnings(sitk.ReadImage(str(MR_IMAGE)), None, "", None) == []
    # The refusal's reason is the same check, without the "warning:" and the --force remark.
    reason = modality_mismatch(sitk.ReadImage(str(MR_IMAGE)), "CT", "head and neck planning CT")
    assert reason.startswith("this model is for CT (head and neck planning CT)") and mr_notes[0].startswith(f"warning: {reason}")
    assert modality_mismatch(ct, "CT") is None and modality_mismatch(ct, None) is None


def test_volume_warnings_flag_only_volumes_far_outside_the_training_range():
    ranges = {"anterior hippocampus": (1.05, 2.48), "posterior hippocampus": (0.99, 2.17), "other": None}
    assert volume_warnings({"anterior hippocampus": 1.5, "posterior hippocampus": 4.0, "other": 999.0}, ranges) == []
    notes = volume_warnings({"anterior hippocampus": 154.0, "posterior hippocampus": 0.3}, ranges)
    assert len(notes) == 2 and "anterior hippocampus volume 154 ml is far outside the 1.05-2.48 ml" in notes[0]
    # Not found (0 ml) is no warning: the organ may lie outside the field of view.
    assert volume_warnings({"anterior hippocampus": 0.0}, ranges) == []


def test_the_card_keeps_volume_ranges_modality_and_terminology(tmp_path):
    from SDMOrganSegLib.formats.modelfiles import ModelCard, read_card

    card = read_card(HIPPOCAMPUS_MODEL)
    copy = ModelCard.from_dict(card.to_dict())
    assert copy.modality == "MR" and copy.field_of_view == card.field_of_view and copy.input_extent_mm == card.input_extent_mm
    assert [o.volume_ml for o in copy.organs] == [o.volume_ml for o in card.organs]
    assert copy.organs[0].terminology["type"] == ["5366008", "SCT", "Hippocampus"]
    bad = card.to_dict()
    bad["modality"] = "PET"
    from SDMOrganSegLib.common.errors import SDMOrganSegError

    with pytest.raises(SDMOrganSegError, match="modality"):
        ModelCard.from_dict(bad)
    bad = card.to_dict()
    bad["organs"][0]["terminology"] = {"type": ["1", "SCT"]}
    with pytest.raises(SDMOrganSegError, match="terminology"):
        ModelCard.from_dict(bad)
    assert dataclasses.replace(card.organs[0], terminology=None) == card.organs[0]  # terminology is not identity


def test_a_dice_only_model_says_its_outputs_are_logits_not_distances():
    torch = pytest.importorskip("torch")
    import numpy as np

    from SDMOrganSegLib.engines.inference import segment_image
    from SDMOrganSegLib.formats.modelfiles import LoadedModel, ModelCard, organs_from_labels
    from SDMOrganSegLib.method.network import UNet3D, preset

    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32))
    said = {}
    for activation in ("none", "tanh"):
        torch.manual_seed(0)
        network = UNet3D(preset("cpu", 1, 1, output_activation=activation)).eval()
        model = LoadedModel(ModelCard(name=activation, architecture=network.config, organs=organs_from_labels({1: "organ"})), network, REPO)
        said[activation] = [n for n in segment_image(image, model, "cpu").notes if "logits" in n]
    assert len(said["none"]) == 1 and "only the 0 iso-contour is meaningful" in said["none"][0] and said["tanh"] == []


def test_segment_command_refuses_a_ct_for_the_mr_model_in_one_line(tmp_path):
    pytest.importorskip("torch")
    from test_segment_evaluate import run_cli

    crop = tmp_path / "ct.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(CT_IMAGE))[0:32, 30:62, 5:20], str(crop))
    done = run_cli("segment", str(crop), "--model", str(HIPPOCAMPUS_MODEL), "--out", str(tmp_path / "out"), "--device", "cpu", "--quiet")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdmorganseg: error: this model is for MR") and lines[0].endswith("--force")
    assert not (tmp_path / "out" / "labels.nii.gz").exists()
