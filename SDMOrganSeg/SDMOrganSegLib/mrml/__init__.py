"""The Slicer side: everything that touches MRML scenes, Slicer's application or its Python.

The panel's Logic and its parts (``mrmllogic``: scene conversions ``mrmlscene``, segmentation
``mrmlsegmentation``, training ``mrmltraining``, metrics tables ``mrmlmetrics``), the background worker
process both long jobs run in (``background``), a headless MRML scene on the ``slicer-core`` package
(``headless``), the packages Slicer's Python must install (``dependencies``), the panel's sections
(``panels``), the module's self-test (``moduletest``) and the batch runner behind ``Scripts/batch.py``
(``batch``).

May import: every other part of the library but the command line and ``SDMOrganSegLib.review``; and
``slicer``, ``vtkMRML*`` and ``qt``, inside the functions that need them, so that every module here but
``headless`` (the slicer-core scene itself) imports without Slicer (Python 3.9 and 3.12 in CI).

Public names: ``__all__`` below, the only names SDMOrganSeg.py (the Slicer module file) may import from the
library (Testing/Python/test_layout.py checks it). They are light: Slicer imports the module file at
start-up, so ``mrmllogic`` (SimpleITK, VTK) is imported when the panel first needs it, never here.
"""

from ..common.errors import CancelledError, InputMismatchError, SDMOrganSegError
from ..formats.modelfiles import CARD_FILE, DEFAULT_MODEL, read_card, resolve_model, shipped_models
from . import dependencies, moduletest, panels
from .panels import DeviceChoice, RuntimeChoice, SegmentMatching, TrainingMode, TrainingSource

__all__ = [
    "CARD_FILE", "DEFAULT_MODEL", "CancelledError", "DeviceChoice", "InputMismatchError", "RuntimeChoice", "SDMOrganSegError",
    "SegmentMatching", "TrainingMode", "TrainingSource", "dependencies", "moduletest", "mrmllogic", "panels", "read_card",
    "resolve_model", "shipped_models",
]
