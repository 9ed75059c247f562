"""Training options of the shape-aware recipe and partial labels: their definitions and their effects."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

torch = pytest.importorskip("torch")

from SDMOrganSegLib.formats.dataset import read_annotations  # noqa: E402
from SDMOrganSegLib.common.errors import SDMOrganSegError  # noqa: E402
from SDMOrganSegLib.method.losses import SDMSegmentationLoss, l1_loss, product_loss, soft_dice_loss  # noqa: E402
from SDMOrganSegLib.method.sdm import heaviside, label_map_to_sdms, normalized_sdm, scaled_sdm, signed_distance_mm  # noqa: E402
from SDMOrganSegLib.engines.training import Trainer, TrainingConfig, changed_settings, whole_volume_patch  # noqa: E402


def _ball(shape=(21, 23, 25), radius=5.0, centre=None):
    centre = np.asarray(centre if centre is not None else [s // 2 for s in shape])
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    return np.linalg.norm(grid - centre, axis=-1) <= radius


# --- SDM normalisations -------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.7, 1.3, 2.5)])
def test_clip_normalisation_is_the_mm_distance_over_the_scale_clipped(spacing):
    mask = _ball()
    scale = 4.0
    sdm = scaled_sdm(mask, spacing, scale, "clip")
    expected = np.clip(signed_distance_mm(mask, spacing) / np.float32(scale), -1, 1)
    np.testing.assert_allclose(sdm, expected, rtol=0, atol=1e-6)
    assert sdm.dtype == np.float32 and -1.0 <= sdm.min() < 0 and sdm.max() == 1.0
    assert np.array_equal(sdm < 0, mask)


def test_symmetric_normalisations_are_symmetric_next_to_the_surface_and_the_paper_one_is_not():
    mask = _ball(radius=4.0)
    for method in ("clip", "tanh"):
        sdm = scaled_sdm(mask, (1, 1, 1), 5.0, method)
        boundary_inside = sdm[mask & (np.abs(signed_distance_mm(mask, (1, 1, 1))) == 1.0)]
        boundary_outside = sdm[~mask & (np.abs(signed_distance_mm(mask, (1, 1, 1))) == 1.0)]
        # Voxels one voxel from the other class: the same magnitude on both sides (1 mm / 5 mm, or its tanh).
        value = 0.2 if method == "clip" else np.tanh(0.2)
        np.testing.assert_allclose(-boundary_inside, value, rtol=1e-6)
        np.testing.assert_allclose(boundary_outside, value, rtol=1e-6)
    paper = normalized_sdm(mask, (1, 1, 1))
    distance = np.abs(signed_distance_mm(mask, (1, 1, 1)))
    inside, outside = -paper[mask & (distance == 1)].max(), paper[~mask & (distance == 1)].min()
    # The paper's: 1 / (largest inside distance) inside, 1 / (largest outside distance) outside.
    assert inside > 3 * outside


def test_tanh_normalisation_and_degenerate_organs():
    mask = _ball()
    np.testing.assert_allclose(scaled_sdm(mask, (1, 1, 1), 3.0, "tanh"), np.tanh(signed_distance_mm(mask, (1, 1, 1)) / 3.0), atol=1e-6)
    assert (scaled_sdm(np.zeros((4, 4, 4), bool), (1, 1, 1), 5.0) == 1).all()
    assert (scaled_sdm(np.ones((4, 4, 4), bool), (1, 1, 1), 5.0, "tanh") == -1).all()
    with pytest.raises(ValueError):
        scaled_sdm(mask, (1, 1, 1), 0.0)
    labels = mask.astype(np.uint8)
    stacked = label_map_to_sdms(labels, [1], (1, 1, 1), "clip", 5.0)
    np.testing.assert_array_equal(stacked[0], scaled_sdm(mask, (1, 1, 1), 5.0))
    # The Heaviside still gives the mask back from a symmetric SDM, with the paper's k and a soft one.
    assert np.array_equal(heaviside(stacked[0]) > 0.5, mask) and np.array_equal(heaviside(stacked[0], 15.0) > 0.5, mask)


# --- The Heaviside steepness k in the Dice term ---------------------------------------------------------


def test_a_soft_heaviside_gives_the_dice_term_a_gradient_where_k_1500_gives_none():
    """One voxel off by 0.2 (one voxel of a 5 mm clipped SDM): its Dice gradient is sigmoid' * k."""
    target_mask = torch.zeros(1, 1, 4, 4, 4)
    target_mask[..., 1:3, 1:3, 1:3] = 1
    pred = torch.where(target_mask > 0, torch.tensor(-0.2), torch.tensor(0.2))
    pred[0, 0, 0, 0, 0] = -0.2  # one false-positive voxel, as far inside as the true organ voxels
    gradients = {}
    for k in (1500.0, 15.0):
        p = pred.clone().requires_grad_(True)
        loss, _ = SDMSegmentationLoss("sdm+dice", sdm_weight=0.0, k=k)(p, pred.detach(), target_mask)
        loss.backward()
        gradients[k] = float(p.grad[0, 0, 0, 0, 0])
    # k = 1500: sigmoid'(300) underflows to 0 in float32; k = 15: sigmoid'(3) * 15 = 0.68 times the Dice slope.
    assert gradients[1500.0] == 0.0
    assert gradients[15.0] < -1e-3  # descent raises the false positive's SDM, toward outside


