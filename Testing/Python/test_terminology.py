"""SNOMED CT terminology of the organs, and the string Slicer stores for it."""

from __future__ import annotations

import pytest

from SDMOrganSegLib.modelfiles import organs_from_labels
from SDMOrganSegLib.terminology import check_terminology, default_terminology, slicer_terminology_entry


def test_head_and_neck_organs_have_snomed_codes_with_laterality():
    organs = organs_from_labels({1: "brainstem", 2: "spinal cord", 3: "right parotid", 4: "left parotid", 5: "esophagus", 6: "larynx", 7: "mandible"})
    codes = {o.name: o.terminology["type"][0] for o in organs}
    assert codes == {
        "brainstem": "15926001", "spinal cord": "2748008", "right parotid": "45289007", "left parotid": "45289007",
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
    assert parts[0] == "Segmentation category and type - 3D Slicer General Anatomy list"
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
