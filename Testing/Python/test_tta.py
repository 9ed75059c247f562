"""Mirroring test-time augmentation: the average of the mirrored predictions, mirrored back."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from SDMOrganSegLib.engines.inference import mirror_subsets, predict_array  # noqa: E402
from SDMOrganSegLib.method.network import UNet3D, preset  # noqa: E402
from conftest import float32_tolerance  # noqa: E402


def test_mirror_subsets_lists_every_flip_once():
    assert mirror_subsets(()) == [()]
    assert mirror_subsets((2,)) == [(), (2,)]
    assert sorted(mirror_subsets((0, 2, 2))) == sorted([(), (0,), (2,), (0, 2)])


def test_mirrored_prediction_is_the_mean_of_the_flipped_outputs():
    torch.manual_seed(1)
    network = UNet3D(preset("cpu", 1, 2)).eval()
    volume = np.random.default_rng(0).normal(size=(20, 24, 18)).astype(np.float32)
    plain = predict_array(network, volume, torch.device("cpu"))
    tta = predict_array(network, volume, torch.device("cpu"), mirror_axes=(2,))
    with torch.no_grad():
        flipped = network(torch.from_numpy(volume[..., ::-1].copy())[None, None])[0].numpy()[..., ::-1]
    expected = (plain + flipped) / 2
    # The two paths differ only in the order of float32 sums.
    np.testing.assert_allclose(tta, expected, atol=float32_tolerance(network, np.abs(expected).max()))
    assert np.abs(tta - plain).max() > 1e-3  # a random network is not mirror-symmetric: TTA changed it


def test_the_cards_inference_default_decides_tta_unless_the_caller_does(tmp_path):
    import SimpleITK as sitk

    from SDMOrganSegLib.engines.inference import segment_image
    from SDMOrganSegLib.formats.modelfiles import LoadedModel, ModelCard, load_model, organs_from_labels, save_model

    torch.manual_seed(2)
    network = UNet3D(preset("cpu", 1, 1)).eval()
    card = ModelCard(name="m", architecture=network.config, organs=organs_from_labels({1: "organ"}), inference={"tta": True})
    save_model(network, card, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.card.inference == {"tta": True}  # survives the card file
    image = sitk.GetImageFromArray(np.random.default_rng(3).normal(size=(20, 24, 18)).astype(np.float32))
    by_default = segment_image(image, loaded, "cpu")
    assert by_default.settings["tta"] is True and by_default.settings["tta_mirror_axes"] == [2]
    explicit_off = segment_image(image, loaded, "cpu", tta=False)
    assert explicit_off.settings["tta"] is False
    sdm_on, sdm_off = (sitk.GetArrayFromImage(r.sdms["organ"]) for r in (by_default, explicit_off))
    assert np.abs(sdm_on - sdm_off).max() > 1e-3
    # A card that says nothing: no TTA, as before.
    plain = LoadedModel(card=ModelCard(name="p", architecture=network.config, organs=card.organs), network=network, directory=tmp_path)
    assert segment_image(image, plain, "cpu").settings["tta"] is False
