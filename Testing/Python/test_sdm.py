"""Ground-truth SDMs: exact distances, the paper's normalisation, and the Heaviside round trip on real labels."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import HIPPOCAMPUS, hippocampus_cases
from scipy import ndimage

from SDMOrganSegLib.method.sdm import heaviside, label_map_to_sdms, normalized_sdm, sdms_to_label_map, signed_distance_mm


def _grid(shape, spacing_xyz):
    """Physical coordinates (z, y, x order arrays) of voxel centres."""
    return np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, reversed(spacing_xyz))], indexing="ij")


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.7, 0.9, 2.5)])
def test_sphere_sdm_matches_exact_distance(spacing):
    shape = (48, 64, 64) if spacing[2] == 1.0 else (24, 64, 64)
    z, y, x = _grid(shape, spacing)
    centre = [c.max() / 2 for c in (z, y, x)]
    radius = 12.0
    exact = np.sqrt((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2) - radius
    mask = exact < 0
    sdm = signed_distance_mm(mask, spacing)
    assert (np.sign(sdm) == np.where(mask, -1, 1)).all()
    # Voxel-centre distances differ from the continuous sphere's by at most one voxel step.
    near = np.abs(exact) < 0.6 * radius
    assert np.abs(sdm[near] - exact[near]).max() <= max(spacing) + 1e-6
    assert np.abs(sdm[near] - exact[near]).mean() < 0.6 * max(spacing)


def test_equals_scipy_exact_edt_anisotropic():
    rng = np.random.default_rng(3)
    mask = ndimage.gaussian_filter(rng.random((30, 40, 50)), 3) > 0.5
    spacing = (0.8, 1.3, 2.1)
    ours = signed_distance_mm(mask, spacing)
    sampling = spacing[::-1]
    reference = ndimage.distance_transform_edt(~mask, sampling=sampling) - ndimage.distance_transform_edt(mask, sampling=sampling)
    np.testing.assert_allclose(ours, reference, atol=1e-4)


def test_normalisation_range_and_extremes():
    mask = np.zeros((20, 30, 40), bool)
    mask[5:12, 8:20, 10:30] = True
    sdm = normalized_sdm(mask, (1, 1, 1))
    assert sdm.dtype == np.float32
    assert sdm.min() == -1.0 and sdm.max() == 1.0
    assert (sdm[mask] < 0).all() and (sdm[~mask] > 0).all()


def test_absent_and_full_organs_are_defined():
    absent = normalized_sdm(np.zeros((8, 9, 10), bool), (1, 1, 1))
    full = normalized_sdm(np.ones((8, 9, 10), bool), (1, 1, 1))
    assert (absent == 1).all() and (full == -1).all()
    assert np.isfinite(absent).all() and np.isfinite(full).all()


@pytest.mark.parametrize("case", hippocampus_cases())
def test_heaviside_gives_back_every_real_organ(case):
    image = sitk.ReadImage(str(HIPPOCAMPUS / "labelsTr" / f"{case}.nii.gz"))
    labels = np.rint(sitk.GetArrayFromImage(image)).astype(np.int32)
    sdms = label_map_to_sdms(labels, [1, 2], image.GetSpacing())
    for channel, value in enumerate([1, 2]):
        recovered = heaviside(sdms[channel]) > 0.5
        overlap = (recovered == (labels == value)).mean()
        assert overlap == 1.0  # the paper reports ~99.9 % with Danielsson's approximate SDM
        # The k = 1500 Heaviside is nearly binary: almost every voxel maps within 1e-3 of 0 or 1.
        soft = heaviside(sdms[channel])
        assert np.mean((soft > 1e-3) & (soft < 1 - 1e-3)) < 0.001
    np.testing.assert_array_equal(sdms_to_label_map(sdms, [1, 2]), labels)


def test_level_distance_mm_inverts_the_clip_and_tanh_normalisations():
    from SDMOrganSegLib.method.sdm import level_distance_mm, scaled_sdm

    # A 1-D ramp of distances: the normalised SDM at the distance level_distance_mm gives is the level.
    mask = np.zeros((1, 1, 200), bool)
    mask[..., :100] = True
    for method in ("clip", "tanh"):
        sdm = scaled_sdm(mask, (0.5, 1.0, 1.0), 20.0, method)[0, 0]
        positions = signed_distance_mm(mask, (0.5, 1.0, 1.0))[0, 0]  # increasing along the ramp
        for level in (0.1, 0.2, 0.3, -0.3):
            assert np.interp(level_distance_mm(level, method, 20.0), positions, sdm) == pytest.approx(level, abs=0.01)
    assert level_distance_mm(0.1, "paper", 20.0) is None
