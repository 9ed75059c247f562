"""Segmenting without PyTorch: the shipped models' ``model.onnx`` on ONNX Runtime.

Runs with and without PyTorch (CI's Python 3.9 and 3.12 suites have only ONNX Runtime): there, the shipped
models segment real fixtures on ONNX Runtime, a tampered ``model.onnx`` is refused, and a model without one
asks for PyTorch. Where PyTorch is installed, both runtimes segment the same fixtures (with and without
test-time augmentation) and must agree, and ``sdmorganseg export`` writes a working ``model.onnx``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import DATA, HAVE_TORCH, REPO, float32_tolerance, needs_torch

pytest.importorskip("onnxruntime")

from SDMOrganSegLib.formats.modelfiles import CARD_FILE, ONNX_FILE, load_model, sha256_of  # noqa: E402

MODELS = REPO / "Resources" / "Models"
HIPPOCAMPUS_CASE = DATA / "hippocampus" / "imagesTr" / "hippocampus_003.nii.gz"
HEADNECK_CASE = DATA / "openkbp-hn" / "imagesTr" / "hn_226.nii.gz"
FIXTURES = {"hippocampus": HIPPOCAMPUS_CASE, "headneck-oar": HEADNECK_CASE}
#: Runs the command line with ``import torch`` failing, as where PyTorch is not installed.
WITHOUT_TORCH = "import sys, runpy; sys.modules['torch'] = None; sys.argv = ['sdmorganseg'] + sys.argv[1:]; runpy.run_module('SDMOrganSegLib.cli', run_name='__main__')"


def run_without_torch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, *map(str, args)], capture_output=True, text=True, timeout=600,
        cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO / "SDMOrganSeg")},
    )


def copy_model(name: str, target: Path) -> Path:
    shutil.copytree(MODELS / name, target)
    return target


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_shipped_models_list_their_onnx_export_with_its_checksum(name):
    card = json.loads((MODELS / name / CARD_FILE).read_text())
    record = card["onnx"]
    assert record["file"] == ONNX_FILE and record["sha256"] == sha256_of(MODELS / name / ONNX_FILE)
    assert record["weights_sha256"] == card["weights_sha256"]  # exported from the shipped weights
    # Read from the graph: one SDM per organ, and for a "dual" network as many segmentation logits again.
    heads = 2 if card["architecture"].get("heads") == "dual" else 1
    assert record["output_channels"] == heads * len(card["organs"])


def test_the_hippocampus_case_segments_without_pytorch(tmp_path):
    out = tmp_path / "out"
    process = run_without_torch("segment", HIPPOCAMPUS_CASE, "--out", out, "--quiet")
    assert process.returncode == 0, process.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runtime"] == "onnxruntime" and summary["provider"] == "CPUExecutionProvider"
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labels.nii.gz")))
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / "hippocampus" / "labelsTr" / HIPPOCAMPUS_CASE.name)))
    for label in (1, 2):  # the model's validation Dice is 0.85-0.88; a broken network gives far less
        dice = 2 * np.sum((labels == label) & (reference == label)) / (np.sum(labels == label) + np.sum(reference == label))
        assert dice > 0.7, (label, dice)


def test_the_headneck_case_segments_without_pytorch(tmp_path):
    out = tmp_path / "out"
    process = run_without_torch("segment", HEADNECK_CASE, "--model", "headneck-oar", "--out", out, "--quiet", "--levels", "0")
    assert process.returncode == 0, process.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runtime"] == "onnxruntime"
    # The card's validation Dice for this case (0.68-0.80 for the organs it learnt): far from a broken network's.
    card = json.loads((MODELS / "headneck-oar" / CARD_FILE).read_text())
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labels.nii.gz")))
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / "openkbp-hn" / "labelsTr" / HEADNECK_CASE.name)))
    organ = next(o for o in card["organs"] if o["name"] == "mandible")
    dice = 2 * np.sum((labels == organ["label"]) & (reference == organ["label"])) / (np.sum(labels == organ["label"]) + np.sum(reference == organ["label"]))
    index = card["metrics"]["organ_case_names"]["mandible"].index("hn_226")
    assert dice == pytest.approx(card["metrics"]["per_case"]["mandible"]["dice"][index], abs=0.01)


def test_a_tampered_onnx_file_is_refused_by_its_checksum_in_one_line(tmp_path):
    folder = copy_model("hippocampus", tmp_path / "model")
    data = bytearray((folder / ONNX_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / ONNX_FILE).write_bytes(bytes(data))
    process = run_without_torch("segment", HIPPOCAMPUS_CASE, "--model", folder, "--out", tmp_path / "out", "--quiet")
    assert process.returncode == 2
    assert process.stderr.count("\n") == 1 and "Traceback" not in process.stderr
    assert process.stderr.startswith(f"sdmorganseg: error: checksum mismatch for {folder / ONNX_FILE}")
    assert not (tmp_path / "out").exists()


def without_onnx(folder: Path) -> Path:
    (folder / ONNX_FILE).unlink()
    card = json.loads((folder / CARD_FILE).read_text())
    del card["onnx"]
    (folder / CARD_FILE).write_text(json.dumps(card, indent=2))
    return folder


def test_a_model_without_onnx_says_in_one_line_that_it_needs_pytorch(tmp_path):
    folder = without_onnx(copy_model("hippocampus", tmp_path / "model"))
    process = run_without_torch("segment", HIPPOCAMPUS_CASE, "--model", folder, "--out", tmp_path / "out", "--quiet")
    assert process.returncode == 2 and process.stderr.count("\n") == 1, process.stderr
    assert f"model hippocampus has no {ONNX_FILE}, so segmenting with it needs PyTorch" in process.stderr
    assert f"sdmorganseg export {folder} writes it where PyTorch is installed" in process.stderr
    # Asking for ONNX Runtime, or for PyTorch where it is missing, is refused the same way.
    process = run_without_torch("segment", HIPPOCAMPUS_CASE, "--model", folder, "--runtime", "onnxruntime", "--out", tmp_path / "out", "--quiet")
    assert process.returncode == 2 and process.stderr.count("\n") == 1 and "--runtime torch" in process.stderr
    process = run_without_torch("segment", HIPPOCAMPUS_CASE, "--runtime", "torch", "--out", tmp_path / "out", "--quiet")
    assert process.returncode == 2 and process.stderr.count("\n") == 1 and "needs PyTorch, which is not installed" in process.stderr


@pytest.mark.skipif(not HAVE_TORCH, reason="PyTorch is not installed")
def test_a_model_without_onnx_falls_back_to_pytorch_with_a_note(tmp_path):
    folder = without_onnx(copy_model("hippocampus", tmp_path / "model"))
    model = load_model(folder)
    assert model.runtime == "torch" and model.onnx is None
    assert model.notes == [f"model hippocampus has no {ONNX_FILE} (sdmorganseg export {folder} writes it): running on PyTorch"]


# --- both runtimes, where PyTorch is installed ----------------------------------------------------------------


@pytest.fixture(scope="module")
def both_runtimes():
    needs_torch()
    return {name: {runtime: load_model(MODELS / name, runtime=runtime) for runtime in ("onnxruntime", "torch")} for name in FIXTURES}


@pytest.mark.parametrize("tta", [False, True])
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_onnx_runtime_and_pytorch_give_the_same_labels_and_sdms(both_runtimes, name, tta):
    from SDMOrganSegLib.engines.inference import segment_image

    image = sitk.ReadImage(str(FIXTURES[name]))
    onnx = segment_image(image, both_runtimes[name]["onnxruntime"], "cpu", tta=tta)
    torch = segment_image(image, both_runtimes[name]["torch"], "cpu", tta=tta)
    assert (onnx.runtime, onnx.provider, torch.runtime, torch.provider) == ("onnxruntime", "CPUExecutionProvider", "torch", "cpu")
    assert onnx.settings == torch.settings and onnx.settings["tta"] == tta
    assert np.array_equal(sitk.GetArrayViewFromImage(onnx.labels), sitk.GetArrayViewFromImage(torch.labels))
    network = both_runtimes[name]["torch"].network
    for organ in torch.sdms:
        expected = sitk.GetArrayViewFromImage(torch.sdms[organ])
        difference = np.abs(sitk.GetArrayViewFromImage(onnx.sdms[organ]) - expected).max()
        # Both are float32 runs of one network, summing in other orders: within K * eps * magnitude (conftest),
        # the magnitude being that of the last sum, the output's pre-activation: a logit as it is, a tanh SDM's
        # atanh (tanh is 1-Lipschitz; float32 tanh stops at 1 - 6e-8, whose atanh is 8.7). Measured: hippocampus (tanh SDMs) 3.1e-5 to 4.1e-5; the Dice-only
        # head-and-neck preview (logits up to 44) 1.7e-3 to 1.2e-2, ONNX Runtime being the side farther from a
        # float64 run (3.6e-3 against PyTorch's 2.5e-5 on a window); the dual head-and-neck model, whose SDM
        # adds a branch's readout to the head's, 2.2e-4 to 8.8e-4 (pre-activations 5.6 to 8.0).
        if network.config.output_activation == "tanh":
            magnitude = float(np.abs(np.arctanh(np.clip(expected, -1 + 6e-8, 1 - 6e-8))).max())
        else:
            magnitude = float(np.abs(expected).max())
        assert difference <= float32_tolerance(network, magnitude), (organ, difference)


@pytest.mark.slow
def test_export_writes_a_checked_onnx_that_save_model_retires_with_its_weights(tiny_model_dir, tmp_path):
    import torch

    from SDMOrganSegLib.cli import main
    from SDMOrganSegLib.engines.inference import network_runner, predict_array
    from SDMOrganSegLib.formats.modelfiles import save_model

    folder = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir, folder)
    assert main(["export", str(folder)]) == 0
    model = load_model(folder)
    assert model.runtime == "onnxruntime" and model.card.onnx["sha256"] == sha256_of(folder / ONNX_FILE)
    volume = np.random.default_rng(1).standard_normal((37, 50, 29)).astype(np.float32)  # not a multiple of 16: padded
    got = predict_array(network_runner(model, "cpu"), volume)
    expected = predict_array(model.network, volume, torch.device("cpu"))
    assert got.shape == expected.shape == (2, 37, 50, 29)
    assert np.abs(got - expected).max() <= 1e-4
    # New weights: the export of the old ones is removed with them, and the card no longer lists it.
    with torch.no_grad():
        model.network.head.bias += 1
    save_model(model.network, model.card, folder, overwrite=True)
    assert not (folder / ONNX_FILE).exists() and "onnx" not in json.loads((folder / CARD_FILE).read_text())
    assert load_model(folder).runtime == "torch"


@pytest.mark.slow
def test_a_model_with_an_sdm_branch_exports_to_onnx_with_the_same_outputs(tmp_path):
    needs_torch()  # to build and export the network
    import torch

    from SDMOrganSegLib.engines.inference import network_runner, predict_array
    from SDMOrganSegLib.engines.onnxmodel import export_model
    from SDMOrganSegLib.formats.modelfiles import ModelCard, save_model
    from SDMOrganSegLib.method.architecture import preset
    from SDMOrganSegLib.method.network import UNet3D

    torch.manual_seed(3)
    config = preset("cpu", 1, 2, heads="dual", sdm_branch=4)
    network = UNet3D(config).eval()
    with torch.no_grad():
        network.sdm_branch[-1].weight.normal_(0, 0.3)  # a trained-looking branch, not the zero it starts as
    card = ModelCard.from_dict({"name": "b", "architecture": config.to_dict(), "organs": [{"name": "a", "label": 1}, {"name": "c", "label": 2}], "spacing": [1.0, 1.0, 1.0]})
    save_model(network, card, tmp_path / "b")
    export_model(tmp_path / "b")
    model = load_model(tmp_path / "b")
    assert model.runtime == "onnxruntime" and model.card.onnx["output_channels"] == 4
    volume = np.random.default_rng(2).standard_normal((20, 33, 17)).astype(np.float32)
    got = predict_array(network_runner(model, "cpu"), volume)
    expected = predict_array(network, volume, torch.device("cpu"))
    # tanh SDMs and logits of a few units: float32 reorderings stay far below 1e-4 (the tiny model's test).
    assert np.abs(got - expected).max() <= 1e-4
