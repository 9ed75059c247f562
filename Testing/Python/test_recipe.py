"""The training recipe of issue 19/20: bf16 autocast, the dual-head mode, augmentation, optimiser and schedule,
the time budget, the soft output prior, and data packs."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import SimpleITK as sitk

torch = pytest.importorskip("torch")

from SDMOrganSegLib.engines import training  # noqa: E402
from SDMOrganSegLib.method.architecture import UNetConfig, split_heads  # noqa: E402
from SDMOrganSegLib.method.augmentation import augment_batch, spatial_transform  # noqa: E402
from SDMOrganSegLib.formats.datapack import read_pack, write_pack  # noqa: E402
from SDMOrganSegLib.formats.dataset import PreparedCase  # noqa: E402
from SDMOrganSegLib.common.errors import SDMOrganSegError  # noqa: E402
from SDMOrganSegLib.method.losses import SDMSegmentationLoss  # noqa: E402
from SDMOrganSegLib.method.network import UNet3D, preset  # noqa: E402
from SDMOrganSegLib.method.sdm import label_map_to_sdms  # noqa: E402
from SDMOrganSegLib.engines.training import PatchSampler, Trainer, TrainingConfig, initial_output_biases, resolve_precision  # noqa: E402


def _ball(shape, centre, radius):
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    return np.linalg.norm(grid - np.asarray(centre), axis=-1) <= radius


# --- precision ------------------------------------------------------------------------------------------


def test_bf16_loss_matches_float32_within_bf16_rounding():
    torch.manual_seed(0)
    network = UNet3D(preset("cpu", 1, 2, heads="dual"))
    image = torch.randn(2, 1, 16, 16, 16)
    mask = torch.zeros(2, 2, 16, 16, 16)
    mask[:, 0, 4:10, 4:10, 4:10] = 1
    mask[:, 1, 8:14, 2:8, 6:12] = 1
    sdm = torch.where(mask > 0, -0.5, 0.5)
    loss_function = SDMSegmentationLoss("dual", sdm_weight=1.0, ce_weight=1.0)
    full, _ = loss_function(network(image), sdm, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        prediction = network(image)
    half, _ = loss_function(prediction, sdm, mask)
    # bf16 keeps 8 significant bits: each rounding is within 2^-8 relative. Through a dozen layers of
    # convolutions and group norms the errors add up, in the worst case, to a few 2^-8 of the loss's size;
    # 8 x 2^-8 (3 %) bounds them, far below what a wrong dtype path (e.g. the loss in bf16 too) would give.
    assert abs(float(half.detach()) - float(full.detach())) <= 8 * 2**-8 * abs(float(full.detach()))
    assert prediction.dtype == torch.bfloat16 and half.dtype == torch.float32


def _leave_nan_in_freed_memory() -> None:
    buffers = [torch.full((n,), float("nan")) for n in (4096, 65536, 110592, 300000)]
    del buffers


def test_bf16_convolution_of_a_two_voxel_deep_input_gives_finite_weight_gradients():
    # PyTorch 2.13's CPU bf16 convolution read memory it never wrote for a depth of 2, and a NaN left in freed
    # memory became a NaN weight gradient (most draws, with the buffer freed below, before the fix).
    from SDMOrganSegLib.method.network import Conv3x3x3

    torch.manual_seed(0)
    conv = Conv3x3x3(64, 64)
    for _ in range(10):
        _leave_nan_in_freed_memory()
        x = torch.randn(2, 64, 2, 3, 2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(x)
        _leave_nan_in_freed_memory()
        y.float().square().mean().backward()
        assert torch.isfinite(conv.weight.grad).all()
        reference = torch.nn.functional.conv3d(x, conv.weight.detach(), padding=1)
        torch.testing.assert_close(y.float(), reference)  # float32 here: the small input is not cast
        conv.weight.grad = None


def test_a_step_with_a_non_finite_gradient_is_skipped_and_too_many_stop_the_run(tmp_path, monkeypatch):
    data = _tiny_data(tmp_path / "data")  # 2 training cases, batch 1: 2 steps an epoch, of which 1 may be skipped

    def run(out, poisoned_every):
        config = TrainingConfig(
            str(data), str(tmp_path / out), mode="dice", epochs=2, batch_size=1, patch_size=(16, 16, 16), validate_every=2,
            device="cpu", threads=1, validation_fraction=0.5, precision="fp32",
        )
        original, calls = SDMSegmentationLoss.forward, {"n": 0}

        def poisoned(self, *args, **kwargs):  # a NaN loss, so NaN gradients, every poisoned_every-th step
            loss, parts = original(self, *args, **kwargs)
            calls["n"] += 1
            return (loss * float("nan"), parts) if calls["n"] % poisoned_every == 0 else (loss, parts)

        monkeypatch.setattr(SDMSegmentationLoss, "forward", poisoned)
        said = []
        trainer = Trainer(config, progress=said.append)
        try:
            trainer.run()
        finally:
            monkeypatch.setattr(SDMSegmentationLoss, "forward", original)
        return trainer, said

    trainer, said = run("one", 3)
    assert [row["skipped_steps"] for row in trainer.log_rows] == [0, 1]  # steps 1, 2 | 3 (NaN), 4
    assert all(torch.isfinite(p).all() for p in trainer.network.parameters())
    assert any("1 step(s) skipped for a non-finite gradient" in text for text in said)
    with pytest.raises(SDMOrganSegError, match=r"epoch 1: 2 of 2 steps had non-finite gradients .* --precision fp32 \(this run: fp32\)"):
        run("all", 1)


def test_precision_auto_falls_back_to_float32_on_a_cpu_without_bf16(monkeypatch):
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: False)
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: True)
    assert resolve_precision("auto", torch.device("cpu")) == "bf16"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"  # emulated where the CPU lacks it: slower, not wrong
    with pytest.raises(SDMOrganSegError, match="CUDA"):
        resolve_precision("fp16", torch.device("cpu"))


# --- dual heads -----------------------------------------------------------------------------------------


def test_dual_network_outputs_sdms_then_logits_and_both_heads_learn():
    torch.manual_seed(1)
    config = preset("cpu", 1, 3, heads="dual")
    assert config.output_channels == 6 and UNetConfig.from_dict(config.to_dict()) == config
    network = UNet3D(config)
    output = network(torch.randn(1, 1, 16, 16, 16))
    assert output.shape == (1, 6, 16, 16, 16)
    assert output[:, :3].abs().max() <= 1  # tanh SDMs first
    target_mask = (torch.rand(1, 3, 16, 16, 16) < 0.2).float()
    target_sdm = torch.where(target_mask > 0, -0.3, 0.3)
    loss, parts = SDMSegmentationLoss("dual", sdm_weight=1.0, ce_weight=1.0)(output, target_sdm, target_mask)
    loss.backward()
    assert set(parts) == {"l1", "product", "dice", "ce"}
    assert network.head.weight.grad.abs().sum() > 0 and network.segmentation_head.weight.grad.abs().sum() > 0
    # The SDM head's target is the normalised SDM: its L1 term is the mean |head - target| of the first channels.
    expected_l1 = (output[:, :3] - target_sdm).abs().mean(dim=(2, 3, 4)).sum()
    assert parts["l1"] == pytest.approx(float(expected_l1.detach()), rel=1e-5)
    sdm, labels = split_heads(output[0].detach().numpy(), config)
    assert sdm.shape[0] == labels.shape[0] == 3 and np.array_equal(labels, output[0, 3:].detach().numpy())


def test_single_head_cards_without_the_field_stay_single():
    record = preset("cpu", 1, 2).to_dict()
    del record["heads"]
    assert UNetConfig.from_dict(record).heads == "single"
    with pytest.raises(ValueError, match="heads"):
        UNetConfig(heads="triple")


# --- augmentation ---------------------------------------------------------------------------------------


def test_spatial_augmentation_moves_image_sdm_and_mask_together():
    shape, spacing = (24, 32, 28), (1.0, 0.8, 2.0)  # (z, y, x) voxels; (x, y, z) mm, anisotropic on purpose
    mask = _ball(shape, (10, 14, 16), 6) | _ball(shape, (12, 22, 8), 3)  # asymmetric
    sdm = torch.from_numpy(label_map_to_sdms(mask.astype(np.uint8), [1], spacing, "clip", 10.0))[None]
    image = torch.from_numpy(np.where(mask, 1.0, -1.0).astype(np.float32))[None, None]
    masks = torch.from_numpy(mask.astype(np.float32))[None, None]
    generator = torch.Generator().manual_seed(3)
    import SDMOrganSegLib.method.augmentation as augmentation

    moved = 0
    for _ in range(20):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(augmentation, "P_ROTATION", 1.0)
            patch.setattr(augmentation, "P_SCALE", 1.0)
            out_image, out_sdm, out_mask = spatial_transform(image, sdm, masks, spacing, generator, "clip")
        image_mask, sdm_mask, label_mask = out_image[0, 0] > 0, out_sdm[0, 0] < 0, out_mask[0, 0] > 0.5
        moved += int((label_mask != torch.from_numpy(mask)).sum() > 50)
        # Interpolation blurs the edge by at most one voxel, so the three can differ only on a one-voxel shell.
        shell = torch.from_numpy(np.asarray(_edge(label_mask.numpy())))
        assert ((image_mask != label_mask) & ~shell).sum() == 0
        assert ((sdm_mask != label_mask) & ~shell).sum() == 0
    assert moved >= 18  # the transform really moves the anatomy


def _edge(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_dilation(mask) & ~ndimage.binary_erosion(mask)


def test_basic_augmentation_is_the_identity_and_strong_is_reproducible():
    images, sdms, masks = torch.randn(2, 1, 8, 8, 8), torch.rand(2, 2, 8, 8, 8), torch.ones(2, 2, 8, 8, 8)
    same = augment_batch(images, sdms, masks, "basic", (1, 1, 1), torch.Generator().manual_seed(0))
    assert all(a is b for a, b in zip(same, (images, sdms, masks)))
    first = augment_batch(images, sdms, masks, "strong", (1, 1, 1), torch.Generator().manual_seed(5))
    second = augment_batch(images, sdms, masks, "strong", (1, 1, 1), torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# --- oversampling ---------------------------------------------------------------------------------------


def test_foreground_oversampling_hits_each_organ_at_the_stated_rate():
    shape = (20, 40, 40)
    labels = np.zeros(shape, np.uint8)
    labels[2:4, 2:4, 2:4] = 1  # a tiny organ in a corner
    labels[10:18, 20:38, 20:38] = 2  # a large one
    case = PreparedCase("c", np.zeros(shape, np.float32), labels, label_map_to_sdms(labels, [1, 2], (1, 1, 1)), (1.0, 1.0, 1.0))
    sampler = PatchSampler([case], [1, 2], (8, 8, 8), flip=False, foreground_fraction=0.5)
    rng = np.random.default_rng(0)
    draws = 2000
    hits = np.zeros(2)
    for _ in range(draws):
        _, _, masks, _ = next(sampler.batches(1, rng))
        hits += masks[0].flatten(1).amax(1).numpy()
    # Half the patches are centred on an organ drawn uniformly: each organ at least 25 % of the time. Random
    # patches almost never hold the tiny organ (about 8 % of positions overlap it).
    tiny_rate, binomial_sd = hits[0] / draws, np.sqrt(0.25 * 0.75 / draws)
    assert tiny_rate >= 0.25 - 4 * binomial_sd and tiny_rate <= 0.25 + 0.1 + 4 * binomial_sd


# --- optimiser, schedule, budget, prior ----------------------------------------------------------------


def _tiny_data(folder, cases=4, rare=False):
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for index in range(cases):
        labels = np.zeros((16, 24, 24), np.uint8)
        labels[4:12, 6:16, 6:16] = 1
        if rare:
            labels[7:9, 18:20, 18:20] = 2  # 8 voxels of 9216: a rare, small organ
        image = labels * 2.0 + rng.normal(0, 0.3, labels.shape)
        for array, sub in ((image.astype(np.float32), "imagesTr"), (labels, "labelsTr")):
            sitk.WriteImage(sitk.GetImageFromArray(array), str(folder / sub / f"c{index}.nii.gz"))
    names = {"1": "big"} | ({"2": "rare"} if rare else {})
    (folder / "labels.json").write_text(json.dumps({"labels": names}))
    return folder


def test_poly_schedule_sgd_and_time_budget(tmp_path):
    data = _tiny_data(tmp_path / "data")
    config = TrainingConfig(
        str(data), str(tmp_path / "run"), mode="dual", epochs=4000, batch_size=2, patch_size=(16, 16, 16), optimizer="sgd",
        learning_rate=0.01, lr_schedule="poly", validate_every=2, time_budget_min=0.1, device="cpu", threads=1, validation_fraction=0.5,
    )
    said = []
    trainer = Trainer(config, progress=said.append)
    trainer.run()
    assert isinstance(trainer.optimizer, torch.optim.SGD) and trainer.optimizer.param_groups[0]["nesterov"]
    rows = [json.loads(json.dumps(r)) for r in trainer.log_rows]
    # The budget (6 s; a 1.2 s one was overrun before the first validation on a 2-core machine that trains
    # next door) fixed the run's length after the first validation, below the 4000 epochs asked
    # (and a run that overruns the budget by 10 % stops early, so it may end before that length).
    import re

    [fitted] = [int(m.group(1)) for text in said for m in [re.search(r"time budget .*: (\d+) epochs", text)] if m]
    assert 2 <= len(rows) <= fitted < 4000 and trainer.planned_epochs == len(rows)
    expected = [0.01 * (1 - (row["epoch"] - 1) / fitted) ** 0.9 for row in rows[2:]]
    np.testing.assert_allclose([row["lr"] for row in rows[2:]], expected, rtol=1e-9)
    card = json.loads((tmp_path / "run" / "last" / "model.json").read_text())
    assert card["architecture"]["heads"] == "dual" and card["training"]["precision"] in ("bf16", "fp32")
    assert card["training"]["steps"] == len(rows) * 1 and card["training"]["training_time_s"] > 0


def test_soft_prior_keeps_a_usable_gradient_for_a_rare_organ(tmp_path):
    labels = np.zeros((16, 24, 24), np.uint8)
    labels[4:12, 6:16, 6:16] = 1
    labels[7:9, 18:20, 18:20] = 2
    cases = [PreparedCase("c", np.zeros(labels.shape, np.float32), labels, label_map_to_sdms(labels, [1, 2], (1, 1, 1), "clip", 5.0), (1.0, 1.0, 1.0))]
    prior, soft = initial_output_biases(cases, "dual", "prior"), initial_output_biases(cases, "dual", "soft-prior")
    fraction = 8 / labels.size
    assert prior["segmentation_head"][1] == pytest.approx(np.log((1 - fraction) / fraction))
    assert soft["segmentation_head"][1] == pytest.approx(np.log(0.95 / 0.05))
    slope = lambda z: (1 / (1 + np.exp(-z))) * (1 - 1 / (1 + np.exp(-z)))  # noqa: E731  d sigmoid / d logit
    # The gradient that reaches the rare organ's logit is scaled by the sigmoid's slope at the start.
    assert slope(soft["segmentation_head"][1]) > 40 * slope(prior["segmentation_head"][1])
    assert abs(np.tanh(soft["head"])).max() <= 0.5 + 1e-9


# --- data packs -----------------------------------------------------------------------------------------


def test_pack_round_trip_and_training_from_a_pack(tmp_path):
    data = _tiny_data(tmp_path / "data")
    pack_path = tmp_path / "data.npz"
    intensity = {"method": "percentile", "lower": 0.5, "upper": 99.5}
    write_pack(data, pack_path, intensity)
    pack = read_pack(pack_path)
    assert pack.case_names == ["c0", "c1", "c2", "c3"] and pack.label_names == {1: "big"}
    from SDMOrganSegLib.formats.dataset import find_cases, prepare_case

    reference = prepare_case(find_cases(data)[0], [1], intensity, None, {"normalization": "clip", "scale_mm": 5.0})
    (packed,) = pack.prepared(["c0"], [1], {"normalization": "clip", "scale_mm": 5.0})
    step = (reference.image.max() - reference.image.min()) / 255
    assert np.abs(packed.image - reference.image).max() <= step / 2 + 1e-6  # 256 levels: half a step of rounding
    assert np.array_equal(packed.labels, reference.labels) and np.array_equal(packed.sdms, reference.sdms)
    run = tmp_path / "run"
    Trainer(TrainingConfig(str(pack_path), str(run), epochs=1, batch_size=2, patch_size=(16, 16, 16), device="cpu", threads=1, validation_fraction=0.5), progress=lambda t: None).run()
    assert (run / "best" / "model.json").is_file()
    with pytest.raises(SDMOrganSegError, match="other settings"):
        Trainer(TrainingConfig(str(pack_path), str(tmp_path / "r2"), epochs=1, spacing=(2.0, 2.0, 2.0), device="cpu"), progress=lambda t: None).run()
    (tmp_path / "bad.npz").write_bytes(b"not a pack")
    with pytest.raises(SDMOrganSegError, match="not a data pack"):
        read_pack(tmp_path / "bad.npz")


# --- a dual model end to end ----------------------------------------------------------------------------


def test_a_saved_dual_model_reproduces_its_card_through_segment(tmp_path):
    from conftest import HIPPOCAMPUS

    from SDMOrganSegLib.engines.inference import segment_image
    from SDMOrganSegLib.method.metrics import organ_metrics
    from SDMOrganSegLib.formats.modelfiles import load_model
    from SDMOrganSegLib.engines.training import finalize_best_model

    run = tmp_path / "run"
    config = TrainingConfig(
        str(HIPPOCAMPUS), str(run), mode="dual", epochs=4, batch_size=2, validate_every=2, device="cpu", threads=1,
        sdm_normalization="clip", sdm_scale_mm=5.0, sdm_weight=1.0, ce_weight=1.0, dice_reduction="batch", validation_fraction=0.5,
        learning_rate=2e-3,
    )
    Trainer(config, progress=lambda text: None).run()
    finalize_best_model(run, HIPPOCAMPUS, "cpu")
    model = load_model(run / "best")
    assert model.card.architecture.heads == "dual"
    metrics = model.card.metrics
    for index, case in enumerate(metrics["case_names"]):
        image = sitk.ReadImage(str(HIPPOCAMPUS / "imagesTr" / f"{case}.nii.gz"))
        reference = np.rint(sitk.GetArrayFromImage(sitk.ReadImage(str(HIPPOCAMPUS / "labelsTr" / f"{case}.nii.gz")))).astype(int)
        result = segment_image(image, model, "cpu")
        assert any("dual-head model" in note for note in result.notes)
        prediction = sitk.GetArrayFromImage(result.labels)
        for organ in model.card.organs:
            dice = organ_metrics(prediction == organ.label, reference == organ.label, image.GetSpacing()).dice
            assert dice == pytest.approx(metrics["per_case"][organ.name]["dice"][index], abs=0.01)
            # The SDM outputs are the SDM head's: tanh values, not the segmentation logits.
            assert np.abs(sitk.GetArrayFromImage(result.sdms[organ.name])).max() <= 1.0
    # A card with inference.labels_from = "sdm": the label map is the SDM head's zero level, the same SDMs.
    from SDMOrganSegLib.method.sdm import sdms_to_label_map

    model.card.inference["labels_from"] = "sdm"
    from_sdm = segment_image(image, model, "cpu")
    assert any("SDM head's zero level" in note for note in from_sdm.notes)
    sdms = [sitk.GetArrayFromImage(from_sdm.sdms[organ.name]) for organ in model.card.organs]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(from_sdm.labels), sdms_to_label_map(sdms, model.card.label_values))
    for organ, sdm in zip(model.card.organs, sdms):
        np.testing.assert_array_equal(sdm, sitk.GetArrayFromImage(result.sdms[organ.name]))
    assert not np.array_equal(sitk.GetArrayFromImage(from_sdm.labels), prediction)  # two heads, two label maps


def test_a_card_takes_its_labels_from_the_sdm_head_only_for_a_dual_model():
    from SDMOrganSegLib.formats.modelfiles import ModelCard
    from SDMOrganSegLib.method.architecture import split_heads

    organs = [{"name": "a", "label": 1}]
    for heads, labels_from, accepted in (("dual", "sdm", True), ("single", "sdm", False), ("dual", "logits", False), ("single", "segmentation", True)):
        values = {"name": "m", "architecture": preset("cpu", 1, 1, heads=heads).to_dict(), "organs": organs, "inference": {"labels_from": labels_from}}
        if accepted:
            card = ModelCard.from_dict(values)
            # Format 2 where a format-1 reader would ignore labels_from and take the segmentation head.
            assert card.inference["labels_from"] == labels_from and card.to_dict()["format"] == (2 if labels_from == "sdm" else 1)
        else:
            with pytest.raises(SDMOrganSegError, match="labels_from"):
                ModelCard.from_dict(values)
    output = np.arange(4.0)[:, None]
    sdm, labels = split_heads(output, preset("cpu", 1, 2, heads="dual"), "sdm")
    assert labels is sdm and np.array_equal(sdm, output[:2])
    with pytest.raises(ValueError, match="label source"):
        split_heads(output, preset("cpu", 1, 2, heads="dual"), "logits")


# --- organ-balanced cross-entropy (issue 20: organs that stay at "absent") -------------------------------


def test_organ_balanced_cross_entropy_gives_each_organ_half_the_weight_whatever_its_size():
    from SDMOrganSegLib.method.losses import cross_entropy_loss

    mask = torch.zeros(1, 2, 8, 16, 16)
    mask[0, 0, 2:6, 4:12, 4:12] = 1  # 256 of 2048 voxels
    mask[0, 1, 4, 8, 8] = 1  # one voxel
    logit = torch.full_like(mask, -8.0, requires_grad=True)  # a prior-like start: every organ "absent"
    cross_entropy_loss(logit, mask, balance="organ").backward()
    inside = logit.grad[mask > 0]
    # d/dz of 0.5 * mean over the organ's voxels of BCE = 0.5 * (p - 1) / n: summed over the organ, 0.5 * (p - 1).
    p = torch.sigmoid(torch.tensor(-8.0))
    torch.testing.assert_close(logit.grad[0, 0][mask[0, 0] > 0].sum(), 0.5 * (p - 1))
    torch.testing.assert_close(logit.grad[0, 1][mask[0, 1] > 0].sum(), 0.5 * (p - 1))
    assert inside.numel() == 257
    logit.grad = None
    cross_entropy_loss(logit, mask, balance="voxel").backward()
    # Averaged over all voxels the one-voxel organ pulls with (p - 1) / 2048, 1024 times less.
    torch.testing.assert_close(logit.grad[0, 1][mask[0, 1] > 0].sum(), (p - 1) / 2048)
    # A patch without the organ keeps the whole background term.
    empty = torch.zeros(1, 1, 4, 4, 4)
    torch.testing.assert_close(cross_entropy_loss(torch.zeros_like(empty), empty, balance="organ"), torch.tensor(float(np.log(2))))


@pytest.mark.slow
def test_organ_balanced_cross_entropy_learns_a_rare_small_organ_that_voxel_averaging_leaves_absent(tmp_path):
    # 2 training cases of 16 x 24 x 24 voxels: a large organ (800 voxels) and a rare one (8 voxels, 0.09 %), the
    # head-and-neck recipe otherwise (dual, batch Dice, CE, prior-initialised bias, foreground oversampling).
    data = _tiny_data(tmp_path / "data", rare=True)
    rare = {}
    for balance in ("voxel", "organ"):
        config = TrainingConfig(
            str(data), str(tmp_path / balance), mode="dual", epochs=27, batch_size=2, patch_size=(16, 16, 16), validate_every=3,
            device="cpu", threads=1, validation_fraction=0.5, precision="fp32", dice_reduction="batch", ce_weight=1.0, ce_balance=balance,
            output_bias="prior", sdm_normalization="clip", sdm_scale_mm=5.0, sdm_weight=1.0, learning_rate=1e-3, foreground_fraction=0.5, seed=0,
        )
        trainer = Trainer(config)
        trainer.run()
        rare[balance] = max(float(row["val_dice_rare"]) for row in trainer.log_rows if "val_dice_rare" in row)
    # Measured: voxel 0.0 for all 80 epochs tried; organ 0.91 from epoch 18 (1.0 from 51).
    assert rare["voxel"] < 0.1 and rare["organ"] > 0.5, rare


# --- a dual model's SDM head whose tanh saturated (issue 20: the head-and-neck campaign) -----------------


def _saturated_copy(source, target, bias: float):
    """``source``'s model with its SDM head's bias set to ``bias``: tanh at +1 everywhere, as the
    head-and-neck campaign's clip-normalised head ended (pre-activations 3-25 on hn_235)."""
    from SDMOrganSegLib.formats.modelfiles import load_model, save_model

    model = load_model(source)
    with torch.no_grad():
        model.network.head.bias.fill_(bias)
    save_model(model.network, model.card, target)
    return target


