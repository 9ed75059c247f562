"""Model folders: round trip, checksum and card checks (the card checks need no PyTorch)."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import REPO

from SDMOrganSegLib.common.errors import SDMOrganSegError
from SDMOrganSegLib.formats.modelfiles import CARD_FILE, DEFAULT_MODEL, WEIGHTS_FILE, load_model, read_card, resolve_model, save_model, shipped_models

SHIPPED = REPO / "Resources" / "Models" / DEFAULT_MODEL


def test_round_trip_gives_identical_weights(tiny_model_dir):
    import torch

    model = load_model(tiny_model_dir)
    assert model.card.organ_names == ["anterior", "posterior"]
    assert model.card.label_values == [1, 2]
    assert len(model.card.weights_sha256) == 64
    again = load_model(tiny_model_dir)
    for (name, a), (_, b) in zip(model.network.state_dict().items(), again.network.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    """A copy of the tiny model to damage, and its card as a dict."""
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    return copy, json.loads((copy / CARD_FILE).read_text())


def test_corrupted_weights_are_refused(model_copy):
    copy, _ = model_copy
    data = bytearray((copy / WEIGHTS_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(SDMOrganSegError, match="checksum mismatch"):
        load_model(copy)


def test_card_that_disagrees_with_weights_is_refused(model_copy):
    copy, card = model_copy
    card["architecture"]["base_channels"] = 16
    (copy / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(SDMOrganSegError, match="do not fit the architecture"):
        load_model(copy)


@pytest.fixture
def card_copy(tmp_path):
    """The shipped model's card alone, in a folder of its own, and as a dict (no PyTorch needed)."""
    if not (SHIPPED / CARD_FILE).is_file():
        pytest.skip("no shipped model")
    copy = tmp_path / "card"
    copy.mkdir()
    shutil.copy(SHIPPED / CARD_FILE, copy / CARD_FILE)
    return copy, json.loads((copy / CARD_FILE).read_text())


def test_shipped_card_reads_without_pytorch(card_copy):
    copy, values = card_copy
    card = read_card(copy)
    assert card.organ_names == [organ["name"] for organ in values["organs"]]
    assert card.architecture.out_channels == len(card.organs)


def test_card_listing_more_organs_than_channels_is_refused(card_copy):
    copy, card = card_copy
    card["organs"].append({"name": "third", "label": 3})
    (copy / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(SDMOrganSegError, match="2 output channels"):
        read_card(copy)


def test_newer_card_format_is_refused(card_copy):
    copy, card = card_copy
    card["format"] = 99
    (copy / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(SDMOrganSegError, match="update SDMOrganSeg"):
        read_card(copy)


def test_unknown_model_name_lists_shipped_models():
    with pytest.raises(SDMOrganSegError, match="neither a folder nor a shipped model"):
        resolve_model("no-such-model")


def test_training_run_folder_names_the_model_folders_in_it(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "best")
    shutil.copytree(tiny_model_dir, run / "last")
    (run / "checkpoint.pt").write_bytes(b"\x80\x04pickled resume state")
    for read in (load_model, read_card):
        with pytest.raises(SDMOrganSegError, match=r"training run folder.*use .*best") as error:
            read(run)
        assert "pickle" not in str(error.value)
    assert load_model(run / "best").card.name == "tiny-random"


def test_saved_model_files_get_ordinary_permissions(tiny_model_dir, tmp_path):
    import os

    umask = os.umask(0o022)
    os.umask(umask)
    folder = tmp_path / "saved"
    model = load_model(tiny_model_dir)
    save_model(model.network, model.card, folder)
    for name in (WEIGHTS_FILE, CARD_FILE):
        assert (folder / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_model_folder_named_like_a_shipped_model_is_not_shadowed_silently(tiny_model_dir, tmp_path, monkeypatch):
    shipped = shipped_models()
    if "hippocampus" not in shipped:
        pytest.skip("the shipped hippocampus model is not installed")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("hippocampus") == shipped["hippocampus"]
    (tmp_path / "hippocampus").mkdir()  # a data folder of that name does not matter
    assert resolve_model("hippocampus") == shipped["hippocampus"]
    shutil.rmtree(tmp_path / "hippocampus")
    shutil.copytree(tiny_model_dir, tmp_path / "hippocampus")
    with pytest.raises(SDMOrganSegError, match=r"both a shipped model and the folder .*pass \./hippocampus"):
        resolve_model("hippocampus")
    assert resolve_model("./hippocampus").resolve() == (tmp_path / "hippocampus").resolve()
