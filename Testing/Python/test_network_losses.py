"""The UNet presets and the paper's losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from SDMOrganSegLib.method.losses import MODES, SDMSegmentationLoss, l1_loss, product_loss, smooth_heaviside, soft_dice_loss
from SDMOrganSegLib.method.network import UNet3D, UNetConfig, preset


def test_paper_preset_is_the_papers_architecture():
    network = UNet3D(preset("paper", 1, 3))
    config = network.config
    assert (config.depth, config.base_channels, config.max_channels) == (6, 24, 384)
    assert [config.channels(level) for level in range(7)] == [24, 48, 96, 192, 384, 384, 384]
    assert len(network.encoders) == 7 and len(network.decoders) == 6  # 6 downsamplings, 6 skips
    modules = list(network.modules())
    assert not any(isinstance(m, (nn.BatchNorm3d, nn.ConvTranspose3d, nn.ReLU)) for m in modules)
    assert sum(isinstance(m, nn.GroupNorm) for m in modules) > 0
    assert sum(isinstance(m, nn.LeakyReLU) for m in modules) > 0
    assert network.head.out_channels == 3


def test_paper_preset_runs_on_odd_sizes_and_outputs_tanh():
    torch.manual_seed(0)
    network = UNet3D(preset("paper", 1, 2)).eval()
    with torch.no_grad():
        out = network(torch.randn(1, 1, 9, 13, 11))  # padded to 64^3 inside, cropped back
    assert out.shape == (1, 2, 9, 13, 11)
    assert out.abs().max() <= 1


def test_cpu_preset_sizes_and_logit_head():
    network = UNet3D(preset("cpu", 1, 2, output_activation="none"))
    assert sum(p.numel() for p in network.parameters()) < 1_500_000
    out = network(torch.randn(2, 1, 35, 51, 35))
    assert out.shape == (2, 2, 35, 51, 35)


def test_config_round_trip_and_unknown_fields():
    config = preset("cpu", 1, 4)
    assert UNetConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError):
        UNetConfig.from_dict({**config.to_dict(), "dropout": 0.5})
    with pytest.raises(ValueError):
        preset("huge")


def test_dice_loss_values():
    target = torch.zeros(1, 2, 4, 4, 4)
    target[:, 0, :2] = 1
    assert soft_dice_loss(target, target).item() == pytest.approx(0.0, abs=1e-6)  # organ 1 absent in both: Dice 1
    assert soft_dice_loss(1 - target, target).item() == pytest.approx(2.0, abs=1e-4)


def test_product_loss_rewards_the_right_sign():
    target = torch.linspace(-1, 1, 64).reshape(1, 1, 4, 4, 4)
    target = torch.where(target == 0, torch.full_like(target, 0.1), target)
    right, wrong = product_loss(target, target), product_loss(-target, target)
    assert right.item() == pytest.approx(-1 / 3, abs=1e-4)  # y p / (y p + p^2 + y^2) = 1/3 when p = y
    assert wrong.item() == pytest.approx(1.0, abs=1e-3)  # = -1 per voxel when p = -y (epsilon shifts tiny |y|)
    assert l1_loss(target, target).item() == 0


def test_smooth_heaviside_sign_convention():
    values = smooth_heaviside(torch.tensor([-0.01, 0.01]))
    assert values[0] > 0.99 and values[1] < 0.01


@pytest.mark.parametrize("mode", MODES)
def test_gradients_finite_on_empty_organs(mode):
    torch.manual_seed(1)
    network = UNet3D(preset("cpu", 1, 2, output_activation="none" if mode == "dice" else "tanh", heads="dual" if mode == "dual" else "single"))
    image = torch.randn(1, 1, 16, 16, 16)
    target_sdm = torch.ones(1, 2, 16, 16, 16)  # both organs absent
    target_mask = torch.zeros(1, 2, 16, 16, 16)
    loss, parts = SDMSegmentationLoss(mode)(network(image), target_sdm, target_mask)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in network.parameters() if p.grad is not None)
    expected = {"dice": {"dice"}, "sdm": {"l1", "product"}, "l1+dice": {"l1", "dice"}, "sdm+dice": {"l1", "product", "dice"}, "dual": {"l1", "product", "dice"}}[mode]
    assert set(parts) == expected


def test_combined_loss_is_dice_plus_lambda_sdm():
    torch.manual_seed(2)
    pred = torch.tanh(torch.randn(1, 1, 8, 8, 8))
    target = torch.tanh(torch.randn(1, 1, 8, 8, 8))
    mask = (target < 0).float()
    total, parts = SDMSegmentationLoss("sdm+dice", sdm_weight=10)(pred, target, mask)
    assert total.item() == pytest.approx(parts["dice"] + 10 * (parts["product"] + parts["l1"]), rel=1e-5)


def _distance_field(shape, spacing, centre, radius):
    """An exact signed distance (mm) to a sphere, ``(z, y, x)`` arrays on a grid of ``spacing`` (x, y, z)."""
    z, y, x = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) * s for n, s in zip(shape, reversed(spacing))), indexing="ij")
    return torch.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2) - radius


def test_eikonal_term_is_near_zero_for_a_distance_and_grows_with_a_scattered_one():
    from SDMOrganSegLib.method.losses import eikonal_loss

    spacing, scale = (3.9, 3.9, 2.5), 20.0
    d = _distance_field((40, 24, 24), spacing, (46.0, 47.0, 50.0), 15.0)[None, None]
    exact = torch.tanh(d / scale)
    # Forward differences of a smooth distance: |grad d| = 1 + O(h / R); the first-order error at h = 3.9 mm,
    # R >= 15 mm stays below 0.2, so its square below 0.04.
    assert float(eikonal_loss(exact, exact, spacing, scale)) < 0.04
    assert float(eikonal_loss(torch.clamp(d / scale, -1, 1), exact, spacing, scale, "clip")) < 0.04
    # A field that rises twice as fast is off by |grad d| - 1 = 1 everywhere in the band.
    assert float(eikonal_loss(torch.tanh(2 * d / scale), exact, spacing, scale)) == pytest.approx(1.0, abs=0.3)
    noisy = torch.tanh((d + 4.0 * torch.randn(d.shape, generator=torch.Generator().manual_seed(0), dtype=d.dtype)) / scale)
    assert float(eikonal_loss(noisy, exact, spacing, scale)) > 1.0  # +-4 mm noise between 2.5-3.9 mm neighbours
    # Only the band near the organ counts: changing the prediction far away changes nothing.
    far = exact.clone()
    far[exact.abs() >= 0.9] = 0.0  # band voxels (|target| < 0.76) have neighbours up to about 0.85
    assert float(eikonal_loss(far, exact, spacing, scale)) == pytest.approx(float(eikonal_loss(exact, exact, spacing, scale)), abs=0.02)


def test_eikonal_term_holds_unannotated_organs_around_their_predicted_surface_only_when_asked():
    from SDMOrganSegLib.method.losses import eikonal_loss

    spacing, scale = (3.9, 3.9, 2.5), 20.0
    d = _distance_field((40, 24, 24), spacing, (46.0, 47.0, 50.0), 15.0)[None, None]
    exact = torch.tanh(d / scale)
    steep = torch.tanh(2 * d / scale)  # off by |grad d| - 1 = 1 in the band
    pred = torch.cat([exact, steep], 1)  # organ 0 contoured, organ 1 not
    unknown_target = torch.ones_like(exact)  # what an uncontoured organ's target holds: no surface
    target = torch.cat([exact, unknown_target], 1)
    annotated = torch.tensor([[1.0, 0.0]])
    contoured_only = float(eikonal_loss(pred, target, spacing, scale, annotated=annotated))
    assert contoured_only < 0.04  # the uncontoured organ's steep field goes unseen
    both = float(eikonal_loss(pred, target, spacing, scale, annotated=annotated, unannotated_too=True))
    # Organ 1 is judged in the band of its own predicted surface, where its field rises twice too fast:
    # (2 - 1)^2 = 1 up to the forward differences' O(h / R) (the first test's bound), summed with organ 0's.
    assert both == pytest.approx(contoured_only + 1.0, abs=0.3)
    # An uncontoured organ that is an exact distance to its predicted surface adds (almost) nothing.
    exact_both = float(eikonal_loss(torch.cat([exact, exact], 1), target, spacing, scale, annotated=annotated, unannotated_too=True))
    assert exact_both < 0.08


def test_eikonal_term_on_the_true_band_cannot_be_escaped_by_calling_the_organ_absent():
    from SDMOrganSegLib.method.losses import eikonal_loss

    spacing, scale = (3.9, 3.9, 2.5), 20.0
    d = _distance_field((40, 24, 24), spacing, (46.0, 47.0, 50.0), 15.0)[None, None]
    exact = torch.tanh(d / scale)
    absent = torch.full_like(exact, 0.99)  # the head calls the organ absent: saturated and flat
    # 'agreed' looks only where the prediction is below 0.9 too: nowhere here, so the term is 0, lower than
    # for the exact distance, and a heavier term rewards giving the organ up.
    assert float(eikonal_loss(absent, exact, spacing, scale)) == 0.0
    # 'target' counts the true band: a flat field has |grad d| = 0 there, (0 - 1)^2 = 1 in every voxel, less
    # the gradient's 1e-6 safety term: 20 * 1e-6 / (1 - 0.9^2) = 1.1e-4 mm/mm, so 1 - 2.1e-4.
    assert float(eikonal_loss(absent, exact, spacing, scale, band_rule="target")) == pytest.approx(1.0, abs=5e-4)
    # Where the prediction is a distance the two rules agree (its band voxels are below 0.9 already: up to
    # tanh(1 + 3.9 / 20) = 0.83), so 'target' changes nothing for a head that learnt the organ.
    assert float(eikonal_loss(exact, exact, spacing, scale, band_rule="target")) == pytest.approx(float(eikonal_loss(exact, exact, spacing, scale)), abs=1e-9)
    half = exact.clone()
    half[..., :12] = 0.99  # absent in half the band: only that half changes between the rules
    agreed, target = (float(eikonal_loss(half, exact, spacing, scale, band_rule=rule)) for rule in ("agreed", "target"))
    assert agreed < 0.1 < 0.3 < target
    with pytest.raises(ValueError, match="Eikonal band"):
        eikonal_loss(exact, exact, spacing, scale, band_rule="prediction")


def test_own_distance_term_is_zero_for_a_distance_to_its_own_surface_and_lifts_a_dip():
    from SDMOrganSegLib.method.losses import own_distance_loss
    from SDMOrganSegLib.method.sdm import signed_distance_mm

    spacing, scale = (3.9, 3.9, 2.5), 20.0
    shape = (40, 32, 32)
    mask = (_distance_field(shape, spacing, (62.0, 62.0, 50.0), 15.0) < 0).numpy()
    exact_np = np.tanh(signed_distance_mm(mask, spacing) / scale)
    exact = torch.from_numpy(exact_np).float()[None, None]
    # The target is that same distance (the crop to the organ's box grown by one scale changes no voxel of
    # the band), so the term is 0 up to float32 rounding, in both normalisations.
    assert float(own_distance_loss(exact, spacing, scale)) < 1e-6
    clipped = torch.from_numpy(np.clip(signed_distance_mm(mask, spacing) / scale, -1, 1)).float()[None, None]
    assert float(own_distance_loss(clipped, spacing, scale, "clip")) < 1e-6
    # No surface in the patch (absent, or the organ everywhere): nothing to measure against.
    assert float(own_distance_loss(torch.full_like(exact, 0.9), spacing, scale)) == 0.0
    assert float(own_distance_loss(torch.full_like(exact, -0.9), spacing, scale)) == 0.0
    # A dip: positive values 10 mm too low in a slab above the organ (what the esophagus does in the larynx).
    # The zero level is unchanged, so the target is too: the term is the dip's mean error over the band,
    # and its gradient raises the dip's values.
    distance = signed_distance_mm(mask, spacing)
    dip_np = exact_np.copy()
    slab = np.zeros(shape, bool)
    slab[30:36] = True  # 5-20 mm above the sphere's top (z = 50 + 15 mm = slice 26)
    slab &= (distance > 10) & (distance < scale)
    dip_np[slab] = np.tanh((distance[slab] - 10) / scale)
    dip = torch.from_numpy(dip_np).float()[None, None].requires_grad_(True)
    band = (np.abs(distance) >= 3.9) & (np.abs(distance) < scale)
    expected = np.abs(dip_np - exact_np)[band].sum() / band.sum()
    value = own_distance_loss(dip, spacing, scale)
    assert float(value.detach()) == pytest.approx(expected, rel=1e-4) and float(value.detach()) > 0.01
    value.backward()
    assert (dip.grad[0, 0][torch.from_numpy(slab)] < 0).all()  # descending the gradient raises them
    outside_band = torch.from_numpy(~band)
    assert (dip.grad[0, 0][outside_band] == 0).all()
    # Nearer the patch's edge than to the surface, the surface may go on beyond the edge: not judged.
    cut = torch.from_numpy(exact_np[:, :, :18].copy()).float()[None, None]  # the sphere (x 12-19) cut by the x edge
    assert float(own_distance_loss(cut, spacing, scale)) < 1e-6  # its own surface is the cut's zero level
    # A head that draws no surface where the organ is cannot escape the term: with the target given it is
    # judged against the target in the target's band (|target| < tanh(1)), unless the organ is not contoured.
    absent = torch.full_like(exact, 0.9)
    target_band = np.abs(exact_np) < 0.7616
    expected_absent = np.abs(0.9 - exact_np)[target_band].mean()
    assert float(own_distance_loss(absent, spacing, scale, target_sdm=exact)) == pytest.approx(expected_absent, rel=1e-5)
    assert expected_absent > 0.3
    assert float(own_distance_loss(absent, spacing, scale, target_sdm=exact, annotated=torch.tensor([[0.0]]))) == 0.0
    assert float(own_distance_loss(exact, spacing, scale, target_sdm=torch.full_like(exact, 0.5))) < 1e-6  # a surface: its own
    with pytest.raises(ValueError, match="own-distance"):
        own_distance_loss(exact, spacing, scale, "paper")


def test_eikonal_term_in_the_loss_only_where_asked_and_with_a_gradient():
    spacing, scale = (3.9, 3.9, 2.5), 20.0
    d = _distance_field((16, 16, 16), spacing, (30.0, 30.0, 20.0), 12.0).float()[None, None]
    target_sdm, target_mask = torch.tanh(d / scale), (d < 0).float()
    pred = torch.tanh(1.5 * d / scale).requires_grad_(True)
    plain = SDMSegmentationLoss("sdm+dice", dice_reduction="batch")
    total, parts = plain(pred, target_sdm, target_mask)
    assert "eikonal" not in parts
    with_eikonal = SDMSegmentationLoss("sdm+dice", dice_reduction="batch", eikonal_weight=2.0, spacing_mm=spacing, scale_mm=scale)
    total_e, parts_e = with_eikonal(pred, target_sdm, target_mask)
    assert parts_e["eikonal"] > 0.1  # a 1.5x too steep field
    assert float(total_e.detach()) == pytest.approx(float(total) + 2.0 * parts_e["eikonal"], rel=1e-5)
    total_e.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    own = SDMSegmentationLoss("dual", dice_reduction="batch", own_distance_weight=3.0, spacing_mm=spacing, scale_mm=scale)
    dual_pred = torch.cat([pred.detach(), -pred.detach()], 1)
    total_o, parts_o = own(dual_pred, target_sdm, target_mask)
    assert parts_o["own_distance"] > 0.01  # a 1.5x too steep field is not the distance to its own surface
    bare_total, _ = SDMSegmentationLoss("dual", dice_reduction="batch")(dual_pred, target_sdm, target_mask)
    assert float(total_o) == pytest.approx(float(bare_total) + 3.0 * parts_o["own_distance"], rel=1e-5)
    with pytest.raises(ValueError, match="own-distance"):
        SDMSegmentationLoss("dice", own_distance_weight=1.0)
    with pytest.raises(ValueError, match="Eikonal"):
        SDMSegmentationLoss("dice", eikonal_weight=1.0)
    with pytest.raises(ValueError, match="Eikonal"):
        SDMSegmentationLoss("dual", eikonal_weight=1.0, normalization="paper")
