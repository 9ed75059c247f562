"""SNOMED CT terminology of the organs, and the string Slicer stores for it; every code the shipped model
cards and the built-in table use exists in Slicer's DICOM master list (excerpt in Testing/Data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from SDMOrganSegLib.formats.modelfiles import organs_from_labels, read_card, shipped_models
from SDMOrganSegLib.formats.terminology import _TYPES, SLICER_CONTEXT, check_terminology, default_terminology, slicer_terminology_entry

MASTER_LIST = Path(__file__).resolve().parents[1] / "Data" / "slicer-terminology" / "SegmentationCategoryTypeModifier-DICOM-Master.excerpt.json"


def _master_list() -> dict:
    """(category, type) -> set of modifiers, each code as (scheme, value, meaning), as Slicer's loader sees them."""
    document = json.loads(MASTER_LIST.read_text(encoding="utf-8"))
    entries = {}
    for category in document["SegmentationCodes"]["Category"]:
        category_code = (category["CodingSchemeDesignator"], category["CodeValue"], category["CodeMeaning"])
        for kind in category.get("Type", []):
            type_code = (kind["CodingSchemeDesignator"], kind["CodeValue"], kind["CodeMeaning"])
            entries[(category_code, type_code)] = {(m["CodingSchemeDesignator"], m["CodeValue"], m["CodeMeaning"]) for m in kind.get("Modifier", [])}
    return document["SegmentationCategoryTypeContextName"], entries


def _assert_in_master_list(terminology: dict, what: str) -> None:
    context, entries = _master_list()
    assert context == SLICER_CONTEXT
    category, kind = ((c[1], c[0], c[2]) for c in (terminology["category"], terminology["type"]))
    assert (category, kind) in entries, f"{what}: {kind} under {category} is not in Slicer's DICOM master list"
    if terminology.get("modifier"):
        modifier = terminology["modifier"]
        assert (modifier[1], modifier[0], modifier[2]) in entries[(category, kind)], f"{what}: modifier {modifier} not allowed"


def test_shipped_cards_use_codes_of_slicers_dicom_master_list():
    cards = [read_card(folder) for folder in shipped_models().values()]
    assert {card.name for card in cards} >= {"hippocampus", "headneck-oar"}
    for card in cards:
        for organ in card.organs:
            assert organ.terminology, f"{card.name}: {organ.name} has no terminology"
            _assert_in_master_list(organ.terminology, f"{card.name}/{organ.name}")
            entry = slicer_terminology_entry(organ.terminology).split("~")
            assert entry[0] == "Segmentation category and type - DICOM master list"


def test_built_in_table_uses_codes_of_slicers_dicom_master_list():
    for name in _TYPES:
        _assert_in_master_list(default_terminology(name), name)
    # The brain stem of the master list, not SNOMED CT's 15926001 "Brainstem", which Slicer 5.6 rejects.
    assert default_terminology("brainstem")["type"] == ["119238007", "SCT", "Brain stem"]


def test_head_and_neck_organs_have_snomed_codes_with_laterality():
    organs = organs_from_labels({1: "brainstem", 2: "spinal cord", 3: "right parotid", 4: "left parotid", 5: "esophagus", 6: "larynx", 7: "mandible"})
    codes = {o.name: o.terminology["type"][0] for o in organs}
    assert codes == {
        "brainstem": "119238007", "spinal cord": "2748008", "right parotid": "45289007", "left parotid": "45289007",
        "esophagus": "32849002", "larynx": "4596009", "mandible": "91609006",
    }
    assert all(o.terminology["category"] == ["123037004", "SCT", "Anatomical Structure"] for o in organs)
    by_name = {o.name: o for o in organs}
    assert by_name["right parotid"].terminology["modifier"] == ["24028007", "SCT", "Right"]
    assert by_name["left parotid"].terminology["modifier"] == ["7771000", "SCT", "Left"]
    assert "modifier" not in by_name["mandible"].terminology
    assert default_terminology("Some New Organ") is None and default_terminology(" Mandible ") is not None


def test_slicer_terminology_entry_format():
    entry = slicer_terminology_entry(default_terminology("left parotid"))
    parts = entry.split("~")
    assert len(parts) == 7
    assert parts[0] == "Segmentation category and type - DICOM master list"
    assert parts[1:4] == ["SCT^123037004^Anatomical Structure", "SCT^45289007^Parotid gland", "SCT^7771000^Left"]
    assert parts[4:] == ["Anatomic codes - DICOM master list", "^^", "^^"]
    assert slicer_terminology_entry(default_terminology("larynx")).split("~")[3] == "^^"


def test_check_terminology_refuses_malformed_entries():
    assert check_terminology(None, "card") is None
    good = default_terminology("larynx")
    assert check_terminology(good, "card") == good
    for bad in ({"type": good["type"]}, {**good, "region": good["type"]}, {**good, "type": ["4596009", "SCT"]}, "SCT^1^x"):
        with pytest.raises(ValueError):
            check_terminology(bad, "card")