# --- Partial labels --------------------------------------------------------------------------------------


def test_an_unannotated_channel_gets_exactly_zero_gradient_and_all_annotated_is_the_paper_loss():
    torch.manual_seed(0)
    pred = (torch.rand(2, 3, 6, 6, 6) * 2 - 1).requires_grad_(True)
    target_sdm = torch.rand(2, 3, 6, 6, 6) * 2 - 1
    target_mask = (target_sdm < 0).float()
    annotated = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    for mode in ("dice", "sdm", "l1+dice", "sdm+dice"):
        loss_function = SDMSegmentationLoss(mode, k=15.0)
        pred.grad = None
        loss, _ = loss_function(pred, target_sdm, target_mask, annotated)
        loss.backward()
        assert (pred.grad[0, 1] == 0).all() and (pred.grad[1, 2] == 0).all(), mode
        assert (pred.grad[0, 0] != 0).any() and (pred.grad[1, 1] != 0).any(), mode
        full, _ = loss_function(pred, target_sdm, target_mask, torch.ones(2, 3))
        plain, _ = loss_function(pred, target_sdm, target_mask)
        assert float(full.detach()) == pytest.approx(float(plain.detach()), rel=1e-6), mode
    # The per-term definitions with every organ annotated equal the paper's batch-averaged sums.
    probability = torch.sigmoid(-15 * pred.detach())
    dice = (2 * (probability * target_mask).sum((2, 3, 4)) + 1e-5) / (probability.sum((2, 3, 4)) + target_mask.sum((2, 3, 4)) + 1e-5)
    assert float(soft_dice_loss(probability, target_mask)) == pytest.approx(float((3 - dice.sum(1)).mean()), rel=1e-6)
    pred = pred.detach()
    assert float(l1_loss(pred, target_sdm, annotated)) == pytest.approx(
        float(((pred - target_sdm).abs().mean((2, 3, 4)) * annotated).sum(1).mean()), rel=1e-6
    )
    # A perfect prediction scores about -1/3 per organ: y p / (y p + p^2 + y^2 + eps) = y^2 / (3 y^2 + eps) at p = y.
    y = target_sdm.double().numpy()
    expected = -(y**2 / (3 * y**2 + 1e-6)).mean(axis=(2, 3, 4)).sum(1).mean()
    assert float(product_loss(target_sdm, target_sdm)) == pytest.approx(expected, rel=1e-5) and expected == pytest.approx(-1.0, abs=0.01)


