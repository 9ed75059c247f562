"""The files the method reads and writes beyond one image: model folders (cards, weights, ``modelfiles``),
organ terminology codes (``terminology``), what a fine-tune takes from its base model (``finetuning``),
training data folders and packs (``dataset``, ``datapack``) and DICOM SEG / RTSTRUCT outputs (``dicomout``).

May import: ``SDMOrganSegLib.common``, ``.images`` and ``.method``. Never the engines or anything of Slicer.
"""