def test_reset_sdm_head_relearns_a_saturated_head_that_fine_tuning_alone_leaves_dead(tmp_path):
    data = _tiny_data(tmp_path / "data")
    common = dict(
        mode="dual", batch_size=2, patch_size=(16, 16, 16), device="cpu", threads=1, validation_fraction=0.5,
        sdm_weight=1.0, ce_weight=1.0, dice_reduction="batch", flip=False, learning_rate=5e-3, spacing=(1.0, 1.0, 1.0),
    )
    start = tmp_path / "start"
    Trainer(TrainingConfig(str(data), str(start), epochs=2, validate_every=2, sdm_normalization="clip", sdm_scale_mm=3.0, **common),
            progress=lambda text: None).run()
    saturated = _saturated_copy(start / "best", tmp_path / "saturated", 30.0)

    def fine_tune(name, **options):
        trainer = Trainer(TrainingConfig(str(data), str(tmp_path / name), epochs=40, validate_every=20, init_model=str(saturated),
                                         **{**common, **options}), progress=lambda text: None)
        trainer.run()
        return [row["val_sdm_agreement"] for row in trainer.log_rows if "val_sdm_agreement" in row]

    # The SDM head's zero level is empty everywhere while the segmentation finds the organ: agreement 0. With
    # tanh'(30) ~ 4e-26, 40 steps of fine-tuning cannot move it.
    kept = fine_tune("kept", sdm_normalization="clip", sdm_scale_mm=3.0)
    assert kept[0] == 0.0 and kept[-1] < 0.1, kept
    # Started afresh as a scaled copy of the segmentation head (on tanh targets, which the head reaches with
    # finite pre-activations), its zero level is the segmentation's surface from the start, and stays there.
    reset = fine_tune("reset", reset_sdm_head=True, sdm_normalization="tanh", sdm_scale_mm=3.0)
    assert reset[0] > 0.95 and reset[-1] > 0.8, reset
    card = json.loads((tmp_path / "reset" / "best" / "model.json").read_text())
    assert card["training"]["sdm"] == {"normalization": "tanh", "scale_mm": 3.0} and card["metrics"]["epoch"] > 0
    # A changed normalisation without the reset is refused, as is the reset of a single-head model.
    with pytest.raises(SDMOrganSegError, match="sdm normalization"):
        Trainer(TrainingConfig(str(data), str(tmp_path / "refused"), epochs=1, init_model=str(saturated),
                               **{**common, "sdm_normalization": "tanh"}), progress=lambda text: None).run()
    with pytest.raises(SDMOrganSegError, match="--reset-sdm-head"):
        Trainer(TrainingConfig(str(data), str(tmp_path / "single"), epochs=1, init_model=str(saturated),
                               reset_sdm_head=True, **{**common, "mode": "sdm+dice"}), progress=lambda text: None)


