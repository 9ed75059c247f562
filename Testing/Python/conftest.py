"""Shared fixtures: paths to the real test data and a small random-weight model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "Testing" / "Data"
HIPPOCAMPUS = DATA / "hippocampus"
CT = DATA / "ct-abdomen"

# Tests run against the source tree even without `pip install -e .`.
sys.path.insert(0, str(REPO / "SDMOrganSeg"))


def hippocampus_cases() -> list[str]:
    return sorted(p.name[: -len(".nii.gz")] for p in (HIPPOCAMPUS / "imagesTr").glob("*.nii.gz"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A cpu-preset model with random weights for the two hippocampus labels (1 mm spacing)."""
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
