"""Fine-tuning (``sdmorganseg train --init MODEL``, ``TrainingConfig.init_model``) on the real hippocampus cases.

The settings come from the base model's card and contradictions are refused in one line, before any work;
the run starts from the base model's weights (its validation Dice before the first epoch is the base's);
the new card keeps the base's organs and preprocessing and records the base; and fine-tuning on labels
shifted outwards by one voxel moves the model's predictions toward them.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import HIPPOCAMPUS, hippocampus_cases, needs_torch

from SDMOrganSegLib import cli
from SDMOrganSegLib.common.errors import SDMOrganSegError
from SDMOrganSegLib.formats.finetuning import FINE_TUNING_LEARNING_RATE, contradictions, fine_tuning_settings, organs_for_data
from SDMOrganSegLib.formats.modelfiles import read_card, resolve_model, shipped_models

SHIPPED = read_card(resolve_model("hippocampus"))


# --- settings from the card (no PyTorch) ----------------------------------------------------------------------------


def test_the_base_card_gives_the_network_the_preprocessing_and_a_lower_learning_rate():
    settings = fine_tuning_settings(SHIPPED)
    assert (settings["preset"], settings["depth"], settings["base_channels"], settings["max_channels"]) == ("cpu", 4, 16, 64)
    assert settings["spacing"] == (1.0, 1.0, 1.0) and settings["intensity"] == {"method": "percentile", "lower": 0.5, "upper": 99.5}
    assert settings["sdm_normalization"] == "clip" and settings["sdm_scale_mm"] == 5.0 and settings["heaviside_k"] == SHIPPED.heaviside_k and settings["sliding_window"] is False
    assert settings["mode"] == "dual" and settings["patch_size"] == (32, 48, 32) and settings["flip"] is True
    assert settings["modality"] == "MR" and settings["learning_rate"] == FINE_TUNING_LEARNING_RATE < 5e-4
    # Training settings may change; the base's values, given explicitly, are no contradiction.
    chosen = fine_tuning_settings(SHIPPED, {"learning_rate": 3e-4, "mode": "dual", "patch_size": None, "spacing": [1, 1, 1], "preset": "cpu", "base_channels": 16})
    assert (chosen["learning_rate"], chosen["mode"], chosen["patch_size"]) == (3e-4, "dual", None)
    with pytest.raises(SDMOrganSegError, match="mode sdm: single output head"):  # a dual model keeps its two heads
        fine_tuning_settings(SHIPPED, {"mode": "sdm"})


@pytest.mark.parametrize(
    "given, named",
    [
        ({"spacing": (2.0, 2.0, 2.0)}, "spacing: 2,2,2 (the model's: 1,1,1)"),
        ({"intensity": {"method": "window", "low": -500.0, "high": 1000.0}}, "intensity: method=window,low=-500,high=1000"),
        ({"mode": "dice"}, "mode dice: output activation none (the model's: tanh)"),
        ({"preset": "paper"}, "network: depth 6, 24-384 channels, 2 outputs (the model's: depth 4, 16-64 channels, 2 outputs)"),
        ({"base_channels": 8}, "network: depth 4, 8-64 channels"),
        ({"sdm_normalization": "tanh"}, "sdm normalization: tanh (the model's: clip)"),
        ({"heaviside_k": 50.0}, "heaviside k: 50 (the model's: 1500)"),
        ({"sliding_window": True}, "sliding window: on (the model's: whole volumes)"),
        ({"modality": "CT"}, "modality: CT (the model's: MR)"),
    ],
)
def test_contradicting_settings_are_refused_in_one_line(given, named):
    with pytest.raises(SDMOrganSegError) as caught:
        fine_tuning_settings(SHIPPED, given)
    message = str(caught.value)
    assert named in message and "\n" not in message and message.startswith("fine-tuning model hippocampus keeps")


def test_an_sdm_branch_may_be_added_to_a_model_not_changed_or_given_to_a_dice_only_one():
    import dataclasses

    assert fine_tuning_settings(SHIPPED)["sdm_branch"] == 0  # the shipped model has none: kept unless given
    assert fine_tuning_settings(SHIPPED, {"sdm_branch": 16})["sdm_branch"] == 16  # added: it starts at zero
    branched = dataclasses.replace(SHIPPED, architecture=dataclasses.replace(SHIPPED.architecture, sdm_branch=16))
    assert contradictions(branched, {"sdm_branch": 16}) == [] and fine_tuning_settings(branched)["sdm_branch"] == 16
    assert contradictions(branched, {"sdm_branch": 8}) == ["SDM branch: 8 channels (the model's: 16)"]
    assert contradictions(branched, {"sdm_branch": 0}) == ["SDM branch: 0 channels (the model's: 16)"]
    dice_only = dataclasses.replace(SHIPPED, architecture=dataclasses.replace(SHIPPED.architecture, output_activation="none", heads="single"))
    assert "Dice-only model has no SDM head" in contradictions(dice_only, {"sdm_branch": 16})[0]


def test_every_contradiction_is_named_at_once():
    assert len(contradictions(SHIPPED, {"spacing": (2, 2, 2), "mode": "dice", "heaviside_k": 10.0})) == 3


def test_the_data_must_have_the_model_organs_matched_by_name():
    assert organs_for_data(SHIPPED, {1: "Anterior_Hippocampus", 2: "posterior hippocampus"}, "data") == SHIPPED.organs
    for names, named in [
        ({1: "anterior hippocampus"}, "missing posterior hippocampus"),
        ({1: "anterior hippocampus", 2: "posterior hippocampus", 3: "amygdala"}, "unknown 3: amygdala"),
        ({1: "posterior hippocampus", 2: "anterior hippocampus"}, "other values (posterior hippocampus is 1, anterior hippocampus is 2)"),
    ]:
        with pytest.raises(SDMOrganSegError) as caught:
            organs_for_data(SHIPPED, names, "data")
        assert named in str(caught.value) and "1: anterior hippocampus, 2: posterior hippocampus" in str(caught.value)


# --- the command line -----------------------------------------------------------------------------------------------


def _cli_error(capsys, *arguments: str) -> str:
    assert cli.main(["train", *arguments]) == cli.EXIT_USER_ERROR
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_cli_refuses_contradictions_and_other_organs_in_one_line_before_any_work(capsys, tmp_path):
    out = tmp_path / "run"
    line = _cli_error(capsys, str(HIPPOCAMPUS), "--out", str(out), "--init", "hippocampus", "--spacing", "2,2,2", "--mode", "dice")
    assert line.startswith("sdmorganseg: error: fine-tuning model hippocampus keeps") and "spacing: 2,2,2" in line and "mode dice" in line
    assert not out.exists(), "refused before any work"
    other = tmp_path / "other"
    shutil.copytree(HIPPOCAMPUS, other)
    (other / "labels.json").write_text(json.dumps({"labels": {"1": "head", "2": "tail"}}))
    line = _cli_error(capsys, str(other), "--out", str(out), "--init", "hippocampus", "--epochs", "1")
    assert "are not those of model hippocampus (unknown 1: head, 2: tail; missing anterior hippocampus, posterior hippocampus)" in line
    line = _cli_error(capsys, str(HIPPOCAMPUS), "--out", str(out), "--init", str(tmp_path / "nowhere"))
    assert "neither a folder nor a shipped model" in line


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory):
    """``sdmorganseg train --init hippocampus`` for two epochs on the six real cases (default split: 5 + 1)."""
    needs_torch()
    out = tmp_path_factory.mktemp("fine_tuned") / "run"
    code = cli.main(["train", str(HIPPOCAMPUS), "--out", str(out), "--init", "hippocampus", "--epochs", "2", "--validate-every", "1", "--threads", "1", "--device", "cpu"])
    assert code == 0
    return out


def test_cli_fine_tuning_starts_from_the_base_and_keeps_what_it_is(fine_tuned):
    from SDMOrganSegLib.formats.modelfiles import load_model
    from SDMOrganSegLib.engines.training import evaluate_model_on_split

    rows = list(csv.DictReader(open(fine_tuned / "log.csv")))
    assert [int(row["epoch"]) for row in rows] == [0, 1, 2]
    # Epoch 0 is the base model on this run's validation case: the run starts from the base's weights.
    base = load_model(resolve_model("hippocampus"))
    base.card.training["split"] = json.loads((fine_tuned / "split.json").read_text())
    results, _cases = evaluate_model_on_split(base, HIPPOCAMPUS, None, "cpu")
    assert float(rows[0]["val_mean_dice"]) == pytest.approx(np.mean([np.mean(m["dice"]) for m in results.values()]), abs=1e-5)

    card = read_card(fine_tuned / "last")
    assert card.name == "hippocampus-finetuned" and card.organs == SHIPPED.organs
    assert [o.terminology for o in card.organs] == [o.terminology for o in SHIPPED.organs]
    assert [o.color for o in card.organs] == [o.color for o in SHIPPED.organs]
    for organ, base_organ in zip(card.organs, SHIPPED.organs):  # widened to the new labels, never narrowed
        assert organ.volume_ml[0] <= base_organ.volume_ml[0] and organ.volume_ml[1] >= base_organ.volume_ml[1]
    assert (card.architecture, card.spacing, card.intensity, card.heaviside_k, card.window, card.modality, card.field_of_view) == (
        SHIPPED.architecture, SHIPPED.spacing, SHIPPED.intensity, SHIPPED.heaviside_k, SHIPPED.window, SHIPPED.modality, SHIPPED.field_of_view
    )
    assert card.training["sdm"] == {"normalization": "clip", "scale_mm": 5.0} and card.inference == {"tta": True} and card.training["epochs_trained"] == 2
    assert card.training["config"]["learning_rate"] == FINE_TUNING_LEARNING_RATE and card.training["config"]["init_model"] == "hippocampus"
    assert card.training["base_model"] == {
        "name": "hippocampus", "folder": str(shipped_models()["hippocampus"]), "weights_sha256": SHIPPED.weights_sha256,
        "validation_dice": {o: m["dice"]["mean"] for o, m in SHIPPED.metrics["per_organ"].items()},
    }
    assert card.training["data"] == str(HIPPOCAMPUS) and "--init hippocampus" in card.training["command"]
    # best/ is the base (epoch 0) unless an epoch validated better.
    best = read_card(fine_tuned / "best").metrics
    validated = {int(row["epoch"]): float(row["val_mean_dice"]) for row in rows}
    assert best["epoch"] == max(validated, key=lambda epoch: (validated[epoch], -epoch))


def test_a_base_taking_its_labels_from_the_sdm_head_is_validated_and_kept_so(tmp_path):
    """Fine-tuning keeps the base card's inference; validation (and so best/) uses the same label map."""
    needs_torch()
    from SDMOrganSegLib.formats.modelfiles import CARD_FILE, load_model
    from SDMOrganSegLib.engines.training import evaluate_model_on_split

    base_dir = tmp_path / "base"
    shutil.copytree(resolve_model("hippocampus"), base_dir)
    card = json.loads((base_dir / CARD_FILE).read_text())
    card["inference"] = {**card.get("inference", {}), "labels_from": "sdm"}
    card["format"] = max(card["format"], 2)
    (base_dir / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    out = tmp_path / "run"
    assert cli.main(["train", str(HIPPOCAMPUS), "--out", str(out), "--init", str(base_dir), "--epochs", "1", "--validate-every", "1", "--threads", "1", "--device", "cpu"]) == 0
    rows = list(csv.DictReader(open(out / "log.csv")))
    base = load_model(base_dir)
    base.card.training["split"] = json.loads((out / "split.json").read_text())
    results, _cases = evaluate_model_on_split(base, HIPPOCAMPUS, None, "cpu")  # the card's label map: the SDM head's
    assert float(rows[0]["val_mean_dice"]) == pytest.approx(np.mean([np.mean(m["dice"]) for m in results.values()]), abs=1e-5)
    assert read_card(out / "last").labels_from == "sdm"


def test_resuming_a_fine_tuning_run_continues_and_other_settings_are_refused(fine_tuned, capsys):
    before = (fine_tuned / "checkpoint.pt").read_bytes()
    line = _cli_error(capsys, str(HIPPOCAMPUS), "--out", str(fine_tuned), "--init", "hippocampus", "--epochs", "2", "--lr", "1e-3")
    assert "cannot resume" in line and "learning_rate" in line
    assert (fine_tuned / "checkpoint.pt").read_bytes() == before
    assert cli.main(["train", str(HIPPOCAMPUS), "--out", str(fine_tuned), "--init", "hippocampus", "--epochs", "2", "--threads", "1"]) == 0
    assert "already trained for 2 epochs" in capsys.readouterr().err


# --- fine-tuning moves the model toward systematically shifted labels ------------------------------------------------


def _dilated_copy(folder: Path) -> Path:
    """The six cases with each organ grown by one voxel (6-neighbourhood) into the background."""
    from scipy import ndimage

    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True)
    shutil.copy(HIPPOCAMPUS / "labels.json", folder / "labels.json")
    for case in hippocampus_cases():
        shutil.copy(HIPPOCAMPUS / "imagesTr" / f"{case}.nii.gz", folder / "imagesTr")
        image = sitk.ReadImage(str(HIPPOCAMPUS / "labelsTr" / f"{case}.nii.gz"))
        labels = sitk.GetArrayFromImage(image).astype(np.uint8)
        grown = labels.copy()
        for value in (1, 2):
            grown[(grown == 0) & ndimage.binary_dilation(labels == value)] = value
        out = sitk.GetImageFromArray(grown)
        out.CopyInformation(image)
        sitk.WriteImage(out, str(folder / "labelsTr" / f"{case}.nii.gz"))
    return folder