def test_band_balanced_sdm_terms_weigh_a_small_organs_surface_half_whatever_its_size():
    from SDMOrganSegLib.method.losses import l1_loss, product_loss, sdm_regions
    from SDMOrganSegLib.method.sdm import scaled_sdm

    mask = np.zeros((24, 24, 24), bool)
    mask[11:13, 11:13, 11:13] = True  # 8 voxels of 13,824
    target = torch.from_numpy(scaled_sdm(mask, (4.0, 4.0, 4.0), 20.0, "tanh"))[None, None]
    target_mask = torch.from_numpy(mask.astype(np.float32))[None, None]
    near = sdm_regions(target, target_mask, "band").bool()
    assert near[0, 0][torch.from_numpy(mask)].all() and 0 < near.float().mean() < 0.1  # the organ and a thin band
    # The constant the campaign's heads fell to: cheap when every voxel counts alike, not with the band.
    collapsed = torch.full_like(target, 0.93)
    voxel, band = l1_loss(collapsed, target), l1_loss(collapsed, target, regions=near)
    assert band > 2 * voxel
    assert float(l1_loss(target, target, regions=near)) == 0.0
    assert product_loss(target, target, regions=near) < product_loss(collapsed, target, regions=near)
    # The gradient: the near voxels together get half the weight, each near voxel 1 / (2 * near voxels).
    prediction = collapsed.clone().requires_grad_(True)
    l1_loss(prediction, target, regions=near).backward()
    weights = prediction.grad.abs()[0, 0]
    assert float(weights[near[0, 0]].sum()) == pytest.approx(0.5, rel=1e-5)
    assert float(weights[~near[0, 0]].sum()) == pytest.approx(0.5, rel=1e-5)

    # sides: the organ, the band outside it and the far field a third each.
    regions = sdm_regions(target, target_mask, "sides")
    assert set(torch.unique(regions).tolist()) == {0, 1, 2} and bool((regions[0, 0] == 2).eq(torch.from_numpy(mask)).all())
    prediction = collapsed.clone().requires_grad_(True)
    l1_loss(prediction, target, regions=regions).backward()
    for region in range(3):
        assert float(prediction.grad.abs()[regions == region].sum()) == pytest.approx(1 / 3, rel=1e-5)