def test_batch_dice_penalises_organs_painted_into_patches_that_lack_them():
    # Case 0 holds organ 0, case 1 does not; the network paints organ 0 over half of case 1.
    target_mask = torch.zeros(2, 1, 4, 4, 4)
    target_mask[0, 0, :2] = 1
    probability = torch.zeros(2, 1, 4, 4, 4)
    probability[0, 0, :2] = 1
    probability[1, 0, 2:] = 1
    probability.requires_grad_(True)
    per_case = soft_dice_loss(probability, target_mask, reduction="case")
    (per_case_grad,) = torch.autograd.grad(per_case, probability)
    # Per case, case 1's Dice is eps / (32 + eps) whatever it paints: its gradient is eps-sized.
    assert per_case_grad[1].abs().max() < 1e-6
    batch = soft_dice_loss(probability, target_mask, reduction="batch")
    (batch_grad,) = torch.autograd.grad(batch, probability)
    # Over the batch: Dice = 2*32 / (32 + 64) = 2/3, and d loss / d p = 2*I / T^2 = 64 / 96^2 on case 1's voxels.
    assert float(batch.detach()) == pytest.approx(1 / 3, rel=1e-5)
    assert batch_grad[1].min() > 0 and float(batch_grad[1, 0, 2, 0, 0]) == pytest.approx(64 / 96**2, rel=1e-4)
    # A batch of one: the two reductions are the same (Eq. 1).
    one = probability.detach()[:1]
    assert float(soft_dice_loss(one, target_mask[:1], reduction="batch")) == pytest.approx(float(soft_dice_loss(one, target_mask[:1])), rel=1e-6)


def test_batch_dice_leaves_unannotated_entries_out_exactly():
    torch.manual_seed(1)
    probability = torch.rand(2, 2, 5, 5, 5).requires_grad_(True)
    target_mask = (torch.rand(2, 2, 5, 5, 5) < 0.3).float()
    annotated = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # organ 1 contoured in no case of the batch
    loss = soft_dice_loss(probability, target_mask, annotated=annotated, reduction="batch")
    (grad,) = torch.autograd.grad(loss, probability)
    assert (grad[:, 1] == 0).all() and (grad[:, 0] != 0).all()
    # Organ 1 has no term; organ 0 is the Dice of both cases pooled.
    p, y = probability.detach()[:, 0], target_mask[:, 0]
    expected = 1 - (2 * (p * y).sum() + 1e-5) / (p.sum() + y.sum() + 1e-5)
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-6)
    # Case 1 not contoured for organ 0: only case 0's voxels count, so case 1 gets no gradient.
    loss = soft_dice_loss(probability, target_mask, annotated=torch.tensor([[1.0, 1.0], [0.0, 1.0]]), reduction="batch")
    (grad,) = torch.autograd.grad(loss, probability)
    assert (grad[1, 0] == 0).all() and (grad[0, 0] != 0).all()
    with pytest.raises(ValueError, match="Dice reduction"):
        soft_dice_loss(probability, target_mask, reduction="mean")


