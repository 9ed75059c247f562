"""The trainer on real hippocampus cases: the loss falls, every output is written, the card is complete."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from conftest import HIPPOCAMPUS

from SDMOrganSegLib.formats.dataset import find_cases, load_cases, make_split
from SDMOrganSegLib.formats.modelfiles import load_model
from SDMOrganSegLib.method.sdm import heaviside
from SDMOrganSegLib.engines.training import PatchSampler, Trainer, TrainingConfig


SETTINGS = dict(data_dir=str(HIPPOCAMPUS), batch_size=2, validate_every=4, lr_step=4, learning_rate=2e-3, max_cases=4, seed=0, command="test")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    config = TrainingConfig(out_dir=str(out), epochs=8, threads=2, **SETTINGS)
    best = Trainer(config, progress=lambda text: None).run()
    return out, best


def test_loss_falls_and_outputs_exist(trained_run):
    out, best = trained_run
    rows = list(csv.DictReader((out / "log.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 9))
    losses = [float(r["loss"]) for r in rows]
    assert np.mean(losses[-2:]) < np.mean(losses[:2])
    assert [float(r["lr"]) for r in rows] == pytest.approx([2e-3] * 4 + [2e-3 * 0.8] * 4)  # x0.8 every 4 epochs
    assert all(0 <= float(r["data_share"]) < 0.5 for r in rows)
    for name in ("split.json", "curves.png", "checkpoint.pt", "log.csv"):
        assert (out / name).is_file(), name
    assert list((out / "cache").glob("*.npz"))
    model = load_model(best)
    assert model.card.training["split"]["train"] and model.card.training["command"] == "test"
    assert model.card.metrics["validation_mean_dice"] >= 0


def test_rerun_resumes_instead_of_starting_over(trained_run):
    out, _ = trained_run
    messages = []
    config = TrainingConfig(out_dir=str(out), epochs=8, **SETTINGS)
    Trainer(config, progress=messages.append).run()
    assert any("already trained for 8 epochs" in m for m in messages)


@pytest.mark.parametrize(
    "change, named",
    [({"mode": "dice"}, "mode: 'sdm+dice' -> 'dice'"), ({"learning_rate": 1e-4}, "learning_rate: 0.002 -> 0.0001"),
     ({"base_channels": 16}, "base_channels: None -> 16"), ({"sdm_normalization": "clip"}, "sdm_normalization")],
)
def test_resuming_with_other_settings_is_refused_naming_them(trained_run, change, named):
    from SDMOrganSegLib.common.errors import SDMOrganSegError

    out, _ = trained_run
    before = (out / "checkpoint.pt").read_bytes()
    config = TrainingConfig(out_dir=str(out), epochs=10, **{**SETTINGS, **change})
    with pytest.raises(SDMOrganSegError, match="cannot resume") as caught:
        Trainer(config, progress=lambda text: None).run()
    assert named in str(caught.value) and "\n" not in str(caught.value)
    assert (out / "checkpoint.pt").read_bytes() == before  # nothing trained, nothing written


def test_split_is_seeded_and_disjoint():
    names = [f"case{i:03d}" for i in range(50)]
    first, second = make_split(names, 0.2, seed=7), make_split(list(reversed(names)), 0.2, seed=7)
    assert first == second and len(first["validation"]) == 10
    assert not set(first["train"]) & set(first["validation"])


def test_patches_keep_labels_and_sdms_consistent(tmp_path):
    cases = load_cases(find_cases(HIPPOCAMPUS)[:2], [1, 2], {"method": "percentile", "lower": 0.5, "upper": 99.5}, None, tmp_path)
    sampler = PatchSampler(cases, [1, 2], (24, 40, 24), flip=True)
    for images, sdms, masks, annotated in sampler.batches(2, np.random.default_rng(0)):
        assert annotated.shape == (2, 2) and bool((annotated == 1).all())  # no annotations.json: all known
        assert images.shape == (2, 1, 24, 40, 24) and sdms.shape == masks.shape == (2, 2, 24, 40, 24)
        # After cropping, padding and flipping, the Heaviside of the SDM is still the mask.
        np.testing.assert_array_equal(heaviside(sdms.numpy()) > 0.5, masks.numpy() > 0.5)