def test_widening_doubles_the_channels_and_keeps_the_outputs():
    from SDMOrganSegLib.method.widening import widen

    torch.manual_seed(0)
    narrow = UNet3D(preset("cpu", 1, 3, output_activation="tanh", heads="dual")).eval()
    with torch.no_grad():  # trained-looking group norms, not the identity they start as
        for module in narrow.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    wide = widen(narrow).eval()
    assert wide.config.base_channels == 2 * narrow.config.base_channels and wide.config.max_channels == 2 * narrow.config.max_channels
    assert sum(p.numel() for p in wide.parameters()) > 3 * sum(p.numel() for p in narrow.parameters())
    image = torch.randn(1, 1, 32, 32, 16)
    with torch.no_grad():
        expected, got = narrow(image), wide(image)
    # float32 sums of about 10^3 terms reordered by the split: a few 1e-6 relative, far below any organ decision.
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4), float((got - expected).abs().max())
    # The two copies of a channel read their inputs through different splits: training can tell them apart.
    first = wide.encoders[1][0][0].weight
    assert not torch.equal(first[:, 0::2], first[:, 1::2])


def test_train_widen_starts_from_the_base_widened_with_its_validation_dice_and_resumes(tmp_path):
    data = _tiny_data(tmp_path / "data")
    common = dict(mode="dual", batch_size=2, patch_size=(16, 16, 16), device="cpu", threads=1, validation_fraction=0.5,
                  sdm_weight=1.0, ce_weight=1.0, dice_reduction="batch", flip=False, learning_rate=5e-3, spacing=(1.0, 1.0, 1.0),
                  sdm_normalization="tanh", sdm_scale_mm=3.0)
    Trainer(TrainingConfig(str(data), str(tmp_path / "narrow"), epochs=3, validate_every=3, **common), progress=lambda text: None).run()
    base = json.loads((tmp_path / "narrow" / "best" / "model.json").read_text())
    config = TrainingConfig(str(data), str(tmp_path / "wide"), epochs=2, validate_every=1, init_model=str(tmp_path / "narrow" / "best"),
                            widen=True, **common)
    trainer = Trainer(config, progress=lambda text: None)
    trainer.run()
    # Epoch 0 validates the widened base: the same Dice as the base's own validation.
    assert trainer.log_rows[0]["val_mean_dice"] == pytest.approx(base["metrics"]["validation_mean_dice"], abs=1e-4)
    card = json.loads((tmp_path / "wide" / "last" / "model.json").read_text())
    assert card["architecture"]["base_channels"] == 2 * base["architecture"]["base_channels"]
    assert card["architecture"]["max_channels"] == 2 * base["architecture"]["max_channels"]
    # A resume rebuilds the wide network for the checkpoint.
    said = []
    Trainer(dataclasses.replace(config, epochs=3), progress=said.append).run()
    assert any("resuming after epoch 2" in text for text in said)
    with pytest.raises(SDMOrganSegError, match="--widen"):
        Trainer(TrainingConfig(str(data), str(tmp_path / "refused"), epochs=1, widen=True, **common))


