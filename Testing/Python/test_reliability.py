"""Reliability rules (issue 6), one test per rule; docs/reliability.md lists them with the messages users see.

* Bad input, at every entry point (the ``sdmorganseg`` command, ``load_model`` / ``segment_image`` /
  ``write_result``, the trainer): refused with one line naming the problem, never a traceback, exit != 0.
* Nothing lost: all-or-nothing outputs, no silent overwrites, atomic checkpoints that resume exactly,
  out-of-memory retries, no path outside the output folder.
* Properties of the SDM (hypothesis).

Command-line tests run the real ``sdmorganseg`` in subprocesses; the failing ones are started together
(``cli_errors``) so that their start-up time overlaps.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

from conftest import HIPPOCAMPUS, REPO
from SDMOrganSegLib.formats import dataset
from SDMOrganSegLib.engines import inference
from SDMOrganSegLib.common.errors import CancelledError, SDMOrganSegError
from SDMOrganSegLib.common.files import inside
from SDMOrganSegLib.images.imageio import read_volume
from SDMOrganSegLib.engines.inference import estimate_memory_bytes, segment_image
from SDMOrganSegLib.formats.modelfiles import LoadedModel, ModelCard, load_model, organs_from_labels, save_model
from SDMOrganSegLib.method.network import UNet3D, preset
from SDMOrganSegLib.engines.outputs import write_result
from SDMOrganSegLib.method.sdm import heaviside, normalized_sdm

# ---------------------------------------------------------------------------------------------- helpers


def _command() -> list[str]:
    beside = Path(sys.executable).with_name("sdmorganseg")
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("sdmorganseg")
    return [found] if found else [sys.executable, "-m", "SDMOrganSegLib.cli"]


def _environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "SDMOrganSeg"))
    env.pop(inference.MEMORY_ENV, None)
    env.update(extra or {})
    return env


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(_command() + [str(a) for a in args], capture_output=True, text=True, env=_environment(env), timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> str:
    """Exit status != 0, stderr exactly one line ``sdmorganseg: error: ...`` holding ``words``, no traceback."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.strip("\n").splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sdmorganseg: error: "), lines[0]
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines[0])
    return lines[0]


def assert_error(call, *words: str) -> str:
    with pytest.raises(SDMOrganSegError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message.strip(), message
    for word in words:
        assert word.lower() in message.lower(), (word, message)
    return message


def digest_tree(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder`` (folders as "<dir>")."""
    out = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        out[key] = "<dir>" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def noise_volume(shape_zyx=(20, 24, 22), seed=0, spacing=(1.0, 1.0, 1.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(np.random.default_rng(seed).normal(100, 20, size=shape_zyx).astype(np.float32))
    image.SetSpacing(spacing)
    return image


def rotation(angles_deg=(30.0, 20.0, 10.0)) -> tuple[float, ...]:
    a, b, c = (math.radians(v) for v in angles_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return tuple((rz @ ry @ rx).ravel())


class Evil:
    """Unpickling this creates ``marker``: the stand-in for code a pickle runs when loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class BallNet(nn.Module):
    """A 'perfect' one-organ model: the SDM of a ball of ``radius`` voxels centred in its input."""

    def __init__(self, radius: float) -> None:
        super().__init__()
        self.config = preset("cpu", 1, 1)
        self.radius = radius

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axes = [torch.arange(n, dtype=torch.float32, device=x.device) - (n - 1) / 2 for n in x.shape[2:]]
        z, y, w = torch.meshgrid(*axes, indexing="ij")
        distance = torch.sqrt(z**2 + y**2 + w**2)
        return torch.tanh((distance - self.radius) / self.radius)[None, None].expand(x.shape[0], 1, *x.shape[2:])


class OutOfMemoryNet(nn.Module):
    """Raises CUDA's out-of-memory error for inputs over ``limit`` voxels a side, and for every input on a
    device other than the CPU (the ``meta`` device stands in for a GPU on machines without one)."""

    def __init__(self, limit: int, organs: int = 2) -> None:
        super().__init__()
        self.config = preset("cpu", 1, organs)
        self.limit = limit
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.device.type, tuple(x.shape[2:])))
        if x.device.type != "cpu" or max(x.shape[2:]) > self.limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.numel() * 4000} bytes")
        return torch.tanh(x).repeat(1, self.config.out_channels, 1, 1, 1)


def loaded(network: nn.Module, names: dict[int, str], directory: Path, spacing=(1.0, 1.0, 1.0)) -> LoadedModel:
    card = ModelCard(name="test", architecture=network.config, organs=organs_from_labels(names), spacing=spacing)
    return LoadedModel(card=card, network=network, directory=directory)


# ---------------------------------------------------------------------------------------------- bad files


def _write(image: sitk.Image, path: Path, compress: bool = True) -> Path:
    sitk.WriteImage(image, str(path), useCompression=compress)
    return path


