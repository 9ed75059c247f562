"""Standard terminology for organs: SNOMED CT codes, as DICOM SEG / RTSTRUCT and Slicer's terminologies use.

A model card's organ may carry ``terminology``: ``{"category": [code, scheme, meaning], "type": [...],
"modifier": [...] (optional)}``, DICOM's SegmentedPropertyCategory / Type / TypeModifier code triplets.
:func:`default_terminology` gives the codes of the organs SDMOrganSeg's models segment (by name), and
:func:`slicer_terminology_entry` the string Slicer stores in a segment's ``TerminologyEntry`` tag.

Codes (SNOMED CT, scheme designator ``SCT``) are those of DICOM PS3.16 (CID 7153 "Body Structures" and
CID 244 "Laterality") as they stand in Slicer's "Segmentation category and type - DICOM master list"
(Modules/Loadable/Terminologies/Resources/SegmentationCategoryTypeModifier-DICOM-Master.json in Slicer's
source), the context the ``TerminologyEntry`` tag names: Slicer 5.6 looks the type (and modifier) up in the
named context and rejects a code it lacks, and the "3D Slicer General Anatomy list" lacks the hippocampus,
the parotid gland and the brain stem. Testing/Data/slicer-terminology holds an excerpt of that list, against
which the tests check every code here and in the shipped model cards.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

Code = List[str]  #: [code value, coding scheme designator, code meaning]

#: The context a segment's TerminologyEntry names (Slicer's DICOM master list of categories and types).
SLICER_CONTEXT = "Segmentation category and type - DICOM master list"
#: The anatomic-region context of the entry (unused here: region fields are left empty).
SLICER_REGION_CONTEXT = "Anatomic codes - DICOM master list"

ANATOMICAL_STRUCTURE: Code = ["123037004", "SCT", "Anatomical Structure"]
RIGHT: Code = ["24028007", "SCT", "Right"]
LEFT: Code = ["7771000", "SCT", "Left"]

#: Organ name (as in the data sets' labels.json) -> (type code, laterality modifier or None).
_TYPES: Dict[str, tuple] = {
    # The DICOM master list's "Brain stem" (SCT 119238007; SCT 15926001 "Brainstem" is not in it).
    "brainstem": (["119238007", "SCT", "Brain stem"], None),
    "brain stem": (["119238007", "SCT", "Brain stem"], None),
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
            SLICER_CONTEXT,
            code(terminology["category"]),
            code(terminology["type"]),
            code(terminology.get("modifier")),
            SLICER_REGION_CONTEXT,
            "^^",
            "^^",
        ]
    )
