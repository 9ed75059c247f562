"""Standard terminology for organs: SNOMED CT codes, as DICOM SEG / RTSTRUCT and Slicer's terminologies use.

A model card's organ may carry ``terminology``: ``{"category": [code, scheme, meaning], "type": [...],
"modifier": [...] (optional)}``, DICOM's SegmentedPropertyCategory / Type / TypeModifier code triplets.
:func:`default_terminology` gives the codes of the organs SDMOrganSeg's models segment (by name), and
:func:`slicer_terminology_entry` the string Slicer stores in a segment's ``TerminologyEntry`` tag.

Codes (SNOMED CT, scheme designator ``SCT``) are those of DICOM PS3.16 (CID 7153 "Body Structures" and
CID 244 "Laterality"), also used by Slicer's general-anatomy terminology and SlicerTotalSegmentator.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

Code = List[str]  #: [code value, coding scheme designator, code meaning]

ANATOMICAL_STRUCTURE: Code = ["123037004", "SCT", "Anatomical Structure"]
RIGHT: Code = ["24028007", "SCT", "Right"]
LEFT: Code = ["7771000", "SCT", "Left"]

#: Organ name (as in the data sets' labels.json) -> (type code, laterality modifier or None).
_TYPES: Dict[str, tuple] = {
    "brainstem": (["15926001", "SCT", "Brainstem"], None),
    "spinal cord": (["2748008", "SCT", "Spinal cord"], None),
    "right parotid": (["45289007", "SCT", "Parotid gland"], RIGHT),
    "left parotid": (["45289007", "SCT", "Parotid gland"], LEFT),
    "esophagus": (["32849002", "SCT", "Esophagus"], None),
    "larynx": (["4596009", "SCT", "Larynx"], None),
    "mandible": (["91609006", "SCT", "Mandible"], None),
    # SNOMED CT has no separate codes for the MSD labels' head and body/tail: both are the hippocampus.
    "anterior hippocampus": (["5366008", "SCT", "Hippocampus"], None),
    "posterior hippocampus": (["5366008", "SCT", "Hippocampus"], None),
}


def default_terminology(organ_name: str) -> Optional[Dict[str, Code]]:
    """The terminology of a known organ name (case-insensitive), or None."""
    known = _TYPES.get(organ_name.strip().lower())
    if known is None:
        return None
    code, modifier = known
    entry: Dict[str, Code] = {"category": list(ANATOMICAL_STRUCTURE), "type": list(code)}
    if modifier:
        entry["modifier"] = list(modifier)
    return entry


def check_terminology(value: Any, source: str) -> Optional[Dict[str, Code]]:
    """A card's terminology entry, checked: category and type (and an optional modifier) as code triplets."""
    if value is None:
        return None
    if not isinstance(value, dict) or not {"category", "type"} <= set(value) or not set(value) <= {"category", "type", "modifier"}:
        raise ValueError(f"{source}: terminology must have 'category' and 'type' (and optionally 'modifier') code triplets")
    for key, code in value.items():
        if not (isinstance(code, (list, tuple)) and len(code) == 3 and all(isinstance(part, str) and part for part in code)):
            raise ValueError(f"{source}: terminology {key} must be [code value, scheme, meaning], got {code!r}")
    return {key: list(code) for key, code in value.items()}


def slicer_terminology_entry(terminology: Dict[str, Code]) -> str:
    """Slicer's ``TerminologyEntry`` segment tag for a terminology (anatomic region left empty).

    Format (Slicer 5): ``context~category~type~type modifier~anatomic context~region~region modifier``, each
    code as ``scheme^value^meaning``.
    """

    def code(triplet: Optional[Code]) -> str:
        return f"{triplet[1]}^{triplet[0]}^{triplet[2]}" if triplet else "^^"

    return "~".join(
        [
            "Segmentation category and type - 3D Slicer General Anatomy list",
            code(terminology["category"]),
            code(terminology["type"]),
            code(terminology.get("modifier")),
            "Anatomic codes - DICOM master list",
            "^^",
            "^^",
        ]
    )
