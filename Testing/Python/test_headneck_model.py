"""The shipped head-and-neck CT organ-at-risk model: it loads, its checksum and terminology hold, it
reproduces its card's validation Dice on two real validation CTs, and a full-resolution planning CT goes
through the sliding window with its geometry kept."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import assert_corrupted_copy_refused, assert_sdm_is_a_distance, DATA, REPO

pytest.importorskip("torch")

from SDMOrganSegLib.engines.inference import segment_image  # noqa: E402
from SDMOrganSegLib.method.metrics import organ_metrics  # noqa: E402
from SDMOrganSegLib.formats.modelfiles import WEIGHTS_FILE, load_model, resolve_model, sha256_of  # noqa: E402

MODEL = REPO / "Resources" / "Models" / "headneck-oar"
CASES = DATA / "openkbp-hn"
VALIDATION_CASES = ["hn_226", "hn_235"]

pytestmark = pytest.mark.skipif(not (MODEL / "model.json").is_file(), reason="no shipped model in Resources/Models/headneck-oar")


@pytest.fixture(scope="module")
def model():
    return load_model(MODEL)


def test_loads_by_name_with_checksum_organs_and_terminology(model):
    assert resolve_model("headneck-oar") == MODEL
    assert sha256_of(MODEL / WEIGHTS_FILE) == model.card.weights_sha256
    names = json.loads((CASES / "labels.json").read_text())["labels"]
    assert {o.label: o.name for o in model.card.organs} == {int(k): v for k, v in names.items()}
    assert all(o.terminology and o.terminology["type"][1] == "SCT" for o in model.card.organs)
    assert model.card.modality == "CT" and model.card.intensity["method"] == "window" and model.card.window
    assert all(o.volume_ml and 0 < o.volume_ml[0] < o.volume_ml[1] for o in model.card.organs)


@pytest.mark.parametrize("case", VALIDATION_CASES)
def test_reaches_the_dice_its_card_claims(model, case):
    metrics = model.card.metrics
    image = sitk.ReadImage(str(CASES / "imagesTr" / f"{case}.nii.gz"))
    assert np.allclose(image.GetSpacing(), model.card.spacing, rtol=1e-3)  # the card's metrics are on this grid
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(CASES / "labelsTr" / f"{case}.nii.gz")))
    annotated = json.loads((CASES / "annotations.json").read_text())[case]
    result = segment_image(image, model, "cpu")
    assert not [n for n in result.notes if n.startswith("warning: ")]
    prediction = sitk.GetArrayFromImage(result.labels)
    checked = 0
    for organ in model.card.organs:
        if organ.name not in annotated:
            continue  # not contoured in this case: unknown, no claim
        index = metrics["organ_case_names"][organ.name].index(case)
        dice = organ_metrics(prediction == organ.label, reference == organ.label, image.GetSpacing()).dice
        assert dice == pytest.approx(metrics["per_case"][organ.name]["dice"][index], abs=0.01), organ.name
        checked += 1
    assert checked == len(annotated)


def test_full_resolution_planning_ct_keeps_its_geometry(model):
    """A case upsampled to 512 x 512 in-plane (0.98 mm), 40 slices: sliding windows on the model grid, every
    output on the input's exact grid, and the organs the same as on the native grid."""
    native = sitk.ReadImage(str(CASES / "imagesTr" / "hn_235.nii.gz"))[:, :, 30:70]
    spacing = (native.GetSpacing()[0] / 4, native.GetSpacing()[1] / 4, native.GetSpacing()[2])
    size = [native.GetSize()[0] * 4, native.GetSize()[1] * 4, native.GetSize()[2]]
    # Voxel centres of the fine grid: the same physical extent (origin moved by -3/8 of a coarse voxel).
    origin = [o - 1.5 * s for o, s in zip(native.GetOrigin()[:2], spacing[:2])] + [native.GetOrigin()[2]]
    fine = sitk.Resample(native, size, sitk.Transform(), sitk.sitkLinear, origin, spacing, native.GetDirection(), -1024.0, sitk.sitkInt16)
    result = segment_image(fine, model, "cpu")
    for image in [result.labels, *result.sdms.values()]:
        assert image.GetSize() == fine.GetSize() and image.GetSpacing() == fine.GetSpacing()
        assert image.GetOrigin() == fine.GetOrigin() and image.GetDirection() == fine.GetDirection()
    assert all(w < s for w, s in zip(model.card.window, native.GetSize()[:2]))  # several windows per slice
    coarse = segment_image(native, model, "cpu").labels
    back = sitk.GetArrayFromImage(sitk.Resample(result.labels, coarse, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    coarse_array = sitk.GetArrayFromImage(coarse)
    for organ in model.card.organs:
        a, b = back == organ.label, coarse_array == organ.label
        if a.sum() + b.sum() > 200:  # organs with a few hundred voxels on the coarse grid
            assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.8, organ.name


def test_sdm_outputs_are_distances_around_the_segmentation(model):
    """The iso-contours at 0.1-0.3 mean millimetres: a dual model's SDM head, on a validation CT, is negative
    inside each organ the segmentation head finds, positive outside, and rises with the distance from its
    surface (organs the segmentation finds with fewer than 30 voxels are too small to judge)."""
    if model.card.architecture.heads != "dual":
        pytest.xfail("the shipped preview is Dice-only: its 'SDM' outputs are logits, not distances (issue 20 replaces it)")
    image = sitk.ReadImage(str(CASES / "imagesTr" / "hn_235.nii.gz"))
    result = segment_image(image, model, "cpu")
    labels = sitk.GetArrayFromImage(result.labels)
    judged = []
    for organ in model.card.organs:
        mask = labels == organ.label
        if mask.sum() >= 30:
            sdm = sitk.GetArrayFromImage(result.sdms[organ.name])
            assert_sdm_is_a_distance(sdm, mask, image.GetSpacing(), model.card.training["sdm"]["scale_mm"])
            judged.append(organ.name)
    assert len(judged) >= 5, judged


def test_corrupted_copy_is_refused(tmp_path):
    assert_corrupted_copy_refused(MODEL, tmp_path)