def test_cross_entropy_term_is_the_mean_bce_and_keeps_a_gradient_where_dice_has_none():
    # One organ voxel predicted confidently outside (+0.9): through sigmoid(-15 sdm) the Dice gradient is
    # k * p * (1 - p) * 2 / T with p = sigmoid(-13.5) ~ 1.4e-6; the cross-entropy's is -k * (p - y) / N ~ +15 / N.
    target_mask = torch.zeros(1, 1, 2, 2, 2)
    target_mask[0, 0, 0, 0, 0] = 1
    target_sdm = torch.where(target_mask > 0, -0.2, 0.2)
    pred = torch.full((1, 1, 2, 2, 2), 0.9, requires_grad=True)
    dice_only = SDMSegmentationLoss("sdm+dice", sdm_weight=0.0, k=15.0)
    with_ce = SDMSegmentationLoss("sdm+dice", sdm_weight=0.0, k=15.0, ce_weight=1.0)
    (dice_grad,) = torch.autograd.grad(dice_only(pred, target_sdm, target_mask)[0], pred)
    total, parts = with_ce(pred, target_sdm, target_mask)
    (ce_grad,) = torch.autograd.grad(total, pred)
    assert abs(float(dice_grad[0, 0, 0, 0, 0])) < 1e-4
    p = 1 / (1 + np.exp(15 * 0.9))
    assert float(ce_grad[0, 0, 0, 0, 0] - dice_grad[0, 0, 0, 0, 0]) == pytest.approx(15 * (1 - p) / 8, rel=1e-4)
    # Its value: the mean over voxels of -y log p - (1 - y) log(1 - p), for the Dice-only logit too.
    expected = (-np.log(p) + 7 * -np.log(1 - p)) / 8
    assert parts["ce"] == pytest.approx(expected, rel=1e-5)
    _, parts = SDMSegmentationLoss("dice", ce_weight=0.5)(torch.zeros(1, 1, 2, 2, 2), target_sdm, target_mask)
    assert parts["ce"] == pytest.approx(np.log(2), rel=1e-6)
    # Unannotated channels stay out of it exactly.
    pred2 = torch.rand(2, 2, 3, 3, 3).requires_grad_(True)
    loss, _ = SDMSegmentationLoss("dice", ce_weight=1.0)(pred2, pred2.detach(), (pred2.detach() < 0.5).float(), torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    (grad,) = torch.autograd.grad(loss, pred2)
    assert (grad[0, 1] == 0).all() and (grad[1, 1] != 0).all()


def test_prior_output_bias_starts_the_network_at_each_organs_average_target():
    from SDMOrganSegLib.formats.dataset import PreparedCase
    from SDMOrganSegLib.engines.training import prior_output_bias

    # Organ 0 fills 1/8 of case a and 1/4 of case b; organ 1 is contoured in case a only (1/8).
    sdms_a = np.ones((2, 4, 4, 4), np.float16)
    sdms_a[:, :2, :2, :2] = -0.5
    sdms_b = np.ones((2, 4, 4, 4), np.float16)
    sdms_b[0, :2, :2, :] = -0.5
    cases = [
        PreparedCase("a", np.zeros((4, 4, 4), np.float32), np.zeros((4, 4, 4), np.uint8), sdms_a, (1.0, 1.0, 1.0)),
        PreparedCase("b", np.zeros((4, 4, 4), np.float32), np.zeros((4, 4, 4), np.uint8), sdms_b, (1.0, 1.0, 1.0), np.array([True, False])),
    ]
    logit = prior_output_bias(cases, "dice")
    fraction = (8 + 16) / 128
    assert logit[0] == pytest.approx(np.log((1 - fraction) / fraction)) and logit[1] == pytest.approx(np.log(7.0))
    assert 1 / (1 + np.exp(logit[1])) == pytest.approx(1 / 8)  # sigmoid(-z): the organ's fraction
    sdm_bias = prior_output_bias(cases, "sdm+dice")
    assert np.tanh(sdm_bias[1]) == pytest.approx(7 / 8 - 0.5 / 8)  # mean target SDM of case a
    # Organs filling almost nothing are clipped, not infinite.
    sdms_a[:] = 1
    assert np.all(np.isfinite(prior_output_bias(cases[:1], "dice"))) and np.tanh(prior_output_bias(cases[:1], "sdm")[0]) == pytest.approx(0.95)


def _write_case(folder, name, image, labels):
    for sub, array in (("imagesTr", image), ("labelsTr", labels)):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(sitk.GetImageFromArray(array), str(folder / sub / f"{name}.nii.gz"))


@pytest.fixture(scope="module")
def partially_annotated(tmp_path_factory):
    """Eight cases that all show a bright cube (organ 1) and a dark one (organ 2); organ 1 is contoured in
    two training cases and the validation case only. Its label map is 0 elsewhere: unknown, not absent."""
    folder = tmp_path_factory.mktemp("partial")
    rng = np.random.default_rng(0)
    annotations = {}
    for index in range(8):
        image = rng.normal(0, 0.2, (16, 16, 16)).astype(np.float32)
        labels = np.zeros((16, 16, 16), np.uint8)
        a, b = rng.integers(2, 6, 3), rng.integers(9, 12, 3)
        image[a[0] : a[0] + 4, a[1] : a[1] + 4, a[2] : a[2] + 4] += 3
        image[b[0] : b[0] + 4, b[1] : b[1] + 4, b[2] : b[2] + 4] -= 3
        labels[b[0] : b[0] + 4, b[1] : b[1] + 4, b[2] : b[2] + 4] = 2
        contoured = index in (0, 1, 7)
        if contoured:
            labels[a[0] : a[0] + 4, a[1] : a[1] + 4, a[2] : a[2] + 4] = 1
        annotations[f"case{index}"] = ["bright", "dark"] if contoured else ["dark"]
        _write_case(folder, f"case{index}", image, labels)
    (folder / "labels.json").write_text(json.dumps({"labels": {"1": "bright", "2": "dark"}}))
    (folder / "annotations.json").write_text(json.dumps(annotations))
    (folder / "split.json").write_text(json.dumps({"train": [f"case{i}" for i in range(7)], "validation": ["case7"]}))
    return folder


def _train(data, out, **settings):
    config = TrainingConfig(
        data_dir=str(data), out_dir=str(out), mode="sdm+dice", epochs=40, batch_size=2, patch_size=(16, 16, 16), learning_rate=5e-3,
        lr_step=100, validate_every=40, seed=0, threads=1, flip=False, split_file=str(data / "split.json"), depth=2, **settings,
    )
    Trainer(config, progress=lambda text: None).run()
    rows = (out / "log.csv").read_text().splitlines()
    header, last = rows[0].split(","), rows[-1].split(",")
    return float(last[header.index("val_dice_bright")])


def test_partial_labels_learn_the_organ_where_missing_annotations_would_teach_absent(partially_annotated, tmp_path):
    with_annotations = _train(partially_annotated, tmp_path / "with")
    (partially_annotated / "annotations.json").rename(tmp_path / "annotations.json")
    try:
        without = _train(partially_annotated, tmp_path / "without")
    finally:
        (tmp_path / "annotations.json").rename(partially_annotated / "annotations.json")
    # Five of seven training cases say "no bright organ" when their missing contour is read as absence.
    assert with_annotations > 0.5
    assert with_annotations > without + 0.3


def test_annotations_file_is_checked(tmp_path):
    assert read_annotations(tmp_path, ["a", "b"], ["c1"]) is None
    (tmp_path / "annotations.json").write_text(json.dumps({"c1": ["a"]}))
    assert read_annotations(tmp_path, ["a", "b"], ["c1"])["c1"].tolist() == [True, False]
    with pytest.raises(SDMOrganSegError, match="does not list case c2"):
        read_annotations(tmp_path, ["a", "b"], ["c1", "c2"])
    (tmp_path / "annotations.json").write_text(json.dumps({"c1": ["liver"]}))
    with pytest.raises(SDMOrganSegError, match="labels.json does not have"):
        read_annotations(tmp_path, ["a", "b"], ["c1"])


# --- Run settings ----------------------------------------------------------------------------------------


def test_changed_settings_names_what_differs_and_ignores_run_length():
    assert changed_settings({"mode": "dice", "epochs": 10}, {"mode": "dice", "epochs": 40, "threads": 2}) == []
    assert changed_settings({"mode": "dice"}, {"mode": "sdm+dice"}) == ["mode: 'dice' -> 'sdm+dice'"]
    # A record without a setting (an older checkpoint) counts as the default.
    assert changed_settings({}, {"sdm_normalization": "paper"}) == []


def test_whole_volume_patch_holds_the_largest_case():
    class Case:
        def __init__(self, shape):
            self.image = np.zeros(shape)

    assert whole_volume_patch([Case((36, 50, 35)), Case((47, 40, 43))], 16) == (48, 64, 48)