def make_bad_images(folder: Path) -> dict[str, tuple[Path, tuple[str, ...]]]:
    """Every kind of bad input image, with the words its message must hold."""
    folder.mkdir(parents=True, exist_ok=True)
    good = noise_volume()
    array = sitk.GetArrayFromImage(good)
    cases: dict[str, tuple[Path, tuple[str, ...]]] = {}

    def add(name, path, *words):
        cases[name] = (path, words)

    add("missing file", folder / "absent.nii.gz", "does not exist")
    (folder / "notes.nii.gz").write_text("these are notes, not an image\n")
    add("not an image (.nii.gz)", folder / "notes.nii.gz", "not a file format")
    (folder / "notes.nrrd").write_text("NRRD? no.\n")
    add("not an image (.nrrd)", folder / "notes.nrrd", "cannot read")
    (folder / "empty.nii").write_bytes(b"")
    add("empty file", folder / "empty.nii", "cannot read")

    whole = _write(good, folder / "whole.nii.gz").read_bytes()
    (folder / "cut.nii.gz").write_bytes(whole[: len(whole) // 2])
    add("truncated .nii.gz", folder / "cut.nii.gz", "truncated")
    corrupt = bytearray(whole)
    for offset in range(len(corrupt) // 2, len(corrupt) // 2 + 64):
        corrupt[offset] ^= 0x5A
    (folder / "corrupt.nii.gz").write_bytes(bytes(corrupt))
    add("corrupt .nii.gz (bytes changed)", folder / "corrupt.nii.gz", "corrupt")
    raw = _write(good, folder / "whole.nii", compress=False).read_bytes()
    (folder / "cut.nii").write_bytes(raw[: len(raw) - 1000])
    add("truncated .nii", folder / "cut.nii", "truncated")
    nrrd = _write(good, folder / "whole.nrrd", compress=False).read_bytes()
    (folder / "cut.nrrd").write_bytes(nrrd[: len(nrrd) // 2])
    add("truncated .nrrd", folder / "cut.nrrd", "truncated")
    nrrd_gz = _write(good, folder / "whole_gz.nrrd").read_bytes()
    (folder / "cut_gz.nrrd").write_bytes(nrrd_gz[: len(nrrd_gz) // 2])
    add("truncated gzip .nrrd", folder / "cut_gz.nrrd", "cannot read")
    (folder / "header_only.nrrd").write_bytes(nrrd[:120])
    add("corrupt .nrrd header", folder / "header_only.nrrd", "cannot read")

    # A MetaImage header whose data-file name ITK would use as a printf format: crashes ITK 5.4 (fuzz finding).
    meta = _write(good, folder / "whole.mha", compress=False).read_bytes()
    start = meta.index(b"ElementDataFile")
    (folder / "format_string.mha").write_bytes(meta[:start] + b"ElementDataFile = slice%s%s%n.raw 1 2 1\n")
    add("MetaImage data file name with printf codes", folder / "format_string.mha", "ElementDataFile", "corrupt")
    (folder / "negative_ndims.mha").write_bytes(meta.replace(b"NDims = 3", b"NDims = -2"))  # crashes ITK 5.4 too
    add("MetaImage header with NDims -2", folder / "negative_ndims.mha", "NDims -2", "corrupt")

    add("2D image", _write(good[:, :, 5], folder / "slice.nii.gz"), "is 2D")
    add("4D image", _write(sitk.JoinSeries([good, good]), folder / "series.nii.gz"), "is 4D")
    add("multi-component image", _write(sitk.Compose(good, good, good), folder / "rgb.nrrd"), "3 components")
    add("dimension of size 1", _write(good[:, :, 3:4], folder / "one_slice.nii.gz"), "at least 2 voxels")
    zero = bytearray(raw)
    zero[40 + 6 : 40 + 8] = (0).to_bytes(2, "little")  # NIfTI-1 dim[3] = 0
    (folder / "zero.nii").write_bytes(bytes(zero))
    add("dimension of size 0", folder / "zero.nii", "size 0")
    with_nan = array.copy()
    with_nan[3, 4, 5] = np.nan
    add("NaN voxels (NIfTI)", _write(sitk.GetImageFromArray(with_nan), folder / "nan.nii.gz"), "NaN or infinite")
    with_inf = array.copy()
    with_inf[1, 2, 3] = np.inf
    add("Inf voxels (NRRD)", _write(sitk.GetImageFromArray(with_inf), folder / "inf.nrrd"), "NaN or infinite")
    add("constant image", _write(sitk.GetImageFromArray(np.full_like(array, 7)), folder / "constant.nii.gz"), "constant")
    return cases


BAD_IMAGE_NAMES = [
    "missing file", "not an image (.nii.gz)", "not an image (.nrrd)", "empty file", "truncated .nii.gz",
    "corrupt .nii.gz (bytes changed)", "truncated .nii", "truncated .nrrd", "truncated gzip .nrrd", "corrupt .nrrd header",
    "MetaImage data file name with printf codes", "MetaImage header with NDims -2",
    "2D image", "4D image", "multi-component image", "dimension of size 1", "dimension of size 0", "NaN voxels (NIfTI)",
    "Inf voxels (NRRD)", "constant image",
]


@pytest.fixture(scope="module")
def bad_images(tmp_path_factory) -> dict[str, tuple[Path, tuple[str, ...]]]:
    cases = make_bad_images(tmp_path_factory.mktemp("bad_images"))
    assert sorted(cases) == sorted(BAD_IMAGE_NAMES)
    return cases


# ---------------------------------------------------------------------------------------------- bad models


def make_bad_models(source: Path, folder: Path, marker: Path) -> dict[str, tuple[Path, tuple[str, ...]]]:
    """Broken copies of a good model folder, with the words their message must hold."""
    cases: dict[str, tuple[Path, tuple[str, ...]]] = {}

    def copy(name: str) -> Path:
        target = folder / name.replace(" ", "_")
        shutil.copytree(source, target)
        return target

    def edit_card(target: Path, change) -> None:
        card = json.loads((target / "model.json").read_text())
        change(card)
        (target / "model.json").write_text(json.dumps(card))

    target = copy("weights missing")
    (target / "model.safetensors").unlink()
    cases["weights missing"] = (target, ("weights are missing",))
    target = copy("card missing")
    (target / "model.json").unlink()
    cases["card missing"] = (target, ("no model.json",))
    target = copy("checksum mismatch")
    weights = bytearray((target / "model.safetensors").read_bytes())
    weights[len(weights) // 2] ^= 0xFF
    (target / "model.safetensors").write_bytes(bytes(weights))
    cases["checksum mismatch"] = (target, ("checksum mismatch",))

    def third_organ(card, channels):
        card["organs"].append({"name": "third", "label": 3})
        card["architecture"]["out_channels"] = channels

    target = copy("card organs vs architecture")
    edit_card(target, lambda card: third_organ(card, 2))
    cases["card organs vs architecture"] = (target, ("3 organs", "2 output channels"))
    target = copy("card organs vs weights")
    edit_card(target, lambda card: third_organ(card, 3))
    cases["card organs vs weights"] = (target, ("do not fit the architecture",))
    target = copy("architecture vs weights")
    edit_card(target, lambda card: card["architecture"].update(base_channels=16))
    cases["architecture vs weights"] = (target, ("do not fit the architecture",))
    target = copy("card from a newer version")
    edit_card(target, lambda card: card.update(format=99, software_version="9.0"))
    cases["card from a newer version"] = (target, ("newer", "update SDMOrganSeg"))

    # The worst case of a pickle: renamed to model.safetensors, with the card's checksum updated to match.
    target = copy("pickle renamed model.safetensors")
    (target / "model.safetensors").write_bytes(pickle.dumps(Evil(marker)))
    edit_card(target, lambda card: card.update(weights_sha256=hashlib.sha256((target / "model.safetensors").read_bytes()).hexdigest()))
    cases["pickle renamed model.safetensors"] = (target, ("pickled", "refused"))
    target = copy("pickled model.pt")
    (target / "model.safetensors").unlink()
    torch.save(Evil(marker), target / "model.pt")
    cases["pickled model.pt"] = (target, ("pickled", "refused"))
    return cases


BAD_MODEL_NAMES = [
    "weights missing", "card missing", "checksum mismatch", "card organs vs architecture", "card organs vs weights",
    "architecture vs weights", "card from a newer version", "pickle renamed model.safetensors", "pickled model.pt",
]


@pytest.fixture(scope="module")
def marker(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("marker") / "code-ran"


@pytest.fixture(scope="module")
def bad_models(tiny_model_dir, tmp_path_factory, marker) -> dict[str, tuple[Path, tuple[str, ...]]]:
    cases = make_bad_models(tiny_model_dir, tmp_path_factory.mktemp("bad_models"), marker)
    assert sorted(cases) == sorted(BAD_MODEL_NAMES)
    return cases


# ---------------------------------------------------------------------------------------------- bad training data


def _ball_labels(shape=(20, 20, 20)) -> np.ndarray:
    z, y, x = np.indices(shape)
    labels = np.zeros(shape, np.uint8)
    labels[(z - 7) ** 2 + (y - 10) ** 2 + (x - 10) ** 2 < 16] = 1
    labels[(z - 13) ** 2 + (y - 10) ** 2 + (x - 10) ** 2 < 12] = 2
    return labels


def make_training_folder(folder: Path, label_change=None, cases: int = 1, names: dict | None = None) -> Path:
    """imagesTr/ + labelsTr/ + labels.json of synthetic cases; ``label_change(image, labels) -> label image``
    breaks the first case."""
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "labels.json").write_text(json.dumps({"labels": names or {"1": "upper", "2": "lower"}}))
    for index in range(cases):
        labels = _ball_labels()
        image = sitk.GetImageFromArray((labels * 40 + np.random.default_rng(index).normal(0, 5, labels.shape)).astype(np.float32))
        label_image = sitk.GetImageFromArray(labels)
        if index == 0 and label_change is not None:
            label_image = label_change(image, labels)
        sitk.WriteImage(image, str(folder / "imagesTr" / f"case{index}.nii.gz"))
        sitk.WriteImage(label_image, str(folder / "labelsTr" / f"case{index}.nii.gz"))
    return folder


def _with(labels: np.ndarray, **geometry) -> sitk.Image:
    image = sitk.GetImageFromArray(labels)
    for key, value in geometry.items():
        getattr(image, f"Set{key}")(value)
    return image


BAD_TRAINING = {
    "label size differs": (lambda image, labels: _with(labels[:-1]), ("differ in size",)),
    "label spacing differs": (lambda image, labels: _with(labels, Spacing=(1.0, 1.0, 1.5)), ("differ in spacing",)),
    "label origin differs": (lambda image, labels: _with(labels, Origin=(5.0, 0.0, 0.0)), ("differ in origin",)),
    "label direction differs": (lambda image, labels: _with(labels, Direction=rotation()), ("differ in direction",)),
    "labels not whole numbers": (lambda image, labels: _with(labels.astype(np.float32) * 0.5), ("not whole numbers",)),
    "label value unknown to labels.json": (lambda image, labels: _with(np.where(labels == 2, 3, labels).astype(np.uint8)), ("[3]", "not among the organs")),
}


@pytest.fixture(scope="module")
def bad_training(tmp_path_factory) -> dict[str, tuple[Path, tuple[str, ...]]]:
    root = tmp_path_factory.mktemp("bad_training")
    return {name: (make_training_folder(root / name.replace(" ", "_"), change), words) for name, (change, words) in BAD_TRAINING.items()}


# ---------------------------------------------------------------------------------------------- all failing commands at once


@pytest.fixture(scope="module", autouse=True)
def _cli_batch(request, tmp_path_factory, bad_images, bad_models, bad_training, tiny_model_dir, marker):
    """Every failing command of this file, started in the background when the module's first test runs,
    so that their start-up overlaps with the in-process tests: a future of name -> finished process.
    Not started when no selected test needs it (``-k``)."""
    if not any("cli_errors" in item.fixturenames for item in request.session.items if item.module is request.module):
        yield None
        return
    root = tmp_path_factory.mktemp("cli_errors")
    good = _write(noise_volume(), root / "good.nii.gz")
    commands: dict[str, tuple[list, dict]] = {}
    for name, (path, _) in bad_images.items():
        commands[f"image: {name}"] = (["segment", path, "--model", tiny_model_dir, "--out", root / f"out-{len(commands)}"], {})
    for name, (path, _) in bad_models.items():
        commands[f"model: {name}"] = (["segment", good, "--model", path, "--out", root / f"out-{len(commands)}", "--quiet"], {})
    for name, (path, _) in bad_training.items():
        commands[f"training: {name}"] = (["train", path, "--out", root / f"run-{len(commands)}", "--epochs", "1", "--threads", "1"], {})
    # A pickle where the trainer resumes from: refused unread.
    evil_run = root / "evil-run"
    evil_run.mkdir()
    torch.save(Evil(marker), evil_run / "checkpoint.pt")
    commands["training: pickled checkpoint.pt"] = (["train", HIPPOCAMPUS, "--out", evil_run, "--epochs", "1", "--max-cases", "2", "--threads", "1"], {})
    # Outputs.
    squatted = root / "squatted"
    (squatted / "sdm_posterior.nii.gz").mkdir(parents=True)
    commands["output: folder squatting on an output name"] = (["segment", good, "--model", tiny_model_dir, "--out", squatted, "--overwrite", "--quiet"], {})
    file_as_folder = root / "file-as-folder"
    file_as_folder.mkdir()
    (file_as_folder / "contours").write_text("a file where the contours folder goes")
    commands["output: file squatting on the contours folder"] = (["segment", good, "--model", tiny_model_dir, "--out", file_as_folder, "--quiet"], {})
    commands["argument: not a number"] = (["segment", good, "--out", root / "out-argument", "--overlap", "x"], {})
    # Memory.
    commands["memory: budget too small even for tiles"] = (["segment", good, "--model", tiny_model_dir, "--out", root / "out-memory", "--quiet"], {inference.MEMORY_ENV: "0.000001"})
    commands["memory: budget not a number"] = (["segment", good, "--model", tiny_model_dir, "--out", root / "out-memory2", "--quiet"], {inference.MEMORY_ENV: "lots"})

    def run(item):
        name, (args, env) = item
        return name, run_cli(*args, env=env)

    def run_all():
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = dict(pool.map(run, commands.items()))
        results["_root"] = root  # type: ignore[assignment]
        return results

    with ThreadPoolExecutor(max_workers=1) as starter:
        yield starter.submit(run_all)


@pytest.fixture(scope="module")
def cli_errors(_cli_batch) -> dict[str, subprocess.CompletedProcess]:
    """The finished commands of ``_cli_batch``: name -> process."""
    return _cli_batch.result(timeout=900)


# ============================================================================================ 1. bad input images


@pytest.mark.parametrize("name", BAD_IMAGE_NAMES)
def test_bad_image_is_refused_by_the_api(bad_images, name):
    path, words = bad_images[name]
    assert_error(lambda: read_volume(path), *words)


IN_MEMORY = {
    "2D image": (lambda: noise_volume()[:, :, 3], "is 2D"),
    "4D image": (lambda: sitk.JoinSeries([noise_volume(), noise_volume()]), "is 4D"),
    "multi-component image": (lambda: sitk.Compose(noise_volume(), noise_volume()), "2 components"),
    "dimension of size 1": (lambda: noise_volume()[:, 2:3, :], "at least 2 voxels"),
    "NaN voxels": (lambda: sitk.GetImageFromArray(np.where(np.eye(20, 24)[:, :, None] > 0, np.nan, 1.0).repeat(22, 2).astype(np.float32)), "NaN"),
    "Inf voxels": (lambda: sitk.GetImageFromArray(np.where(np.eye(20, 24)[:, :, None] > 0, -np.inf, 1.0).repeat(22, 2)), "infinite"),
    "constant image": (lambda: sitk.GetImageFromArray(np.zeros((5, 6, 7), np.int16)), "constant"),
}


@pytest.mark.parametrize("name", sorted(IN_MEMORY))
def test_bad_image_is_refused_by_segment_image(tiny_model_dir, name):
    make, word = IN_MEMORY[name]
    model = load_model(tiny_model_dir)
    assert_error(lambda: segment_image(make(), model, "cpu"), word)


def test_oblique_image_keeps_its_geometry_and_contours_land_on_the_organ(tmp_path):
    """A rotated (non axis-aligned) image with anisotropic voxels, resampled to the model's 1 mm grid and back:
    the outputs have the input's exact geometry, and the level-0 contour, in LPS mm, lies on the organ surface."""
    import vtk
    from vtk.util import numpy_support

    radius = 9.0
    image = noise_volume((30, 36, 40), spacing=(0.8, 1.0, 1.25))
    image.SetDirection(rotation())
    image.SetOrigin((12.5, -40.0, 7.0))
    result = segment_image(image, loaded(BallNet(radius), {1: "ball"}, tmp_path), "cpu")

    for output in [result.labels, *result.sdms.values()]:
        assert output.GetSize() == image.GetSize()
        assert output.GetSpacing() == image.GetSpacing()
        assert output.GetOrigin() == image.GetOrigin()
        assert output.GetDirection() == image.GetDirection()
    # The ball's centre, in LPS mm: the centre of the model's 1 mm grid over the same extent.
    grid = np.maximum(np.round(np.asarray(image.GetSize()) * np.asarray(image.GetSpacing())), 1)
    centre = np.asarray(image.GetOrigin()) + np.asarray(image.GetDirection()).reshape(3, 3) @ ((grid - 1) / 2)
    labelled_ml = float(sitk.GetArrayViewFromImage(result.labels).sum()) * np.prod(image.GetSpacing())
    assert labelled_ml == pytest.approx(4 / 3 * math.pi * radius**3, rel=0.08)

    files = {}
    for fmt in ("nrrd", "nifti"):
        files[fmt] = write_result(result, tmp_path / fmt, fmt=fmt, levels=(0.0,))
        for name in ("labels", "sdm_ball"):
            back = sitk.ReadImage(str(files[fmt][f"{name}{'.nrrd' if fmt == 'nrrd' else '.nii.gz'}"]))
            tolerance = 1e-12 if fmt == "nrrd" else 1e-6  # NRRD: printed decimals; NIfTI: float32
            assert np.allclose(back.GetDirection(), image.GetDirection(), atol=tolerance, rtol=0)
            assert np.allclose(back.GetOrigin(), image.GetOrigin(), atol=tolerance * 100, rtol=0)
            assert np.allclose(back.GetSpacing(), image.GetSpacing(), atol=tolerance, rtol=0)
    reader = vtk.vtkXMLPolyDataReader()
    reader.SetFileName(str(files["nrrd"]["contours/ball_0.vtp"]))
    reader.Update()
    points = numpy_support.vtk_to_numpy(reader.GetOutput().GetPoints().GetData())
    distances = np.linalg.norm(points - centre, axis=1)
    assert len(points) > 100
    assert np.abs(distances - radius).max() < 1.0, (distances.min(), distances.max())
    # ... and between voxels of different labels: each point's nearest voxel centres include both classes.
    labels = sitk.GetArrayFromImage(result.labels)
    index = np.array([result.labels.TransformPhysicalPointToContinuousIndex(p.tolist()) for p in points[::7]])
    for i, j, k in index:
        cell = labels[int(k) : int(k) + 2, int(j) : int(j) + 2, int(i) : int(i) + 2]
        assert cell.min() == 0 and cell.max() == 1


def test_oblique_image_through_the_command_and_no_overwrite_without_flag(tiny_model_dir, tmp_path):
    image = noise_volume((20, 24, 22), spacing=(0.9, 1.1, 1.3))
    image.SetDirection(rotation((0.0, 35.0, -15.0)))
    image.SetOrigin((-3.0, 4.5, 100.0))
    source = _write(image, tmp_path / "oblique.nrrd")
    out = tmp_path / "out"
    first = run_cli("segment", source, "--model", tiny_model_dir, "--out", out, "--format", "nrrd", "--quiet")
    assert first.returncode == 0, first.stderr
    for name in ("labels.nrrd", "sdm_anterior.nrrd", "sdm_posterior.nrrd"):
        back = sitk.ReadImage(str(out / name))
        assert back.GetSize() == image.GetSize()
        for what in ("Spacing", "Origin", "Direction"):  # as written in the input file, to the last printed digit
            assert np.allclose(getattr(back, f"Get{what}")(), getattr(image, f"Get{what}")(), rtol=0, atol=1e-12), what
    before = digest_tree(out)
    second = run_cli("segment", source, "--model", tiny_model_dir, "--out", out, "--format", "nrrd", "--quiet")
    assert_one_line_error(second, "already exists", "--overwrite")
    assert digest_tree(out) == before


# ============================================================================================ 2. memory


def _memory_case(tmp_path):
    model = loaded(OutOfMemoryNet(limit=10**6), {1: "a", 2: "b"}, tmp_path)  # the cpu preset's size, computed in no time
    image = noise_volume((40, 40, 40))
    config = model.network.config
    whole = estimate_memory_bytes(image.GetSize(), (40, 40, 40), 2, config.base_channels, None, 2**config.depth)
    tiled = estimate_memory_bytes(image.GetSize(), (40, 40, 40), 2, config.base_channels, (32, 32, 32), 2**config.depth)
    assert tiled < whole
    return model, image, whole, tiled


def test_volume_over_the_memory_budget_is_processed_in_tiles(tmp_path):
    model, image, whole, tiled = _memory_case(tmp_path)
    messages = []
    result = segment_image(image, model, "cpu", progress=lambda f, m: messages.append(m), memory_gb=(whole + tiled) / 2 / 1e9)
    assert any("tiles" in note and "memory budget" in note for note in result.notes), result.notes
    assert any("tile 8 of 8" in m for m in messages), messages
    assert result.labels.GetSize() == image.GetSize() and result.labels.GetDirection() == image.GetDirection()


def test_volume_over_the_budget_even_in_tiles_is_refused_with_the_size_needed(tmp_path, monkeypatch):
    model, image, whole, tiled = _memory_case(tmp_path)
    message = assert_error(lambda: segment_image(image, model, "cpu", memory_gb=tiled / 2 / 1e9), "memory budget", "GB")
    assert f"{tiled / 1e9:.3g} GB" in message
    monkeypatch.setenv(inference.MEMORY_ENV, str(tiled / 2 / 1e9))  # the environment variable, as the command uses it
    assert_error(lambda: segment_image(image, model, "cpu"), f"{tiled / 1e9:.3g} GB")


def test_out_of_memory_retries_with_a_smaller_window(tmp_path):
    network = OutOfMemoryNet(limit=32)
    image = noise_volume((48, 48, 48))
    result = segment_image(image, loaded(network, {1: "a", 2: "b"}, tmp_path), "cpu")
    assert result.notes and "out of memory: retrying with a 32x32x32 window" in result.notes[0]
    assert network.calls[0][1] == (48, 48, 48) and all(max(shape) <= 32 for _, shape in network.calls[1:])
    assert result.labels.GetSize() == image.GetSize()
    assert set(result.sdms) == {"a", "b"}


def test_out_of_memory_on_the_gpu_falls_back_to_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(inference, "resolve_device", lambda device: torch.device("meta"))  # the GPU stand-in
    network = OutOfMemoryNet(limit=10_000)
    image = noise_volume((48, 40, 36))
    result = segment_image(image, loaded(network, {1: "a", 2: "b"}, tmp_path), "cuda")
    assert any("retrying with a" in note for note in result.notes), result.notes
    assert "continuing on the CPU" in result.notes[-1]
    assert network.calls[-1] == ("cpu", (48, 40, 36))  # the CPU got the whole volume again
    assert result.device.startswith("cpu") and result.labels.GetSize() == image.GetSize()


def test_out_of_memory_on_the_cpu_with_the_smallest_window_is_refused(tmp_path):
    network = OutOfMemoryNet(limit=0)
    assert_error(lambda: segment_image(noise_volume((40, 40, 40)), loaded(network, {1: "a", 2: "b"}, tmp_path), "cpu"), "out of memory on the CPU")
    assert len(network.calls) < 10  # retried a few times, no endless loop


# ============================================================================================ 3. bad models


@pytest.mark.parametrize("name", BAD_MODEL_NAMES)
def test_bad_model_is_refused_by_load_model(bad_models, marker, name):
    path, words = bad_models[name]
    assert_error(lambda: load_model(path), *words)
    assert not marker.exists(), "a pickle ran code"


# ============================================================================================ 4. bad training data


@pytest.mark.parametrize("name", sorted(BAD_TRAINING))
def test_bad_training_case_is_refused_by_the_dataset(bad_training, name):
    folder, words = bad_training[name]
    case = dataset.find_cases(folder)[0]
    assert_error(lambda: dataset.prepare_case(case, [1, 2], {"method": "percentile", "lower": 0.5, "upper": 99.5}), case.name, *words)


def test_case_with_an_organ_missing_trains(tmp_path):
    from SDMOrganSegLib.engines.training import Trainer, TrainingConfig

    def drop_lower(image, labels):
        return _with(np.where(labels == 2, 0, labels).astype(np.uint8))

    folder = make_training_folder(tmp_path / "data", drop_lower, cases=3)
    prepared = dataset.prepare_case(dataset.find_cases(folder)[0], [1, 2], {"method": "percentile", "lower": 0.5, "upper": 99.5})
    assert np.all(prepared.sdms[1] == 1.0) and np.isfinite(prepared.sdms).all()
    threads = torch.get_num_threads()
    try:
        best = Trainer(
            TrainingConfig(data_dir=str(folder), out_dir=str(tmp_path / "run"), epochs=1, batch_size=2, patch_size=(16, 16, 16),
                           validate_every=1, device="cpu", threads=1, split_file=None),
            progress=lambda text: None,
        ).run()
    finally:
        torch.set_num_threads(threads)
    assert load_model(best).card.organ_names == ["upper", "lower"]


# ============================================================================================ 5. nothing lost


@pytest.fixture(scope="module")
def small_result(tiny_model_dir):
    return segment_image(noise_volume(), load_model(tiny_model_dir), "cpu")


def test_existing_outputs_are_not_replaced_without_overwrite(small_result, tmp_path):
    write_result(small_result, tmp_path)
    before = digest_tree(tmp_path)
    assert_error(lambda: write_result(small_result, tmp_path), "already exists", "--overwrite")
    assert digest_tree(tmp_path) == before
    write_result(small_result, tmp_path, overwrite=True)  # allowed with the flag


def test_cancel_mid_segmentation_writes_nothing(tiny_model_dir, tmp_path):
    stop = threading.Event()
    seen = []

    def progress(fraction, message):
        seen.append(message)
        if "tile 2 of" in message:
            stop.set()

    with pytest.raises(CancelledError):
        segment_image(noise_volume((40, 40, 40)), load_model(tiny_model_dir), "cpu", window=(32, 32, 32), progress=progress, cancel=stop)
    assert not any("tile 3 of" in m for m in seen)
    assert list(tmp_path.iterdir()) == []


def test_cancel_mid_write_leaves_no_partial_files(small_result, tmp_path):
    calls = []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) >= 4  # after the label map and a few more files are written

    out = tmp_path / "out"
    with pytest.raises(CancelledError):
        write_result(small_result, out, cancel=cancel)
    assert not out.exists() or list(out.rglob("*")) == []
    # Over an earlier complete run: that one is kept as it was.
    write_result(small_result, out)
    before = digest_tree(out)
    calls.clear()
    with pytest.raises(CancelledError):
        write_result(small_result, out, overwrite=True, cancel=cancel)
    assert digest_tree(out) == before


def test_folder_squatting_on_an_output_name_is_refused_before_writing(small_result, tmp_path):
    (tmp_path / "sdm_posterior.nii.gz").mkdir()
    assert_error(lambda: write_result(small_result, tmp_path, overwrite=True), "is a folder")
    assert digest_tree(tmp_path) == {"sdm_posterior.nii.gz": "<dir>"}
    (tmp_path / "sdm_posterior.nii.gz").rmdir()
    (tmp_path / "contours").write_text("a file where the contours folder goes")
    assert_error(lambda: write_result(small_result, tmp_path), "is a file where an output folder must go")
    assert digest_tree(tmp_path) == {"contours": hashlib.sha256(b"a file where the contours folder goes").hexdigest()}


def test_write_failing_midway_puts_the_earlier_outputs_back(small_result, tmp_path):
    """A folder appears on a target name while files are being written (another program): the move into
    place fails midway, the files it had replaced are put back and the new ones removed."""
    write_result(small_result, tmp_path)
    before = digest_tree(tmp_path)
    squatter = tmp_path / "contours" / "posterior_0.5.vtp"
    calls = []

    def squat() -> bool:
        calls.append(1)
        if len(calls) == 3:
            squatter.mkdir()
        return False

    assert_error(lambda: write_result(small_result, tmp_path, levels=(0.0, 0.5), overwrite=True, cancel=squat), "is a folder")
    after = digest_tree(tmp_path)
    assert after.pop("contours/posterior_0.5.vtp") == "<dir>"
    assert after == before
    assert not list(tmp_path.glob(".sdmorganseg-*"))


def test_writer_error_midway_leaves_no_partial_files(small_result, tmp_path, monkeypatch):
    real = sitk.WriteImage
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("Exception thrown in SimpleITK WriteImage: ...\nNo space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(sitk, "WriteImage", failing)  # the module object imagewriting writes through
    assert_error(lambda: write_result(small_result, tmp_path / "out"), "cannot write", "No space left on device")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").rglob("*")) == []


def test_trainer_killed_after_a_checkpoint_resumes_to_the_same_result(tmp_path):
    """``sdmorganseg train`` is SIGKILLed once its epoch-2 checkpoint exists and rerun: it resumes from the
    checkpoint and ends with the same weights and losses as an uninterrupted run with the same seed."""
    from SDMOrganSegLib.engines.training import Trainer, TrainingConfig

    settings_ = dict(max_cases=3, epochs=4, threads=1, seed=3, patch=(16, 24, 16))
    common = ["train", HIPPOCAMPUS, "--max-cases", "3", "--epochs", "4", "--threads", "1", "--seed", "3", "--patch", "16,24,16"]
    killed = tmp_path / "killed"
    victim = subprocess.Popen(_command() + [str(a) for a in common] + ["--out", str(killed)], env=_environment(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: victim.stderr.read(1), "")), daemon=True)
    reader.start()

    # Meanwhile, the uninterrupted reference run, in this process (same code, same thread count).
    threads = torch.get_num_threads()
    try:
        Trainer(TrainingConfig(
            data_dir=str(HIPPOCAMPUS), out_dir=str(tmp_path / "reference"), epochs=settings_["epochs"], seed=settings_["seed"],
            patch_size=settings_["patch"], max_cases=settings_["max_cases"], threads=settings_["threads"], device="auto",
            model_name=HIPPOCAMPUS.name,
        ), progress=lambda text: None).run()
    finally:
        torch.set_num_threads(threads)

    deadline = time.time() + 240
    while "epoch 2: loss" not in "".join(seen) and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)  # the trainer prints "epoch 2: ..." after writing that epoch's checkpoint
    victim.wait()
    reader.join(timeout=10)
    assert "epoch 2: loss" in "".join(seen), "".join(seen)[-2000:]
    saved = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert 2 <= saved["epoch"] < 4 and not (killed / "last").exists()

    resumed = run_cli(*common, "--out", killed)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming after epoch {saved['epoch']}" in resumed.stderr
    assert not list(killed.glob(".checkpoint.pt.*"))

    final = {name: torch.load(tmp_path / name / "checkpoint.pt", weights_only=True) for name in ("killed", "reference")}
    assert final["killed"]["epoch"] == final["reference"]["epoch"] == 4
    for key, value in final["reference"]["network"].items():
        assert torch.allclose(final["killed"]["network"][key], value, rtol=0, atol=1e-6), key
    logs = {name: json.loads(state["log"]) for name, state in final.items()}
    for row_killed, row_reference in zip(logs["killed"], logs["reference"], strict=True):
        for key, value in row_reference.items():
            if key.startswith(("loss", "val_")) or key in ("epoch", "lr"):
                assert row_killed[key] == pytest.approx(value, abs=1e-6), (row_reference["epoch"], key)
    assert load_model(killed / "last").card.training["epochs_trained"] == 4


# ============================================================================================ 6. paths stay inside


def test_organ_names_from_a_card_never_write_outside_the_output_folder(tmp_path):
    names = {1: "../../evil", 2: "/tmp/evil-absolute", 3: ".."}
    network = UNet3D(preset("cpu", 1, 3))
    card = ModelCard(name="hostile", architecture=network.config, organs=organs_from_labels(names), spacing=(1.0, 1.0, 1.0))
    save_model(network, card, tmp_path / "model")
    model = load_model(tmp_path / "model")
    assert model.card.organ_names == [names[1], names[2], names[3]]
    out = tmp_path / "deep" / "er" / "out"
    written = write_result(segment_image(noise_volume(), model, "cpu"), out, levels=(0.0,))
    for path in written.values():
        assert out.resolve() in path.resolve().parents
    expected_elsewhere = {tmp_path / "deep", tmp_path / "deep" / "er", tmp_path / "model", *(tmp_path / "model").iterdir()}
    outside = [p for p in tmp_path.rglob("*") if p not in expected_elsewhere and out not in (p, *p.parents)]
    assert outside == []
    assert not Path("/tmp/evil-absolute").exists() and not Path("/tmp/evil-absolute.nii.gz").exists()
    with pytest.raises(SDMOrganSegError, match="outside the output folder"):
        inside(out, "../escape.txt")


def test_case_names_never_write_outside_the_cache_folder(tmp_path):
    folder = make_training_folder(tmp_path / "data", cases=1)
    image, label = folder / "imagesTr" / "case0.nii.gz", folder / "labelsTr" / "case0.nii.gz"
    hostile = [dataset.CasePaths(name, image, label) for name in ("../../evil", "/tmp/evil-case", "..", "x$(touch pwned) ;")]
    for name in ("a b;c$(d)", "weird..name"):  # real file names too
        shutil.copy(image, folder / "imagesTr" / f"{name}.nii.gz")
        shutil.copy(label, folder / "labelsTr" / f"{name}.nii.gz")
    cases = hostile + [c for c in dataset.find_cases(folder) if c.name != "case0"]
    cache = tmp_path / "run" / "cache"
    prepared = dataset.load_cases(cases, [1, 2], {"method": "percentile", "lower": 0.5, "upper": 99.5}, None, cache)
    assert len(prepared) == 6
    created = [p for p in tmp_path.rglob("*") if "data" not in p.relative_to(tmp_path).parts[:1]]
    assert all(p == tmp_path / "run" or p == cache or p.parent == cache for p in created), created
    assert len(list(cache.iterdir())) == 6 and not Path("/tmp/evil-case").exists()


# ============================================================================================ 7. SDM properties


masks = hnp.arrays(bool, hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=9))
spacings = st.tuples(*[st.floats(0.2, 5.0, allow_nan=False)] * 3)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mask=masks, spacing=spacings)
def test_sdm_properties(mask, spacing):
    """Sign matches the mask (negative inside), values in [-1, 1], finite, and the Heaviside gives the mask back."""
    sdm = normalized_sdm(mask, spacing)
    assert sdm.shape == mask.shape and sdm.dtype == np.float32
    assert np.isfinite(sdm).all()
    assert sdm.min() >= -1.0 and sdm.max() <= 1.0
    assert np.array_equal(sdm < 0, mask) and np.array_equal(sdm > 0, ~mask)
    assert np.array_equal(heaviside(sdm) > 0.5, mask)
    if mask.any() and not mask.all():  # each side normalised by its own largest distance
        assert sdm.min() == pytest.approx(-1.0, abs=1e-6) and sdm.max() == pytest.approx(1.0, abs=1e-6)


# ============================================================================================ 8. the command line
# The same bad inputs through `sdmorganseg` (started in the background by _cli_batch).


@pytest.mark.parametrize("name", BAD_IMAGE_NAMES)
def test_bad_image_is_refused_by_the_command(cli_errors, bad_images, name):
    result = cli_errors[f"image: {name}"]
    assert_one_line_error(result, *bad_images[name][1])
    assert not any(cli_errors["_root"].glob("out-*/*")), "a refused run wrote something"




def test_memory_budget_errors_through_the_command(cli_errors):
    assert_one_line_error(cli_errors["memory: budget too small even for tiles"], "GB", "memory budget")
    assert_one_line_error(cli_errors["memory: budget not a number"], inference.MEMORY_ENV, "not a number")


@pytest.mark.parametrize("name", BAD_MODEL_NAMES)
def test_bad_model_is_refused_by_the_command(cli_errors, bad_models, marker, name):
    assert_one_line_error(cli_errors[f"model: {name}"], *bad_models[name][1])
    assert not marker.exists(), "a pickle ran code"


@pytest.mark.parametrize("name", sorted(BAD_TRAINING))
def test_bad_training_case_is_refused_by_the_trainer_command(cli_errors, name):
    assert_one_line_error(cli_errors[f"training: {name}"], *BAD_TRAINING[name][1])


def test_pickled_checkpoint_is_refused_unread_by_the_trainer(cli_errors, marker):
    assert_one_line_error(cli_errors["training: pickled checkpoint.pt"], "cannot resume", "delete it")
    assert not marker.exists(), "a pickle ran code"


def test_squatters_on_output_names_are_refused_by_the_command(cli_errors):
    assert_one_line_error(cli_errors["output: folder squatting on an output name"], "is a folder")
    assert_one_line_error(cli_errors["output: file squatting on the contours folder"], "is a file where an output folder must go")
    assert digest_tree(cli_errors["_root"] / "squatted") == {"sdm_posterior.nii.gz": "<dir>"}


def test_argument_errors_are_one_line(cli_errors):
    assert_one_line_error(cli_errors["argument: not a number"], "--overlap", "invalid float value", "--help")
