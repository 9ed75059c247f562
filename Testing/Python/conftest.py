"""Shared fixtures: paths to the real test data and a small random-weight model."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "Testing" / "Data"
HIPPOCAMPUS = DATA / "hippocampus"
CT = DATA / "ct-abdomen"

# Tests run against the source tree even without `pip install -e .`.
sys.path.insert(0, str(REPO / "SDMOrganSeg"))

#: Whether PyTorch is installed. CI also runs the suite under Python 3.9 and 3.12 (the Pythons of Slicer 5.6/5.8
#: and 5.10) without it: then the modules below, which need it throughout, are not collected, and the tests
#: elsewhere that need it skip through the fixtures that build models (``tiny_model_dir``, ...). Any other
#: module that imports PyTorch at the top fails to collect there, so CI notices.
HAVE_TORCH = importlib.util.find_spec("torch") is not None
TORCH_MODULES = [
    "test_batch.py", "test_distributed_batch.py", "test_distributed_training.py", "test_network_losses.py",
    "test_performance_paths.py", "test_postprocessing.py", "test_reliability.py", "test_shipped_model.py", "test_training.py",
]
collect_ignore = [] if HAVE_TORCH else TORCH_MODULES


def pytest_report_header(config) -> str:
    if HAVE_TORCH:
        return "PyTorch: installed"
    return f"PyTorch: not installed; not collected: {', '.join(TORCH_MODULES)}; tests that build models skip"


def needs_torch() -> None:
    """Skip the calling test or fixture where PyTorch is not installed."""
    pytest.importorskip("torch", reason="PyTorch is not installed")


def float32_tolerance(network, magnitude: float = 1.0) -> float:
    """How far two float32 runs of ``network`` that sum in different orders (oneDNN or PyTorch's own kernel,
    AVX-512 or AVX2 blocking, a mirrored input) may differ, from float32 arithmetic rather than one machine.

    A sum of K products rounded in float32, in any order, lies within K * eps/2 * sum|terms| of the exact sum
    (Higham, *Accuracy and Stability of Numerical Algorithms*, 3.1), so two orders differ by at most
    K * eps * sum|terms|. K is the longest sum in the network (input channels x kernel voxels of its widest
    convolution: 3456 for the cpu preset, a bound of 4.1e-4 for outputs of size 1); group norm brings every
    layer's activations back to size 1, so ``magnitude`` (the size of the outputs compared) scales it.
    Measured differences are 1e-6 to 1.04e-5; a wrong kernel or layout differs by 1e-2 and more.
    """
    import numpy as np
    import torch

    longest = max(
        m.in_channels // m.groups * int(np.prod(m.kernel_size)) for m in network.modules() if isinstance(m, torch.nn.Conv3d)
    )
    return longest * float(np.finfo(np.float32).eps) * max(1.0, float(magnitude))


def hippocampus_cases() -> list[str]:
    return sorted(p.name[: -len(".nii.gz")] for p in (HIPPOCAMPUS / "imagesTr").glob("*.nii.gz"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A cpu-preset model with random weights for the two hippocampus labels (1 mm spacing)."""
    needs_torch()
    import torch

    from SDMOrganSegLib.formats.modelfiles import ModelCard, organs_from_labels, save_model
    from SDMOrganSegLib.method.network import UNet3D, preset

    torch.manual_seed(0)
    network = UNet3D(preset("cpu", 1, 2))
    card = ModelCard(
        name="tiny-random", architecture=network.config, organs=organs_from_labels({1: "anterior", 2: "posterior"}), spacing=(1.0, 1.0, 1.0)
    )
    folder = tmp_path_factory.mktemp("tiny_model")
    save_model(network, card, folder)
    return folder


def calibrated_model(folder: Path, name: str, organs: list, image_path: Path, fractions: list[float]) -> Path:
    """A random-weight cpu-preset model whose organ c covers about ``fractions[c]`` of the image."""
    import math

    import numpy as np
    import SimpleITK as sitk
    import torch

    from SDMOrganSegLib.formats import modelfiles
    from SDMOrganSegLib.method import network
    from SDMOrganSegLib.engines.inference import segment_image
    from SDMOrganSegLib.formats.modelfiles import ModelCard

    torch.manual_seed(0)
    net = network.UNet3D(network.preset("cpu", 1, len(organs)))
    card = ModelCard(name=name, architecture=net.config, organs=organs)
    loaded = modelfiles.LoadedModel(card=card, network=net.eval(), directory=folder)
    result = segment_image(sitk.ReadImage(str(image_path)), loaded, "cpu")
    with torch.no_grad():
        for channel, (organ, fraction) in enumerate(zip(organs, fractions)):
            # tanh is monotonic: shifting the pre-activation by atanh(quantile) moves that quantile to 0.
            value = float(np.quantile(sitk.GetArrayViewFromImage(result.sdms[organ.name]), fraction))
            net.head.bias[channel] -= math.atanh(min(max(value, -0.999), 0.999))
    modelfiles.save_model(net, card, folder, overwrite=True)
    return folder