# --- the SDM head's scale and the Eikonal term ----------------------------------------------------------


def test_fine_tuning_a_tanh_model_to_another_sdm_scale_rescales_its_head_exactly(tmp_path):
    """``--sdm-scale`` of a tanh model's fine-tuning run: the head's last layer is divided by s'/s, so the new
    model's SDM is tanh(d / s') where the base's was tanh(d / s), for the same d; a clip model refuses."""
    from safetensors.torch import load_file

    from SDMOrganSegLib.formats.modelfiles import load_model

    data = _tiny_data(tmp_path / "data")
    common = dict(mode="dual", batch_size=2, patch_size=(16, 16, 16), device="cpu", threads=1, validation_fraction=0.5, sdm_normalization="tanh", spacing=(1.0, 1.0, 1.0))
    Trainer(TrainingConfig(str(data), str(tmp_path / "base"), epochs=2, sdm_scale_mm=5.0, eikonal_weight=0.5, **common), progress=lambda t: None).run()
    base = load_model(tmp_path / "base" / "last")
    said = []
    # A learning rate of 1e-12 leaves the weights as the start put them, within float32 rounding.
    tuned = TrainingConfig(str(data), str(tmp_path / "tuned"), epochs=1, sdm_scale_mm=10.0, init_model=str(tmp_path / "base" / "last"), learning_rate=1e-12, **common)
    Trainer(tuned, progress=said.append).run()
    assert any("rescaled from 5 mm to 10 mm (x0.5)" in line for line in said)
    before, after = load_file(str(tmp_path / "base" / "last" / "model.safetensors")), load_file(str(tmp_path / "tuned" / "last" / "model.safetensors"))
    for name in ("head.weight", "head.bias"):
        np.testing.assert_allclose(after[name].numpy(), 0.5 * before[name].numpy(), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(after["segmentation_head.weight"].numpy(), before["segmentation_head.weight"].numpy(), rtol=1e-5, atol=1e-9)
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    tuned_model = load_model(tmp_path / "tuned" / "last")
    with torch.no_grad():
        p, q = base.network(x)[:, :1].double(), tuned_model.network(x)[:, :1].double()
    # The same distance in mm: 5 atanh(p) = 10 atanh(q).
    inner = p.abs() < 0.99
    np.testing.assert_allclose((10 * torch.atanh(q))[inner].numpy(), (5 * torch.atanh(p))[inner].numpy(), atol=1e-3)
    assert tuned_model.card.training["sdm"] == {"normalization": "tanh", "scale_mm": 10.0}
    clip = TrainingConfig(str(data), str(tmp_path / "clip"), epochs=1, **{**common, "sdm_normalization": "clip"})
    Trainer(clip, progress=lambda t: None).run()
    with pytest.raises(SDMOrganSegError, match="sdm scale mm: 10"):
        Trainer(TrainingConfig(str(data), str(tmp_path / "clip2"), epochs=1, sdm_scale_mm=10.0, init_model=str(tmp_path / "clip" / "last"), **{**common, "sdm_normalization": "clip"}), progress=lambda t: None).run()


def test_the_eikonal_term_is_logged_and_refused_without_a_distance_head(tmp_path):
    from SDMOrganSegLib.formats.modelfiles import load_model

    data = _tiny_data(tmp_path / "data")
    common = dict(batch_size=2, patch_size=(16, 16, 16), device="cpu", threads=1, validation_fraction=0.5)
    trainer = Trainer(TrainingConfig(str(data), str(tmp_path / "run"), mode="sdm+dice", epochs=1, sdm_normalization="tanh", eikonal_weight=1.0, **common), progress=lambda t: None)
    trainer.run()
    assert float(trainer.log_rows[-1]["loss_eikonal"]) > 0
    for mode, normalization in (("dice", "tanh"), ("dual", "paper")):
        with pytest.raises(SDMOrganSegError, match="--eikonal-weight needs"):
            Trainer(TrainingConfig(str(data), str(tmp_path / mode), mode=mode, epochs=1, sdm_normalization=normalization, eikonal_weight=1.0, **common))
    with pytest.raises(SDMOrganSegError, match="--eikonal-unannotated extends"):
        Trainer(TrainingConfig(str(data), str(tmp_path / "u"), mode="dual", epochs=1, sdm_normalization="tanh", eikonal_unannotated=True, **common))
    with pytest.raises(SDMOrganSegError, match="--own-distance-weight needs"):
        Trainer(TrainingConfig(str(data), str(tmp_path / "o"), mode="dice", epochs=1, sdm_normalization="tanh", own_distance_weight=1.0, **common))
    own = Trainer(TrainingConfig(str(data), str(tmp_path / "own"), mode="dual", epochs=1, sdm_normalization="tanh", own_distance_weight=2.0, **common), progress=lambda t: None)
    own.run()
    assert "loss_own_distance" in own.log_rows[-1] and "loss_eikonal" not in own.log_rows[-1]
    with pytest.raises(SDMOrganSegError, match="--eikonal-band chooses"):
        Trainer(TrainingConfig(str(data), str(tmp_path / "b"), mode="dual", epochs=1, sdm_normalization="tanh", eikonal_band="target", **common))
    with pytest.raises(SDMOrganSegError, match="unknown Eikonal band"):
        Trainer(TrainingConfig(str(data), str(tmp_path / "b"), mode="dual", epochs=1, sdm_normalization="tanh", eikonal_weight=1.0, eikonal_band="own", **common))
    # The true band: logged like the other, recorded in the card, and a resume with the other rule is refused.
    target = Trainer(TrainingConfig(str(data), str(tmp_path / "t"), mode="dual", epochs=1, sdm_normalization="tanh", eikonal_weight=1.0, eikonal_band="target", **common), progress=lambda t: None)
    best = target.run()
    assert float(target.log_rows[-1]["loss_eikonal"]) > 0
    assert load_model(best).card.training["config"]["eikonal_band"] == "target"
    with pytest.raises(SDMOrganSegError, match="eikonal_band: 'target' -> 'agreed'"):
        Trainer(TrainingConfig(str(data), str(tmp_path / "t"), mode="dual", epochs=2, sdm_normalization="tanh", eikonal_weight=1.0, **common), progress=lambda t: None).run()


# --- an SDM branch of its own (issue 20: the SDM head away from the surface) -----------------------------


def test_an_sdm_branch_adds_to_the_sdm_head_only_and_starts_at_zero():
    from SDMOrganSegLib.method.widening import widen

    torch.manual_seed(0)
    plain = UNet3D(preset("cpu", 1, 2, heads="dual")).eval()
    branched = UNet3D(preset("cpu", 1, 2, heads="dual", sdm_branch=4)).eval()
    missing, unexpected = branched.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(key.startswith("sdm_branch.") for key in missing)
    image = torch.randn(1, 1, 16, 32, 16)
    with torch.no_grad():
        assert torch.equal(branched(image), plain(image))  # a new branch adds exactly 0
        branched.sdm_branch[-1].weight.normal_()
        out, before = branched(image), plain(image)
    assert not torch.allclose(out[:, :2], before[:, :2], atol=1e-3)  # the SDMs change...
    assert torch.equal(out[:, 2:], before[:, 2:])  # ...the segmentation logits cannot
    assert [layer.out_channels for layer in branched.sdm_output_layers()] == [2, 2]
    # Widening doubles the UNet's channels and keeps the branch's, with the same outputs.
    wide = widen(branched).eval()
    assert wide.sdm_branch[0][0].weight.shape == (4, 16, 3, 3, 3)
    with torch.no_grad():
        assert torch.allclose(wide(image), out, rtol=1e-4, atol=1e-4)


def test_a_card_with_an_sdm_branch_is_format_3_and_one_without_keeps_its_fields(tmp_path):
    from SDMOrganSegLib import MODEL_CARD_FORMAT
    from SDMOrganSegLib.formats.modelfiles import ModelCard, load_model, save_model

    organs = [{"name": "a", "label": 1}]
    plain = ModelCard.from_dict({"name": "m", "architecture": preset("cpu", 1, 1, heads="dual").to_dict(), "organs": organs})
    # Cards without a branch read as before by versions that predate the field (they refuse unknown fields).
    assert "sdm_branch" not in plain.to_dict()["architecture"] and plain.to_dict()["format"] == 1
    config = preset("cpu", 1, 1, heads="dual", sdm_branch=4)
    card = ModelCard.from_dict({"name": "m", "architecture": config.to_dict(), "organs": organs, "spacing": [1.0, 1.0, 1.0]})
    assert card.to_dict()["format"] == 3 == MODEL_CARD_FORMAT and card.architecture.sdm_branch == 4
    network = UNet3D(config).eval()
    with torch.no_grad():
        network.sdm_branch[-1].weight.normal_()
    save_model(network, card, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    image = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.network(image), network(image))
    with pytest.raises(ValueError, match="SDM branch"):
        preset("cpu", 1, 1, sdm_branch=-1)


def test_fine_tuning_adds_an_sdm_branch_keeping_the_outputs_rescales_it_and_refuses_changing_it(tmp_path):
    from SDMOrganSegLib.formats.modelfiles import load_model

    data = _tiny_data(tmp_path / "data")
    common = dict(mode="dual", batch_size=2, patch_size=(16, 16, 16), device="cpu", threads=1, validation_fraction=0.5, sdm_normalization="tanh",
                  sdm_scale_mm=5.0, spacing=(1.0, 1.0, 1.0), sdm_weight=1.0, ce_weight=1.0, flip=False, learning_rate=5e-3)
    Trainer(TrainingConfig(str(data), str(tmp_path / "base"), epochs=2, validate_every=2, **common), progress=lambda t: None).run()
    base = load_model(tmp_path / "base" / "best")
    said = []
    config = TrainingConfig(str(data), str(tmp_path / "branch"), epochs=2, validate_every=1, sdm_branch=4, init_model=str(tmp_path / "base" / "best"), **common)
    trainer = Trainer(config, progress=said.append)
    trainer.run()
    assert any("added an SDM branch of 4 channels" in line for line in said)
    # Epoch 0 validates the base with its new branch: the base's own validation Dice.
    assert trainer.log_rows[0]["val_mean_dice"] == pytest.approx(base.card.metrics["validation_mean_dice"], abs=1e-6)
    tuned = load_model(tmp_path / "branch" / "last")
    assert tuned.card.architecture.sdm_branch == 4 and float(tuned.network.sdm_branch[-1].weight.detach().abs().sum()) > 0
    said.clear()
    Trainer(dataclasses.replace(config, epochs=3), progress=said.append).run()  # a resume rebuilds the branch
    assert any("resuming after epoch 2" in text for text in said)
    # Another --sdm-scale rescales the head and the branch together: 5 atanh(p) = 10 atanh(q) for the same input.
    rescaled = TrainingConfig(str(data), str(tmp_path / "rescaled"), epochs=1, init_model=str(tmp_path / "branch" / "last"), **{**common, "sdm_scale_mm": 10.0, "learning_rate": 1e-12})
    Trainer(rescaled, progress=lambda t: None).run()
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the resumed run's last model is the one rescaled
        p, q = load_model(tmp_path / "branch" / "last").network(x)[:, :1].double(), load_model(tmp_path / "rescaled" / "last").network(x)[:, :1].double()
    inner = p.abs() < 0.99
    np.testing.assert_allclose((10 * torch.atanh(q))[inner].numpy(), (5 * torch.atanh(p))[inner].numpy(), atol=1e-3)
    # A branch may be added, not changed or removed; and a Dice-only model has no SDM head to branch.
    for channels in (8, 0):
        with pytest.raises(SDMOrganSegError, match="SDM branch: "):
            Trainer(dataclasses.replace(config, out_dir=str(tmp_path / f"c{channels}"), sdm_branch=channels, init_model=str(tmp_path / "branch" / "last")), progress=lambda t: None).run()
    with pytest.raises(SDMOrganSegError, match="--sdm-branch adds to the SDM head"):
        Trainer(TrainingConfig(str(data), str(tmp_path / "dice"), mode="dice", epochs=1, sdm_branch=4))
