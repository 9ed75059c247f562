"""Options of `segment` that change its result: --tta, --largest-component, and the --window minimum."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import HIPPOCAMPUS, calibrated_model
from scipy import ndimage
from test_segment_evaluate import run_cli

from SDMOrganSegLib.engines.inference import minimum_window, predict_array, segment_image, tta_axes
from SDMOrganSegLib.formats.modelfiles import Organ, load_model
from SDMOrganSegLib.method.postprocessing import keep_largest_component
from SDMOrganSegLib.method.preprocessing import normalize_intensity

IMAGE = HIPPOCAMPUS / "imagesTr" / "hippocampus_001.nii.gz"


def test_keep_largest_component_keeps_the_biggest_piece_of_each_label():
    labels = np.zeros((12, 14, 16), np.uint8)
    labels[1:5, 1:5, 1:5] = 1  # 64 voxels
    labels[8:10, 8:10, 8:10] = 1  # 8 voxels, apart
    labels[6, 6, 6] = 1  # 1 voxel, apart
    labels[1:3, 9:13, 9:13] = 3  # one piece only
    labels[3, 13, 13] = 3  # touches the piece above by a corner: 26-connected, kept
    before = labels.copy()
    removed = keep_largest_component(labels, [1, 2, 3])
    assert removed == {1: (9, 2)}
    assert np.count_nonzero(labels == 1) == 64 and labels[1:5, 1:5, 1:5].min() == 1
    np.testing.assert_array_equal(labels == 3, before == 3)
    assert set(np.unique(labels[before != labels])) == {0}


@pytest.fixture(scope="module")
def scattered_model(tmp_path_factory):
    """A random-weight model whose organs cover a few per cent of the image, in scattered pieces."""
    organs = [Organ("anterior", 1, (0.9, 0.3, 0.2)), Organ("posterior", 2, (0.2, 0.5, 0.9))]
    return calibrated_model(tmp_path_factory.mktemp("scattered"), "scattered", organs, IMAGE, [0.04, 0.03])


def test_tta_axes_follow_the_training_flips(scattered_model):
    card = load_model(scattered_model).card
    assert tta_axes(card) == (2,)  # trained elsewhere: taken to have flipped
    card.training = {"config": {"flip": True}}
    assert tta_axes(card) == (2,)
    card.training = {"config": {"flip": False}}
    assert tta_axes(card) == ()


def test_segment_image_with_tta_averages_the_mirrored_prediction(scattered_model):
    image = sitk.ReadImage(str(IMAGE))
    model = load_model(scattered_model)
    result = segment_image(image, model, "cpu", tta=True)
    assert result.settings == {"tta": True, "tta_mirror_axes": [2], "largest_component": False}
    # The hippocampus image is on the model's 1 mm grid: the SDMs are the network's output as it is.
    volume = normalize_intensity(sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32)), model.card.intensity)
    expected = predict_array(model.network, volume, torch.device("cpu"), mirror_axes=(2,))
    plain = predict_array(model.network, volume, torch.device("cpu"))
    for channel, organ in enumerate(model.card.organs):
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(result.sdms[organ.name]), expected[channel])
    assert np.abs(expected - plain).max() > 1e-3


def test_largest_component_only_removes_stray_pieces(scattered_model):
    image = sitk.ReadImage(str(IMAGE))
    model = load_model(scattered_model)
    plain = sitk.GetArrayFromImage(segment_image(image, model, "cpu").labels)
    result = segment_image(image, model, "cpu", largest_component=True)
    kept = sitk.GetArrayFromImage(result.labels)
    assert result.settings["largest_component"] is True
    for organ in model.card.organs:
        pieces = ndimage.label(plain == organ.label, structure=np.ones((3, 3, 3)))[1]
        assert pieces > 1, "the random model should scatter its organs"
        assert ndimage.label(kept == organ.label, structure=np.ones((3, 3, 3)))[1] == 1
        assert any(note.startswith(f"largest component: {organ.name} lost {pieces - 1} smaller") for note in result.notes)
    changed = kept != plain
    assert changed.any() and not kept[changed].any()  # voxels only go to background
    # The SDMs are what the network predicted, whatever the label map keeps.
    unchanged = segment_image(image, model, "cpu")
    for name, sdm in result.sdms.items():
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(sdm), sitk.GetArrayViewFromImage(unchanged.sdms[name]))


def test_cli_records_the_options_and_refuses_a_window_below_the_minimum(scattered_model, tmp_path):
    out = tmp_path / "out"
    done = run_cli("segment", str(IMAGE), "--model", str(scattered_model), "--out", str(out), "--device", "cpu", "--quiet", "--tta", "--largest-component")
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["tta"], summary["tta_mirror_axes"], summary["largest_component"]) == (True, [2], True)
    assert "largest component" in done.stderr

    plain = run_cli("segment", str(IMAGE), "--model", str(scattered_model), "--out", str(tmp_path / "plain"), "--device", "cpu", "--quiet")
    summary = json.loads((tmp_path / "plain" / "summary.json").read_text())
    assert plain.returncode == 0 and (summary["tta"], summary["largest_component"]) == (False, False)

    smallest = minimum_window(load_model(scattered_model).network)
    assert smallest == 16  # cpu preset: 4 downsamplings
    refused = run_cli("segment", str(IMAGE), "--model", str(scattered_model), "--out", str(tmp_path / "small"), "--window", "8,32,32")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "minimum of 16 voxels" in refused.stderr and "16,16,16" in refused.stderr
    assert not (tmp_path / "small").exists()
