"""Mirroring test-time augmentation: the average of the mirrored predictions, mirrored back."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from SDMOrganSegLib.inference import mirror_subsets, predict_array  # noqa: E402
from SDMOrganSegLib.network import UNet3D, preset  # noqa: E402
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