def write_dicom_series(image_path: Path, folder: Path, modality: str = "MR") -> list[Path]:
    """A DICOM series made from a NIfTI fixture with pydicom (one file per slice, whole-number voxels), so
    that the repository holds no DICOM files: same size, spacing, origin and direction."""
    import numpy as np
    import pydicom
    import SimpleITK as sitk
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

    image = sitk.ReadImage(str(image_path))
    voxels = np.rint(sitk.GetArrayFromImage(image)).astype(np.int16)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for index in range(voxels.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.FileDataset(None, Dataset(), file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality = modality
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Fixture", image_path.name.split(".")[0], "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "20260101", "120000", "1", "", ""
        ds.SeriesNumber, ds.InstanceNumber, ds.PositionReferenceIndicator = 1, index + 1, ""
        ds.ImagePositionPatient = [float(v) for v in image.TransformIndexToPhysicalPoint((0, 0, index))]
        ds.ImageOrientationPatient = [float(v) for v in (*direction[:, 0], *direction[:, 1])]
        ds.PixelSpacing = [float(image.GetSpacing()[1]), float(image.GetSpacing()[0])]
        ds.SliceThickness = float(image.GetSpacing()[2])
        ds.Rows, ds.Columns = voxels.shape[1], voxels.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = voxels[index].tobytes()
        path = folder / f"slice_{index:03d}.dcm"
        ds.save_as(str(path), enforce_file_format=True)
        files.append(path)
    return files


def torchrun(processes: int) -> list[str]:
    """``torchrun --standalone --nproc-per-node=N`` of this Python (a free port each time, one machine); the
    launcher alone without the last two items."""
    launcher = Path(sys.executable).with_name("torchrun")
    prefix = [str(launcher)] if launcher.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    return prefix + ["--standalone", f"--nproc-per-node={processes}"]


def sdmorganseg_command(launched_by_torchrun: bool = False) -> list[str]:
    """The ``sdmorganseg`` command of this Python: its console script (``--no-python`` under torchrun, as the
    README writes it), else the module (without ``pip install -e .``)."""
    script = Path(sys.executable).with_name("sdmorganseg")
    if script.is_file():
        return (["--no-python"] if launched_by_torchrun else []) + [str(script)]
    return ["-m", "SDMOrganSegLib.cli"] if launched_by_torchrun else [sys.executable, "-m", "SDMOrganSegLib.cli"]


def single_threaded_environment() -> dict[str, str]:
    """The environment for child processes: one thread each (the tests share the machine), the library importable."""
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO / "SDMOrganSeg"), os.environ.get("PYTHONPATH", "")])}


def assert_corrupted_copy_refused(model_dir: Path, tmp_path: Path) -> None:
    """A copy of a shipped model with 8 bytes of its weights zeroed is refused by its checksum."""
    import shutil

    from SDMOrganSegLib.common.errors import SDMOrganSegError
    from SDMOrganSegLib.formats.modelfiles import WEIGHTS_FILE, load_model

    copy = tmp_path / model_dir.name
    shutil.copytree(model_dir, copy)
    with open(copy / WEIGHTS_FILE, "r+b") as handle:
        handle.seek(-100, 2)
        handle.write(b"\0" * 8)
    with pytest.raises(SDMOrganSegError, match="checksum mismatch"):
        load_model(copy)


def assert_sdm_is_a_distance(sdm, organ_mask, spacing, scale_mm: float) -> float:
    """A model's SDM output for one organ describes the segmentation it is shown beside, as a distance.

    ``sdm`` and ``organ_mask`` are ``(z, y, x)`` arrays on one grid, ``spacing`` is ``(x, y, z)`` mm. Within the
    range where the card's normalisation is not clipped (a voxel to ``scale_mm`` - 1 voxel from the surface),
    voxels at least one voxel inside the mask must be negative and those at least one voxel outside positive
    (95 % each: the SDM head's zero level may cross the segmentation head's surface by a voxel here and
    there), and the SDM must increase with the signed distance from the mask's surface (Spearman rank
    correlation >= 0.9). Measured 2026-12-04: the shipped hippocampus models 0.93-0.98 on hippocampus_003;
    the logits of the Dice-only head-and-neck preview 0.39-0.86 on hn_235, so the bound tells them apart.
    Returns the correlation."""
    from scipy.stats import spearmanr

    from SDMOrganSegLib.method.sdm import signed_distance_mm

    distance = signed_distance_mm(organ_mask, spacing)
    voxel = max(spacing)
    band = np.abs(distance) <= scale_mm - voxel
    inside, outside = band & (distance <= -voxel), band & (distance >= voxel)
    assert inside.sum() > 10 and outside.sum() > 10, "too few voxels near the surface to judge"
    assert np.mean(sdm[inside] < 0) >= 0.95, f"only {np.mean(sdm[inside] < 0):.2f} of the voxels inside are negative"
    assert np.mean(sdm[outside] > 0) >= 0.95, f"only {np.mean(sdm[outside] > 0):.2f} of the voxels outside are positive"
    correlation = float(spearmanr(sdm[band], distance[band]).statistic)
    assert correlation >= 0.9, f"rank correlation with the distance {correlation:.3f}"
    return correlation
