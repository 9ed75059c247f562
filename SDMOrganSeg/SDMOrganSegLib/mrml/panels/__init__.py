"""The module panel's sections, one class each: :class:`SegmentationPanel` (input, model, device, levels,
Apply, the outputs), :class:`TrainingPanel` (fine-tuning or training in the background) and
:class:`MetricsPanel` (a segmentation against a reference, its table and CSV).

The choices of its combo boxes are enums here (:class:`DeviceChoice`, :class:`RuntimeChoice`,
:class:`SegmentMatching`, :class:`TrainingSource`, :class:`TrainingMode`), held by the parameter node in
SDMOrganSeg.py. The widget in SDMOrganSeg.py (``SDMOrganSegWidget``) is the shell: it loads the .ui file, holds the
Logic and the parameter node, connects each section's widgets and starts and stops them with the module.
The sections reach what they share through it (:class:`PanelSection`): ``ui``, ``logic``, the parameter
node, the Apply/Train/Compute buttons disabled while any run starts, the package installation and the
error message box.

``qt`` and ``slicer`` are imported inside the methods: these modules import without Slicer (CI imports every
library module on Python 3.9 and 3.12), and Slicer only runs it in its own application.
"""

from .metrics import MetricsPanel
from .section import (
    LOAD_MODEL_FOLDER, SCRATCH, DeviceChoice, PanelSection, RuntimeChoice, SegmentMatching, TrainingMode, TrainingSource,
)
from .segmentation import SegmentationPanel
from .training import TrainingPanel

__all__ = [
    "LOAD_MODEL_FOLDER", "SCRATCH", "DeviceChoice", "MetricsPanel", "PanelSection", "RuntimeChoice", "SegmentMatching",
    "SegmentationPanel", "TrainingMode", "TrainingPanel", "TrainingSource",
]
