"""Shared fixtures: paths to the real test data and a small random-weight model."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

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
    "test_batch.py", "test_network_losses.py", "test_performance_paths.py", "test_reliability.py",
    "test_shipped_model.py", "test_training.py",
]
collect_ignore = [] if HAVE_TORCH else TORCH_MODULES


def pytest_report_header(config) -> str:
    if HAVE_TORCH:
        return "PyTorch: installed"
    return f"PyTorch: not installed; not collected: {', '.join(TORCH_MODULES)}; tests that build models skip"


def needs_torch() -> None:
    """Skip the calling test or fixture where PyTorch is not installed."""
    pytest.importorskip("torch", reason="PyTorch is not installed")


def hippocampus_cases() -> list[str]:
    return sorted(p.name[: -len(".nii.gz")] for p in (HIPPOCAMPUS / "imagesTr").glob("*.nii.gz"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A cpu-preset model with random weights for the two hippocampus labels (1 mm spacing)."""
    needs_torch()
    import torch

    from SDMOrganSegLib.modelfiles import ModelCard, organs_from_labels, save_model
    from SDMOrganSegLib.network import UNet3D, preset

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

    from SDMOrganSegLib import modelfiles, network
    from SDMOrganSegLib.inference import segment_image
    from SDMOrganSegLib.modelfiles import ModelCard

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
