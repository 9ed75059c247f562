"""What the panel's sections share: the choices of the combo boxes (the parameter node's enums), the
markers of special combo box entries, and :class:`PanelSection`, the base of every section, which reaches
the widget's ``ui``, Logic and parameter node and starts a run in the background."""

from __future__ import annotations

import enum
import logging

from ...common.errors import SDMOrganSegError
from ..dependencies import translated as _

#: Marker item data of the "Load model folder..." entry of the model combo box.
LOAD_MODEL_FOLDER = "<load-model-folder>"
#: Marker item data of the scratch entries of the training start combo box: SCRATCH + preset name.
SCRATCH = "scratch:"


# --- the panel's choices (the module's parameter node, SDMOrganSegParameterNode, holds one of each) ---


class DeviceChoice(enum.Enum):
    """Where the network runs."""

    AUTO = "auto"
    GPU = "cuda"
    CPU = "cpu"

    def label(self) -> str:
        return {DeviceChoice.AUTO: _("Auto (GPU if available)"), DeviceChoice.GPU: _("GPU (CUDA)"), DeviceChoice.CPU: _("CPU")}[self]


class RuntimeChoice(enum.Enum):
    """What runs the network (``sdmorganseg segment --runtime``)."""

    AUTO = "auto"
    ONNXRUNTIME = "onnxruntime"
    TORCH = "torch"

    def label(self) -> str:
        return {RuntimeChoice.AUTO: _("Auto (ONNX Runtime if the model has model.onnx)"), RuntimeChoice.ONNXRUNTIME: _("ONNX Runtime"),
                RuntimeChoice.TORCH: _("PyTorch")}[self]


class SegmentMatching(enum.Enum):
    """How segments are paired with reference segments for the metrics."""

    BY_NAME = "name"
    BY_ORDER = "order"

    def label(self) -> str:
        return {SegmentMatching.BY_NAME: _("By segment name"), SegmentMatching.BY_ORDER: _("By segment order")}[self]


class TrainingSource(enum.Enum):
    """Where the training cases come from."""

    SCENE = "scene"
    FOLDER = "folder"

    def label(self) -> str:
        return {TrainingSource.SCENE: _("Volumes and segmentations in the scene"),
                TrainingSource.FOLDER: _("A data folder (imagesTr/labelsTr, nnU-Net or MSD)")}[self]


class TrainingMode(enum.Enum):
    """The training loss (sdmorganseg train --mode)."""

    SDM_DICE = "sdm+dice"
    SDM = "sdm"
    L1_DICE = "l1+dice"
    DICE = "dice"
    DUAL = "dual"

    def label(self) -> str:
        return {TrainingMode.SDM_DICE: _("SDM + Dice (the paper's)"), TrainingMode.SDM: _("SDM only"),
                TrainingMode.L1_DICE: _("L1 on the SDM + Dice"), TrainingMode.DICE: _("Dice only (no SDM output)"),
                TrainingMode.DUAL: _("Dual heads: segmentation (Dice) + SDM")}[self]


def _lib():
    """The MRML logic module, imported on first use (it pulls in SimpleITK and VTK helpers)."""
    from .. import mrmllogic

    return mrmllogic


def _isSet(path) -> bool:
    """Whether a path parameter holds a path (an empty path line edit reads as ".")."""
    return str(path).strip() not in ("", ".")


def _unexpected(error: Exception) -> str:
    return _("Unexpected error: {error} (details in the Python console)").format(error=error)


class PanelSection:
    """What every section shares, all held by the module's widget: its ``ui``, its Logic, the parameter node,
    and the start of a run in the background."""

    def __init__(self, widget) -> None:
        self.widget = widget

    @property
    def ui(self):
        return self.widget.ui

    @property
    def logic(self):
        return self.widget.logic

    @property
    def parameterNode(self):
        return self.widget._parameterNode

    def _setStarting(self, starting: bool) -> None:
        self.widget._setStarting(starting)

    def _ensureDependencies(self, **needs) -> bool:
        return self.widget._ensureDependencies(**needs)

    def _showError(self, message: str, statusLabel=None) -> None:
        self.widget._showError(message, statusLabel)

    def _startInBackground(self, statusLabel, starting: str, what: str, start, needs=None):
        """Install the missing packages (after asking), then ``start()`` a background run and return it; None,
        with the reason in ``statusLabel`` (and a message box for errors), when it did not start. ``needs``:
        the ``model`` and ``runtime`` of a segmentation (which runtime to install); None: a training."""
        import slicer

        self._setStarting(True)
        try:
            if not self._ensureDependencies(forTraining=needs is None, **(needs or {})):
                statusLabel.text = _("The required Python packages are not installed; nothing was done.")
                return None
            statusLabel.text = starting
            slicer.app.processEvents()
            return start()
        except SDMOrganSegError as error:
            self._showError(str(error), statusLabel)
        except Exception as error:  # a bug: full details in the log, a plain sentence for the user
            logging.exception("SDMOrganSeg could not start the %s", what)
            self._showError(_unexpected(error), statusLabel)
        finally:
            self._setStarting(False)
        return None
