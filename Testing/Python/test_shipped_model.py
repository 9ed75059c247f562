"""The shipped hippocampus model: it loads, its checksum holds, and it reproduces its card's validation Dice."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import assert_corrupted_copy_refused, assert_sdm_is_a_distance, HIPPOCAMPUS, REPO

from SDMOrganSegLib.engines.inference import segment_image
from SDMOrganSegLib.method.metrics import organ_metrics
from SDMOrganSegLib.formats.modelfiles import WEIGHTS_FILE, load_model, resolve_model, sha256_of

MODEL = REPO / "Resources" / "Models" / "hippocampus"
VALIDATION_CASES = ["hippocampus_003", "hippocampus_004", "hippocampus_011"]

pytestmark = pytest.mark.skipif(not (MODEL / "model.json").is_file(), reason="no shipped model in Resources/Models/hippocampus")


def test_is_the_default_and_checksum_matches():
    assert resolve_model(None) == MODEL
    model = load_model(MODEL)
    assert sha256_of(MODEL / WEIGHTS_FILE) == model.card.weights_sha256
    assert model.card.organ_names == ["anterior hippocampus", "posterior hippocampus"]
    assert (MODEL / WEIGHTS_FILE).stat().st_size < 8 * 2**20
    split = json.loads((REPO / "Resources" / "Splits" / "hippocampus.json").read_text())
    assert model.card.training["split"]["validation"] == split["validation"]
    assert set(VALIDATION_CASES) <= set(split["validation"])


@pytest.mark.parametrize("case", VALIDATION_CASES)
def test_reaches_the_dice_its_card_claims(case):
    model = load_model(MODEL)
    metrics = model.card.metrics
    index = metrics["case_names"].index(case)
    image = sitk.ReadImage(str(HIPPOCAMPUS / "imagesTr" / f"{case}.nii.gz"))
    reference = np.rint(sitk.GetArrayFromImage(sitk.ReadImage(str(HIPPOCAMPUS / "labelsTr" / f"{case}.nii.gz")))).astype(int)
    prediction = sitk.GetArrayFromImage(segment_image(image, model, "cpu").labels)
    for organ in model.card.organs:
        dice = organ_metrics(prediction == organ.label, reference == organ.label, image.GetSpacing()).dice
        assert dice == pytest.approx(metrics["per_case"][organ.name]["dice"][index], abs=0.01)
        assert dice > 0.75


def test_sdm_head_gives_distances_that_agree_with_the_segmentation():
    """A dual model: its label map comes from the segmentation head and its SDMs from the SDM head; the SDMs
    must still be distances around the segmentation shown beside them (what the iso-contours promise)."""
    model = load_model(MODEL)
    assert model.card.architecture.heads == "dual"
    image = sitk.ReadImage(str(HIPPOCAMPUS / "imagesTr" / f"{VALIDATION_CASES[0]}.nii.gz"))
    result = segment_image(image, model, "cpu")
    labels = sitk.GetArrayFromImage(result.labels)
    for organ in model.card.organs:
        sdm = sitk.GetArrayFromImage(result.sdms[organ.name])
        assert_sdm_is_a_distance(sdm, labels == organ.label, image.GetSpacing(), model.card.training["sdm"]["scale_mm"])


def test_corrupted_copy_is_refused(tmp_path):
    assert_corrupted_copy_refused(MODEL, tmp_path)