def _predicted(model_dir: Path, cases) -> list[np.ndarray]:
    import torch

    from SDMOrganSegLib.engines.inference import predict_array
    from SDMOrganSegLib.formats.modelfiles import load_model
    from SDMOrganSegLib.method.architecture import split_heads
    from SDMOrganSegLib.method.sdm import sdms_to_label_map

    model = load_model(model_dir)
    outputs = (predict_array(model.network, case.image, torch.device("cpu")) for case in cases)
    return [sdms_to_label_map(split_heads(output, model.card.architecture)[1], model.card.label_values) for output in outputs]


def _dice(prediction: np.ndarray, reference: np.ndarray, value: int) -> float:
    a, b = prediction == value, reference == value
    return float(2 * np.sum(a & b) / (np.sum(a) + np.sum(b)))


def test_fine_tuning_on_labels_grown_by_one_voxel_moves_the_predictions_toward_them(tmp_path):
    needs_torch()
    from SDMOrganSegLib.formats.dataset import find_cases, load_cases
    from SDMOrganSegLib.engines.training import Trainer, TrainingConfig

    data = _dilated_copy(tmp_path / "grown")
    split = {"train": ["hippocampus_001", "hippocampus_003", "hippocampus_006", "hippocampus_007"], "validation": ["hippocampus_004", "hippocampus_011"]}
    (tmp_path / "split.json").write_text(json.dumps(split))
    config = TrainingConfig(
        data_dir=str(data), out_dir=str(tmp_path / "run"), epochs=20, validate_every=20, threads=1, device="cpu", split_file=str(tmp_path / "split.json"),
        init_model="hippocampus", command="test", **fine_tuning_settings(SHIPPED),
    )
    Trainer(config, progress=lambda text: None).run()

    by_name = {case.name: case for case in find_cases(data)}
    cases = load_cases([by_name[name] for name in split["validation"]], [1, 2], SHIPPED.intensity, SHIPPED.spacing, None)
    before, after = _predicted(resolve_model("hippocampus"), cases), _predicted(tmp_path / "run" / "last", cases)
    dice = {"grown": [], "original": []}
    for case, old, new in zip(cases, before, after):
        grown = case.labels
        original = sitk.GetArrayFromImage(sitk.ReadImage(str(HIPPOCAMPUS / "labelsTr" / f"{case.name}.nii.gz")))
        for value in (1, 2):
            # The voxels each organ gained in the labels: the fine-tuned model covers more of them.
            shell = (grown == value) & (original != value)
            assert np.mean(new[shell] == value) > np.mean(old[shell] == value) + 0.05, (case.name, value)
            assert np.sum(new == value) > np.sum(old == value), (case.name, value)
            for name, reference in (("grown", grown), ("original", original)):
                dice[name].append((_dice(old, reference, value), _dice(new, reference, value)))
    # On average closer to the grown labels and farther from the original ones than the base model.
    old_grown, new_grown = np.mean(dice["grown"], axis=0)
    old_original, new_original = np.mean(dice["original"], axis=0)
    assert new_grown > old_grown + 0.005 and new_original < old_original - 0.005
