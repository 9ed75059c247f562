"""SDM Organ Segmentation: a 3D Slicer module that segments organs by predicting signed distance maps.

The module is a thin shell: the panel (Widget) collects choices into a parameter node and shows
progress; the Logic delegates to ``SDMOrganSegLib.mrml.mrmllogic`` (which the batch script and the tests use
too) and to the Slicer-free core library. Heavy Python packages (PyTorch and friends) are checked only
when a run or a metrics computation starts, and installed only after the user agrees.
"""

# No "from __future__ import annotations": parameterNodeWrapper reads the parameter node's annotations
# with typing.get_type_hints, which needs them to be real types, not strings.
import enum
import importlib.util
import json
import logging
import os
import pathlib
import subprocess
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# Only the dependency-free part of the library is imported here: Slicer imports every module at start-up.
from SDMOrganSegLib.mrml import dependencies  # package checks and model folders, without PyTorch
from SDMOrganSegLib.formats import modelfiles  # package checks and model folders, without PyTorch
from SDMOrganSegLib.common.errors import CancelledError, InputMismatchError, SDMOrganSegError
from SDMOrganSegLib.formats.modelfiles import CARD_FILE as MODEL_CARD_FILE, DEFAULT_MODEL

#: File names of a model folder (see SDMOrganSegLib.formats.modelfiles); read here without importing PyTorch.
#: Marker item data of the "Load model folder..." entry of the model combo box.
LOAD_MODEL_FOLDER = "<load-model-folder>"


def _moduleDir() -> Path:
    return Path(__file__).resolve().parent


def moduleResourcePath(relative: str) -> str:
    """Path of a file in the module's Resources folder.

    Built or installed, Resources sits beside this script (qt-scripted-modules/Resources, where
    ``resourcePath()`` looks); in the source tree it sits one level up, at the repository top.
    """
    for base in (_moduleDir() / "Resources", _moduleDir().parent / "Resources"):
        candidate = base / relative
        if candidate.exists():
            return str(candidate)
    return str(_moduleDir() / "Resources" / relative)


def _lib():
    """The MRML logic module, imported on first use (it pulls in SimpleITK and VTK helpers)."""
    from SDMOrganSegLib.mrml import mrmllogic

    return mrmllogic


#
# SDMOrganSeg
#


class SDMOrganSeg(ScriptedLoadableModule):
    """Module description shown in Slicer's help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SDM Organ Segmentation")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["SDMOrganSeg contributors"]
        self.parent.helpText = _("""
Segments organs in a 3D volume with a deep network that predicts each organ's signed distance map (SDM):
negative inside the organ, zero on its surface, positive outside. The module adds, in one folder per run,
a segmentation (one segment per organ, named and coloured as the model card says), one SDM volume per organ
(blue inside, white at the surface, red outside) and the SDM iso-contours at the chosen levels as models:
level 0 (red) is the organ surface, 0.1, 0.2 and 0.3 (orange, yellow, green) lie further out.
Contours are drawn as lines in slice views and as surfaces in 3D views.
The <b>Metrics</b> section compares a segmentation with a reference (Dice, Hausdorff distance, HD95 and
average surface distance in mm) and saves the table as CSV.
The <b>Training</b> section fine-tunes a model (or trains one from scratch) on volume + segmentation pairs of the
scene, e.g. results corrected in the Segment Editor, or on a data folder, in the background; the new model is
added to the model selector when it is done.
See the README of the SDMOrganSeg extension for details, including how the shipped model was trained.
""")
        self.parent.acknowledgementText = _("""
Method: Y. Xue, H. Tang, Z. Qiao, G. Gong, Y. Yin, Z. Qian, C. Huang, W. Fan and X. Huang,
"Shape-Aware Organ Segmentation by Predicting Signed Distance Maps",
Proceedings of the AAAI Conference on Artificial Intelligence 34(07), 2020.
Training data: the Medical Segmentation Decathlon. M. Antonelli et al., "The Medical Segmentation Decathlon",
Nature Communications 13, 4128 (2022); A. L. Simpson et al., "A large annotated medical image dataset for the
development and evaluation of segmentation algorithms", arXiv:1902.09063 (2019).
""")
        # Built or installed, Slicer finds Resources/Icons/SDMOrganSeg.png beside this file by itself;
        # in the source tree the icon is at the repository top.
        iconPath = moduleResourcePath("Icons/SDMOrganSeg.png")
        if os.path.isfile(iconPath):
            self.parent.icon = qt.QIcon(iconPath)


#
# Parameter node
#


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


#: Marker item data of the scratch entries of the training start combo box: SCRATCH + preset name.
SCRATCH = "scratch:"


@parameterNodeWrapper
class SDMOrganSegParameterNode:
    """The module's state, saved with the scene.

    inputVolume - volume to segment.
    model - shipped model name or model folder path; empty: the default shipped model.
    device - auto, GPU or CPU.
    runtime - what runs the network: auto, ONNX Runtime or PyTorch.
    levels - SDM iso-contour levels, comma separated.
    show2D, show3D - show the contours in slice views, the surfaces in 3D views.
    evaluatedSegmentation, referenceSegmentation, segmentMatching - inputs of the metrics.
    metricsTable - the last metrics table.
    trainingSource - training cases from the scene (trainingVolumes + trainingSegmentations, pairs in order,
        added from trainingVolume + trainingSegmentation) or from trainingDataFolder.
    trainingStart - the model to fine-tune (shipped name or folder) or "scratch:<preset>"; empty: the default.
    trainingMode, trainingEpochs, trainingOutputFolder - the loss, the epochs and the run folder.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    model: str = ""
    device: DeviceChoice = DeviceChoice.AUTO
    runtime: RuntimeChoice = RuntimeChoice.AUTO
    levels: str = "0, 0.1, 0.2, 0.3"
    show2D: bool = True
    show3D: bool = True
    evaluatedSegmentation: vtkMRMLSegmentationNode
    referenceSegmentation: vtkMRMLSegmentationNode
    segmentMatching: SegmentMatching = SegmentMatching.BY_NAME
    metricsTable: vtkMRMLTableNode
    trainingSource: TrainingSource = TrainingSource.SCENE
    trainingSegmentation: vtkMRMLSegmentationNode
    trainingVolume: vtkMRMLScalarVolumeNode
    trainingSegmentations: list[vtkMRMLSegmentationNode]
    trainingVolumes: list[vtkMRMLScalarVolumeNode]
    trainingDataFolder: pathlib.Path
    trainingStart: str = ""
    trainingMode: TrainingMode = TrainingMode.SDM_DICE
    trainingEpochs: Annotated[int, WithinRange(1, 10000)] = 20
    trainingOutputFolder: pathlib.Path


#
# SDMOrganSegWidget
#


class SDMOrganSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: thin; every computation is in :class:`SDMOrganSegLogic`."""

    POLL_INTERVAL_MS = 200
    TRAINING_POLL_INTERVAL_MS = 1000

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[SDMOrganSegLogic] = None
        self._parameterNode: Optional[SDMOrganSegParameterNode] = None
        self._parameterNodeGuiTag = None
        self._run = None  # mrmllogic.BackgroundRun while a segmentation runs
        #: True from a click on Apply, Train or Compute until the run has started (packages may be installed
        #: meanwhile, and pip's output loop processes events: a second click must find the buttons disabled).
        self._starting = False
        self._runVolume = None
        self._lastOutputs = None
        self._loadedModelFolders: list[str] = []
        self._updatingModelCombo = False
        self._devicesProbe: Optional[subprocess.Popen] = None
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(self.POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self._onPollRun)
        self._trainingRun = None  # mrmltraining.TrainingRun while a training runs
        self._trainingCurveShown = None  # (path, modification time) of the curve image shown
        self._lastTrainingSegmentation = None
        self._trainingTimer = qt.QTimer()
        self._trainingTimer.setInterval(self.TRAINING_POLL_INTERVAL_MS)
        self._trainingTimer.connect("timeout()", self._onPollTraining)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(moduleResourcePath("UI/SDMOrganSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SDMOrganSegLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        # Slicer may quit without closing the module first: the background worker must not outlive it.
        slicer.app.connect("aboutToQuit()", self.stopBackgroundProcesses)

        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.show2DCheckBox.connect("toggled(bool)", self.onVisibilityChanged)
        self.ui.show3DCheckBox.connect("toggled(bool)", self.onVisibilityChanged)
        self.ui.computeMetricsButton.connect("clicked(bool)", self.onComputeMetrics)
        self.ui.saveCsvButton.connect("clicked(bool)", self.onSaveCsv)
        self.ui.trainingStartComboBox.connect("currentIndexChanged(int)", self.onTrainingStartChanged)
        self.ui.addTrainingPairButton.connect("clicked(bool)", self.onAddTrainingPair)
        self.ui.removeTrainingPairButton.connect("clicked(bool)", self.onRemoveTrainingPair)
        self.ui.trainButton.connect("clicked(bool)", self.onTrainButton)

        self.ui.progressBar.setRange(0, 100)
        self.ui.progressBar.hide()
        self.ui.statusLabel.text = ""
        self.ui.outputSummaryLabel.text = _("No segmentation yet.")
        self.ui.trainingProgressBar.setRange(0, 100)
        self.ui.trainingProgressBar.hide()
        self.ui.trainingStatusLabel.text = ""
        self.ui.trainingCurveLabel.hide()
        self._populateModelComboBox()
        self.initializeParameterNode()
        # Ask PyTorch which GPU it sees, in a separate process so that opening the module stays instant.
        qt.QTimer.singleShot(0, self._startDevicesProbe)

    def cleanup(self) -> None:
        self.stopBackgroundProcesses()
        self.removeObservers()
        # A reloaded module must not leave its predecessor's slot connected to the application.
        slicer.app.disconnect("aboutToQuit()", self.stopBackgroundProcesses)

    def stopBackgroundProcesses(self) -> None:
        """Kill the segmentation and training workers and the GPU probe, each with every process it started
        (a killed training keeps its last checkpoint: the same output folder resumes it)."""
        self._pollTimer.stop()
        self._trainingTimer.stop()
        if self._run is not None:
            self._run.cleanup()
            self._run = None
        if self._trainingRun is not None:
            self._trainingRun.cleanup()
            self._trainingRun = None
        if self._devicesProbe is not None:
            _lib().kill_process_tree(self._devicesProbe)
            self._devicesProbe = None

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        if self._run is not None:
            self._run.cancel()  # its input volume is about to disappear
        self._lastOutputs = None
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # --- parameter node ---

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode and not firstVolumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: Optional[SDMOrganSegParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with a SlicerParameterName property in the .ui file are bound here, both ways.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        self._selectModelInComboBox(self._parameterNode.model if self._parameterNode else "")
        self.ui.metricsTableView.setMRMLTableNode(self._parameterNode.metricsTable if self._parameterNode else None)
        self._updateTrainingSection()
        self._updateButtons()

    # --- model selection ---

    def _modelEntries(self) -> list:
        """(label, item data) of the shipped models and the loaded model folders (named as their cards say)."""
        entries = [(name, name) for name in self.logic.shippedModels()]
        for folder in self._loadedModelFolders:
            card = self.logic.readModelCard(folder)
            entries.append((_("{name} (folder)").format(name=card["name"] if card else Path(folder).name), folder))
        return entries

    def _populateModelComboBox(self) -> None:
        combo = self.ui.modelComboBox
        self._updatingModelCombo = True
        try:
            combo.clear()
            entries = self._modelEntries()
            for label, data in entries:
                combo.addItem(label, data)
            if combo.count == 0:
                combo.addItem(_("(no model installed)"), "")
            combo.insertSeparator(combo.count)
            combo.addItem(_("Load model folder..."), LOAD_MODEL_FOLDER)
            # The training section starts from the same models, or from scratch.
            start = self.ui.trainingStartComboBox
            start.clear()
            for label, data in entries:
                start.addItem(_("Fine-tune {model}").format(model=label), data)
            for preset, label in self.logic.trainingPresets().items():
                start.addItem(_("New network: {label}").format(label=label), SCRATCH + preset)
        finally:
            self._updatingModelCombo = False

    def _selectModelInComboBox(self, model: str) -> None:
        combo = self.ui.modelComboBox
        wanted = model or (DEFAULT_MODEL if DEFAULT_MODEL in self.logic.shippedModels() else "")
        if wanted and wanted not in self.logic.shippedModels() and wanted not in self._loadedModelFolders and Path(wanted).is_dir():
            self._loadedModelFolders.append(wanted)  # a folder saved in the scene
            self._populateModelComboBox()
        index = combo.findData(wanted)
        self._updatingModelCombo = True
        try:
            combo.currentIndex = index if index >= 0 else 0
        finally:
            self._updatingModelCombo = False
        self._updateModelInfo()

    def onModelChanged(self, index: int) -> None:
        if self._updatingModelCombo or self._parameterNode is None:
            return
        data = self.ui.modelComboBox.itemData(index)
        if data == LOAD_MODEL_FOLDER:
            folder = qt.QFileDialog.getExistingDirectory(self.parent, _("Choose a model folder (holding model.json and model.safetensors)"))
            if folder:
                if not (Path(folder) / MODEL_CARD_FILE).is_file():
                    self._showError(_("{folder} has no {card}; it is not an SDMOrganSeg model folder").format(folder=folder, card=MODEL_CARD_FILE))
                elif folder not in self._loadedModelFolders:
                    self._loadedModelFolders.append(folder)
                    self._populateModelComboBox()
                if (Path(folder) / MODEL_CARD_FILE).is_file():
                    self._parameterNode.model = folder
            self._selectModelInComboBox(self._parameterNode.model)  # back to a real entry
            return
        self._parameterNode.model = data or ""

    def _updateModelInfo(self) -> None:
        card = self.logic.readModelCard(self._currentModel())
        if card is None:
            self.ui.modelInfoLabel.text = _("No model: install one or load a model folder.")
            return
        organs = ", ".join(organ.get("name", "?") for organ in card.get("organs", []))
        description = card.get("description") or card.get("name", "")
        self.ui.modelInfoLabel.text = _("Organs: {organs}").format(organs=organs) + (f"\n{description}" if description else "")

    def _selectTrainingStart(self, start: str) -> None:
        wanted = start or (DEFAULT_MODEL if DEFAULT_MODEL in self.logic.shippedModels() else SCRATCH + "cpu")
        if not wanted.startswith(SCRATCH) and wanted not in self.logic.shippedModels() and wanted not in self._loadedModelFolders and Path(wanted).is_dir():
            self._loadedModelFolders.append(wanted)  # a folder saved in the scene
            self._populateModelComboBox()
        combo = self.ui.trainingStartComboBox
        index = combo.findData(wanted)
        self._updatingModelCombo = True
        try:
            combo.currentIndex = index if index >= 0 else 0
        finally:
            self._updatingModelCombo = False

    def onTrainingStartChanged(self, index: int) -> None:
        if self._updatingModelCombo or self._parameterNode is None:
            return
        self._parameterNode.trainingStart = self.ui.trainingStartComboBox.itemData(index) or ""

    def _currentModel(self) -> str:
        data = self.ui.modelComboBox.currentData
        return "" if data in (None, LOAD_MODEL_FOLDER) else str(data)

    # --- devices ---

    def _startDevicesProbe(self) -> None:
        if importlib.util.find_spec("torch") is None:
            self.ui.gpuLabel.text = _("PyTorch is not installed: models with model.onnx (the shipped ones) run on ONNX Runtime, "
                                      "on the CPU; PyTorch is offered when you train, or for a model without model.onnx.")
            return
        if self._devicesProbe is not None:  # a probe from before an install: it would report the old state
            _lib().kill_process_tree(self._devicesProbe)
            self._devicesProbe = None
        try:
            command = _lib().probe_devices_command(_lib().python_executable())
            self._devicesProbe = _lib().start_process(
                command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True,
                env=slicer.util.startupEnvironment(),
            )
        except (OSError, SDMOrganSegError) as error:
            self.ui.gpuLabel.text = _("Could not check for a GPU: {error}").format(error=error)
            return
        self.ui.gpuLabel.text = _("Checking for a GPU...")
        qt.QTimer.singleShot(500, self._pollDevicesProbe)

    def _pollDevicesProbe(self) -> None:
        probe = self._devicesProbe
        if probe is None:
            return
        if probe.poll() is None:
            qt.QTimer.singleShot(500, self._pollDevicesProbe)
            return
        output = (probe.communicate()[0] or "").strip().splitlines()
        self._devicesProbe = None
        found = output[-1] if output else ""
        if found.startswith("cuda: "):
            self.ui.gpuLabel.text = _("GPU found: {name}").format(name=found[len("cuda: "):])
        elif found == "cpu":
            self.ui.gpuLabel.text = _("No CUDA GPU found: the network will run on the CPU.")
        else:
            self.ui.gpuLabel.text = _("Could not check for a GPU (PyTorch did not start).")

    # --- segmentation ---

    def _setStarting(self, starting: bool) -> None:
        """While a run is being started (packages installed, inputs written): Apply, Train and Compute disabled."""
        self._starting = starting
        if starting:
            for button in (self.ui.applyButton, self.ui.trainButton, self.ui.computeMetricsButton):
                button.enabled = False
        else:
            self._updateButtons()

    def _updateButtons(self) -> None:
        if self._starting:
            return  # _setStarting(False) updates them
        if self._run is not None:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the segmentation; nothing is added to the scene")
            self.ui.applyButton.enabled = not self._run.cancel_requested
            return
        self.ui.applyButton.text = _("Apply")
        problems = []
        pn = self._parameterNode
        if pn is None or not pn.inputVolume:
            problems.append(_("Select an input volume."))
        if not self._currentModel():
            problems.append(_("Select a model or load a model folder."))
        if pn is not None:
            try:
                _lib().parse_levels(pn.levels)
            except ValueError as error:
                problems.append(str(error))
        self.ui.applyButton.enabled = not problems
        self.ui.applyButton.toolTip = "\n".join(problems) if problems else _("Segment the input volume with the selected model")
        hasInputs = pn is not None and pn.evaluatedSegmentation and pn.referenceSegmentation
        self.ui.computeMetricsButton.enabled = bool(hasInputs)
        self.ui.saveCsvButton.enabled = bool(pn is not None and pn.metricsTable)
        self._updateTrainButton()

    def onApplyButton(self) -> None:
        if self._run is not None:
            self._run.cancel()
            self.ui.statusLabel.text = _("Cancelling...")
            self._updateButtons()
            return
        pn = self._parameterNode
        volume, model, device, levels, runtime = pn.inputVolume, self._currentModel(), pn.device.value, pn.levels, pn.runtime.value

        def start():
            try:
                return self.logic.startSegmentation(volume, model, device, levels, runtime)
            except InputMismatchError as error:  # checked before the worker starts: minutes saved
                question = _("{reason}.\n\nSegment this volume with this model anyway?").format(reason=error.reason[:1].upper() + error.reason[1:])
                if not slicer.util.confirmYesNoDisplay(question, windowTitle=_("SDM Organ Segmentation")):
                    self.ui.statusLabel.text = _("Not segmented: {reason}.").format(reason=error.reason)
                    return None
                return self.logic.startSegmentation(volume, model, device, levels, runtime, force=True)

        self._run = self._startInBackground(self.ui.statusLabel, _("Starting..."), "segmentation", start, needs={"model": model, "runtime": runtime})
        if self._run is None:
            return
        self._runVolume = pn.inputVolume
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()
        self._updateButtons()
        self._pollTimer.start()

    def _startInBackground(self, statusLabel, starting: str, what: str, start, needs=None):
        """Install the missing packages (after asking), then ``start()`` a background run and return it; None,
        with the reason in ``statusLabel`` (and a message box for errors), when it did not start. ``needs``:
        the ``model`` and ``runtime`` of a segmentation (which runtime to install); None: a training."""
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
            self._showError(_("Unexpected error: {error} (details in the Python console)").format(error=error), statusLabel)
        finally:
            self._setStarting(False)
        return None

    def _onPollRun(self) -> None:
        """Timer tick in the main thread: progress while running; nodes are created here when done."""
        run = self._run
        if run is None:
            self._pollTimer.stop()
            return
        state = run.poll()
        fraction, message = run.progress
        self.ui.progressBar.value = int(round(100 * min(max(fraction, 0.0), 1.0)))
        if state == "running":
            elapsed = time.monotonic() - run.started_at
            self.ui.statusLabel.text = _("Cancelling...") if run.cancel_requested else f"{message} ({elapsed:.0f} s)"
            return
        self._pollTimer.stop()
        self._run = None
        pn = self._parameterNode
        try:
            if state == "done" and pn is None:  # the scene was closed after the run had finished
                self.ui.statusLabel.text = _("The scene was closed during the segmentation; nothing was added.")
            elif state == "done":
                self.ui.statusLabel.text = _("Adding the results to the scene...")
                slicer.app.processEvents()
                outputs = self.logic.createOutputNodes(self._runVolume, run.result(), pn.show2D, pn.show3D)
                self._showOutputs(outputs, time.monotonic() - run.started_at, self._runVolume)
            elif state == "cancelled":
                self.ui.statusLabel.text = _("Cancelled; nothing was added to the scene.")
            else:
                self._showError(run.message)
        except CancelledError:
            self.ui.statusLabel.text = _("Cancelled; nothing was added to the scene.")
        except SDMOrganSegError as error:
            self._showError(str(error))
        except Exception as error:
            logging.exception("SDMOrganSeg could not add the results")
            self._showError(_("Unexpected error: {error} (details in the Python console)").format(error=error))
        finally:
            run.cleanup()
            self._runVolume = None
            self.ui.progressBar.hide()
            self._updateButtons()

    def _showOutputs(self, outputs, seconds: float, volume) -> None:
        self._lastOutputs = outputs
        computed = outputs.computed
        volumes = ", ".join(f"{name} {_lib().format_volume_ml(ml)}" for name, ml in outputs.organ_volumes_ml().items())
        self.ui.outputSummaryLabel.text = _("{model} on {device}, {seconds:.1f} s. Volumes: {volumes}.").format(
            model=computed.model_name, device=computed.device, seconds=seconds, volumes=volumes
        ) + ("\n" + "\n".join(computed.notes) if computed.notes else "")
        self.ui.statusLabel.text = _("Done: added folder '{folder}'.").format(
            folder=slicer.mrmlScene.GetSubjectHierarchyNode().GetItemName(outputs.folder_item)
        )
        self._parameterNode.evaluatedSegmentation = outputs.segmentation
        # Show the segmented volume (the selector may have moved on while the run was going).
        slicer.util.setSliceViewerLayers(background=volume, fit=True)

    def onVisibilityChanged(self, _checked: bool = False) -> None:
        if self._lastOutputs is None or self._parameterNode is None:
            return
        if not slicer.mrmlScene.IsNodePresent(self._lastOutputs.segmentation):
            self._lastOutputs = None
            return
        self.logic.setVisibility(self._lastOutputs, self.ui.show2DCheckBox.checked, self.ui.show3DCheckBox.checked)

    # --- training ---

    def _trainingPairs(self) -> list:
        """The (volume, segmentation) training pairs of the parameter node (a removed node reads as None)."""
        pn = self._parameterNode
        return list(zip(pn.trainingVolumes, pn.trainingSegmentations)) if pn is not None else []

    def _updateTrainingSection(self) -> None:
        pn = self._parameterNode
        if pn is None:
            return
        self._selectTrainingStart(pn.trainingStart)
        fromScene = pn.trainingSource == TrainingSource.SCENE
        self.ui.trainingSceneWidget.setVisible(fromScene)
        self.ui.trainingFolderWidget.setVisible(not fromScene)
        segmentation = pn.trainingSegmentation
        if segmentation is not self._lastTrainingSegmentation:
            # A newly chosen segmentation brings the volume it was made on (a result of this module, for instance).
            self._lastTrainingSegmentation = segmentation
            volume = segmentation.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()) if segmentation else None
            if volume is not None and volume.IsA("vtkMRMLScalarVolumeNode") and volume is not pn.trainingVolume:
                pn.trainingVolume = volume
        self.ui.trainingPairsListWidget.clear()
        for volume, segmentation in self._trainingPairs():
            self.ui.trainingPairsListWidget.addItem(
                f"{volume.GetName() if volume else _('(removed)')} + {segmentation.GetName() if segmentation else _('(removed)')}"
            )

    def _trainingProblems(self) -> list:
        pn = self._parameterNode
        if pn is None:
            return [_("No parameter node.")]
        problems = []
        if pn.trainingSource == TrainingSource.SCENE:
            if len(self._trainingPairs()) < 2:
                problems.append(_("Add at least two volume + segmentation pairs (one in five, at least one, is kept to validate on)."))
        elif not _isSet(pn.trainingDataFolder):
            problems.append(_("Choose a data folder."))
        if not _isSet(pn.trainingOutputFolder):
            problems.append(_("Choose an output folder for the run."))
        return problems

    def _updateTrainButton(self) -> None:
        if self._starting:
            return
        button = self.ui.trainButton
        if self._trainingRun is not None:
            button.text = _("Cancel training")
            button.toolTip = _("Stop the training; the checkpoint of the last finished epoch is kept, and Resume training continues from it")
            button.enabled = not self._trainingRun.cancel_requested
            return
        problems = self._trainingProblems()
        resume = not problems and _lib().can_resume(self._parameterNode.trainingOutputFolder)
        button.text = _("Resume training") if resume else _("Train")
        button.enabled = not problems
        button.toolTip = "\n".join(problems) if problems else (
            _("Continue the run in the output folder from its last checkpoint") if resume
            else _("Train in the background; the model is added to the model selector when done")
        )

    def onAddTrainingPair(self) -> None:
        pn = self._parameterNode
        if pn is None or not pn.trainingSegmentation or not pn.trainingVolume:
            self.ui.trainingStatusLabel.text = _("Choose a segmentation and the volume it was drawn on first.")
            return
        if any(volume is pn.trainingVolume and segmentation is pn.trainingSegmentation for volume, segmentation in self._trainingPairs()):
            self.ui.trainingStatusLabel.text = _("This pair is in the list already.")
            return
        pn.trainingVolumes.append(pn.trainingVolume)
        pn.trainingSegmentations.append(pn.trainingSegmentation)
        self.ui.trainingStatusLabel.text = ""

    def onRemoveTrainingPair(self) -> None:
        pn = self._parameterNode
        row = self.ui.trainingPairsListWidget.currentRow
        if pn is None or not 0 <= row < len(self._trainingPairs()):
            return
        del pn.trainingVolumes[row]
        del pn.trainingSegmentations[row]

    def _currentTrainingStart(self) -> str:
        data = self.ui.trainingStartComboBox.currentData
        return str(data) if data else SCRATCH + "cpu"

    def onTrainButton(self) -> None:
        if self._trainingRun is not None:
            self._trainingRun.cancel()
            self.ui.trainingStatusLabel.text = _("Cancelling: the checkpoint of the last finished epoch is kept...")
            self._updateTrainButton()
            return
        pn = self._parameterNode
        fromScene = pn.trainingSource == TrainingSource.SCENE
        self._trainingRun = self._startInBackground(
            self.ui.trainingStatusLabel, _("Preparing the training data..."), "training",
            lambda: self.logic.startTraining(
                str(pn.trainingOutputFolder), self._currentTrainingStart(), pn.trainingMode.value, pn.trainingEpochs, pn.device.value,
                dataFolder=None if fromScene else str(pn.trainingDataFolder), pairs=self._trainingPairs() if fromScene else None,
            ),
        )
        if self._trainingRun is None:
            return
        self._trainingCurveShown = None
        self.ui.trainingStatusLabel.text = _("Starting the training...")
        self.ui.trainingProgressBar.value = 0
        self.ui.trainingProgressBar.show()
        self._updateTrainButton()
        self._trainingTimer.start()

    def _onPollTraining(self) -> None:
        """Timer tick in the main thread: epoch, loss, validation Dice, ETA and the curves; the model when done."""
        run = self._trainingRun
        if run is None:
            self._trainingTimer.stop()
            return
        state = run.poll()
        progress = run.training_progress()
        if progress is not None:
            self.ui.trainingProgressBar.value = int(round(100 * progress.fraction))
        self._showTrainingCurve(run.run_dir / "curves.png")
        if state == "running":
            if run.cancel_requested:
                self.ui.trainingStatusLabel.text = _("Cancelling: the checkpoint of the last finished epoch is kept...")
            else:
                self.ui.trainingStatusLabel.text = progress.describe() if progress is not None else run.progress[1]
            return
        self._trainingTimer.stop()
        self._trainingRun = None
        try:
            if state == "done":
                result = run.result()
                self._addTrainedModel(result["model_dir"])
                dice = ", ".join(f"{organ} {values['dice']['mean']:.3f}" for organ, values in result.get("summary", {}).items() if "dice" in values)
                before = _(" (before fine-tuning: {dice:.3f} on average)").format(dice=progress.base_dice) if progress and progress.base_dice is not None else ""
                self.ui.trainingStatusLabel.text = _(
                    "Done: the model in {folder} is in the model selector and selected. Validation Dice: {dice}{before}."
                ).format(folder=result["model_dir"], dice=dice, before=before)
            elif state == "cancelled":
                self.ui.trainingStatusLabel.text = _(
                    "Cancelled after epoch {epoch}; the checkpoint is kept in {folder}: Resume training continues from it."
                ).format(epoch=progress.epoch if progress else 0, folder=run.run_dir)
            else:
                self._showError(run.message, self.ui.trainingStatusLabel)
        except SDMOrganSegError as error:
            self._showError(str(error), self.ui.trainingStatusLabel)
        except Exception as error:
            logging.exception("SDMOrganSeg could not add the trained model")
            self._showError(_("Unexpected error: {error} (details in the Python console)").format(error=error), self.ui.trainingStatusLabel)
        finally:
            run.cleanup()
            self.ui.trainingProgressBar.hide()
            self._updateButtons()

    def _showTrainingCurve(self, path: Path) -> None:
        """Show the run's curves.png (loss and validation Dice per epoch) when it is new or has changed."""
        try:
            shown = (str(path), path.stat().st_mtime_ns)
        except OSError:
            return
        if shown == self._trainingCurveShown:
            return
        pixmap = qt.QPixmap(str(path))
        if pixmap.isNull():  # being replaced right now: the next tick shows it
            return
        self._trainingCurveShown = shown
        self.ui.trainingCurveLabel.setPixmap(pixmap.scaledToWidth(min(pixmap.width(), 420), qt.Qt.SmoothTransformation))
        self.ui.trainingCurveLabel.show()

    def _addTrainedModel(self, folder: str) -> None:
        """Put a new model folder in the model selector and select it for the next segmentation."""
        if folder not in self._loadedModelFolders:
            self._loadedModelFolders.append(folder)
        self._populateModelComboBox()
        if self._parameterNode is not None:
            self._parameterNode.model = folder
        self._selectModelInComboBox(folder)

    # --- metrics ---

    def onComputeMetrics(self) -> None:
        pn = self._parameterNode
        self._setStarting(True)
        try:
            if not self._ensureDependencies(forMetricsOnly=True):
                return
            with slicer.util.WaitCursor():
                table = self.logic.computeMetrics(pn.evaluatedSegmentation, pn.referenceSegmentation, pn.segmentMatching.value)
        except SDMOrganSegError as error:
            self._showError(str(error))
            return
        except Exception as error:
            logging.exception("SDMOrganSeg could not compute the metrics")
            self._showError(_("Unexpected error: {error} (details in the Python console)").format(error=error))
            return
        finally:
            self._setStarting(False)
        pn.metricsTable = table
        self.ui.statusLabel.text = _("Metrics computed: table '{name}'.").format(name=table.GetName())

    def onSaveCsv(self) -> None:
        table = self._parameterNode.metricsTable if self._parameterNode else None
        if table is None:
            return
        path = qt.QFileDialog.getSaveFileName(self.parent, _("Save metrics as CSV"), f"{table.GetName()}.csv", _("CSV files (*.csv)"))
        if not path:
            return
        try:
            self.logic.saveTableCsv(table, path)
        except (SDMOrganSegError, OSError) as error:
            self._showError(str(error))
            return
        self.ui.statusLabel.text = _("Saved {path}").format(path=path)

    def _ensureDependencies(self, forMetricsOnly: bool = False, forTraining: bool = False, model: str = "", runtime: str = "auto") -> bool:
        """Install missing Python packages (the Logic asks first); notes in the status bar, GPU label refreshed."""
        ready = self.logic.ensureDependencies(
            askConfirmation=True, forMetricsOnly=forMetricsOnly, forTraining=forTraining, model=model, runtime=runtime
        )
        for note in self.logic.installNotes:
            logging.warning(note)
            slicer.util.showStatusMessage(note, 15000)
        if self.logic.installedPackages:
            self._startDevicesProbe()  # PyTorch may be new or replaced: ask again which GPU it sees
        return ready

    def _showError(self, message: str, statusLabel=None) -> None:
        """A user-facing problem: one plain sentence in the status line (``statusLabel``, default the
        segmentation's) and a message box, no traceback."""
        (statusLabel or self.ui.statusLabel).text = message
        slicer.util.errorDisplay(message, windowTitle=_("SDM Organ Segmentation"))


def _isSet(path) -> bool:
    """Whether a path parameter holds a path (an empty path line edit reads as ".")."""
    return str(path).strip() not in ("", ".")


#
# SDMOrganSegLogic
#


class SDMOrganSegLogic(ScriptedLoadableModuleLogic):
    """Usable without the panel; delegates to ``SDMOrganSegLib.mrml.mrmllogic`` (shared with the batch script)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        #: What the last ensureDependencies call installed (pip requirements), and its notes for the user.
        self.installedPackages: list[str] = []
        self.installNotes: list[str] = []

    def getParameterNode(self) -> SDMOrganSegParameterNode:
        return SDMOrganSegParameterNode(super().getParameterNode())

    # --- models (read without PyTorch, so the panel opens before any installation) ---

    def shippedModels(self) -> dict[str, Path]:
        """Shipped model name -> folder (``Resources/Models``, or ``SDMORGANSEG_MODELS``)."""
        return modelfiles.shipped_models()

    def resolveModel(self, model: str) -> Path:
        """A model folder from a shipped model name or a folder path; empty: the default shipped model."""
        if not model and DEFAULT_MODEL not in self.shippedModels():
            raise SDMOrganSegError(_("no model is installed; load a model folder"))
        path = modelfiles.resolve_model(model or None)
        if not (path / MODEL_CARD_FILE).is_file():
            raise SDMOrganSegError(_("model folder {folder} has no {card}; choose an SDMOrganSeg model folder").format(folder=model, card=MODEL_CARD_FILE))
        return path

    def readModelCard(self, model: str) -> Optional[dict[str, Any]]:
        """The checked model card as a dict, or None when the model cannot be found or read."""
        try:
            return modelfiles.read_card(self.resolveModel(model)).to_dict()
        except SDMOrganSegError:
            return None

    # --- dependencies ---

    @staticmethod
    def missingPackages(forMetricsOnly: bool = False) -> list[str]:
        """pip requirements of the required packages that are missing or too old (the network's runtime not included)."""
        wanted = [r for r in dependencies.REQUIRED if not forMetricsOnly or r.module in dependencies.FOR_METRICS]
        return [requirement.pip for requirement, _reason in dependencies.unmet(wanted)]

    def runtimeRequirements(self, model: str = "", runtime: str = "auto") -> tuple:
        """What runs the network of a segmentation with ``model`` on ``runtime``: ONNX Runtime for a model with
        model.onnx (every shipped model), PyTorch for ``torch`` or a model without it."""
        card = self.readModelCard(model)
        return dependencies.for_segmentation(runtime, bool(card and card.get("onnx")))

    def ensureDependencies(self, askConfirmation: bool = True, forMetricsOnly: bool = False, forTraining: bool = False,
                           model: str = "", runtime: str = "auto") -> bool:
        """Install the packages that are missing or too old, after the user agrees; False if the user declined.

        A segmentation needs ONNX Runtime (or, for ``runtime`` torch or a ``model`` without model.onnx, PyTorch);
        training and fine-tuning need PyTorch and the ONNX exporter (``forTraining``); the metrics only scipy.
        PyTorch comes from the PyTorch extension's PyTorchUtils when it is installed (light-the-torch picks the
        build that matches the NVIDIA driver), otherwise from pip. The other required packages are installed
        with pip in one go; each optional one (``isal``) on its own, and skipped with a note if that fails.
        A failed install raises SDMOrganSegError with one line.
        """
        self.installedPackages, self.installNotes = [], []
        if forMetricsOnly:
            required = []
        elif forTraining:
            required = list(dependencies.FOR_TRAINING)
        else:
            required = list(self.runtimeRequirements(model, runtime))
        required += [r for r in dependencies.REQUIRED if not forMetricsOnly or r.module in dependencies.FOR_METRICS]
        # A package this Slicer has imported cannot be replaced under it (as TotalSegmentator refuses too).
        loaded = [message for message in map(dependencies.loaded_too_old, required) if message]
        if loaded:
            raise SDMOrganSegError(loaded[0])
        unmetRequired = dependencies.unmet(required)
        # Optional packages are offered once per session: one without a wheel for this platform would
        # otherwise be asked for again at every run.
        unmetOptional = [] if forMetricsOnly or SDMOrganSegLogic._optionalOffered else dependencies.unmet(dependencies.OPTIONAL)
        if not unmetRequired and not unmetOptional:
            return True
        SDMOrganSegLogic._optionalOffered = True
        if askConfirmation:
            text = _("SDM Organ Segmentation needs these Python packages:\n\n{packages}\n\n").format(
                packages=dependencies.describe(unmetRequired)) if unmetRequired else ""
            if unmetOptional:
                text += _("Optional (skipped if they cannot be installed):\n\n{packages}\n\n").format(packages=dependencies.describe(unmetOptional))
            if any(requirement is dependencies.TORCH for requirement, _reason in unmetRequired):
                text += _("PyTorch is large: about 0.2 GB to download for computers without an NVIDIA GPU, 2-3 GB with one "
                          "(1-6 GB on disk); the installation can take 5-20 minutes.\n\n")
            text += _("Install them now? This needs a network connection.")
            if not slicer.util.confirmOkCancelDisplay(text, windowTitle=_("Install Python packages")):
                return not unmetRequired  # without the optional ones the module works, more slowly
        with slicer.util.WaitCursor():
            others = [requirement for requirement, _reason in unmetRequired if requirement is not dependencies.TORCH]
            if len(others) < len(unmetRequired) and not self._installTorch():
                return False
            if others:
                self._pipInstall([requirement.pip for requirement in others])
            for requirement, _reason in unmetOptional:
                try:
                    slicer.util.pip_install([requirement.pip])
                except Exception as error:  # e.g. no wheel for this platform: the module works without it
                    logging.exception("pip install %s failed", requirement.pip)
                    self.installNotes.append(_("Optional package {name} was not installed ({detail}): it only {purpose}.").format(
                        name=requirement.distribution, detail=dependencies.failure_detail(error), purpose=requirement.purpose))
                else:
                    self.installedPackages.append(requirement.pip)
        importlib.invalidate_caches()
        stillUnmet = dependencies.unmet(required)
        if stillUnmet:
            raise SDMOrganSegError(_("after the installation {packages} still does not meet the requirement ({reason}); restart Slicer and try again").format(
                packages=stillUnmet[0][0].distribution, reason=stillUnmet[0][1]))
        return True

    #: Whether the optional packages were offered in this Slicer session.
    _optionalOffered = False

    def _pipInstall(self, requirements: list[str]) -> None:
        """slicer.util.pip_install, with a failure turned into one line (pip's output is in the Python console)."""
        try:
            slicer.util.pip_install(requirements)
        except Exception as error:  # CalledProcessError, OSError, ...: pip's details are in the console already
            logging.exception("pip install %s failed", " ".join(requirements))
            raise SDMOrganSegError(dependencies.install_failure(error, " ".join(requirements))) from None
        self.installedPackages.extend(requirements)

    def _installTorch(self) -> bool:
        """Install or upgrade PyTorch (the user has agreed already); False if PyTorchUtils was declined."""
        requirement = dependencies.TORCH
        try:
            import PyTorchUtils  # the PyTorch extension
        except ImportError:
            PyTorchUtils = None
        if PyTorchUtils is None:
            self.installNotes.append(_("PyTorch was installed with pip; for the build that matches your GPU driver, "
                                       "install the PyTorch extension from the Extensions Manager."))
            self._pipInstall([requirement.pip])
        else:
            try:
                torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=f">={requirement.minimum}")
            except Exception as error:  # light-the-torch or pip failed
                logging.exception("PyTorchUtils could not install PyTorch")
                raise SDMOrganSegError(dependencies.install_failure(error, requirement.pip)) from None
            if torch is None:
                return False
            self.installedPackages.append(requirement.pip)
        return True

    # --- segmentation ---

    def segment(self, volumeNode, model: str = "", device: str = "auto", levels: str = "0, 0.1, 0.2, 0.3",
                show2D: bool = True, show3D: bool = True, progress=None, cancel=None, runtime: str = "auto"):
        """Segment in this process, blocking (scripts and tests); returns ``mrmllogic.OutputNodes``."""
        modelDir = self.resolveModel(model) if not isinstance(model, Path) else model
        return _lib().SDMSegmentationLogic(slicer.mrmlScene).segment_volume(
            volumeNode, modelDir, device, levels, show2D, show3D, progress, cancel, runtime=runtime
        )

    def startSegmentation(self, volumeNode, model: str, device: str, levels: str, runtime: str = "auto", force: bool = False):
        """Start a segmentation in a background process; returns a ``mrmllogic.BackgroundRun`` to poll.

        An image of another modality than the model's is refused here, before the worker starts, with
        :class:`InputMismatchError` (whose ``reason`` the panel puts to the user), unless ``force``."""
        lib = _lib()
        modelDir = self.resolveModel(model)
        image = lib.volume_node_to_sitk(volumeNode)
        if not force:
            from SDMOrganSegLib.method.plausibility import modality_mismatch

            card = modelfiles.read_card(modelDir)
            reason = modality_mismatch(image, card.modality, card.field_of_view)
            if reason:
                raise InputMismatchError(reason + _("; or segment it anyway"), reason=reason)
        run = lib.BackgroundRun(
            image, modelDir, device, levels, python=lib.python_executable(), env=slicer.util.startupEnvironment(),
            workdir=slicer.app.temporaryPath, force=force, runtime=runtime,
        )
        run.start()
        return run

    def createOutputNodes(self, volumeNode, computed, show2D: bool = True, show3D: bool = True):
        """Add the nodes of a finished background run (main thread only)."""
        return _lib().SDMSegmentationLogic(slicer.mrmlScene).create_nodes(volumeNode, computed, show2D, show3D)

    def setVisibility(self, outputs, show2D: bool, show3D: bool) -> None:
        _lib().SDMSegmentationLogic(slicer.mrmlScene).set_visibility(outputs, show2D, show3D)

    # --- training ---

    @staticmethod
    def trainingPresets() -> dict:
        """Networks trained from scratch: preset name -> description."""
        return {"cpu": _("small (cpu preset; trains on a CPU)"), "paper": _("the paper's (paper preset; needs a GPU)")}

    def prepareTraining(self, outputFolder: str, start: str, mode: str, epochs: int, device: str = "auto",
                        dataFolder: Optional[str] = None, pairs=None) -> dict:
        """The training request: the scene's (volume, segmentation) ``pairs`` written to ``outputFolder``/data (or
        ``dataFolder``), and the settings, those of the model ``start`` when fine-tuning (or ``scratch:<preset>``)."""
        return _lib().prepare_training(outputFolder, start, mode, epochs, device, data_dir=dataFolder, pairs=pairs, scene=slicer.mrmlScene)

    def startTraining(self, outputFolder: str, start: str, mode: str, epochs: int, device: str = "auto",
                      dataFolder: Optional[str] = None, pairs=None):
        """Start a training (or resume the one in ``outputFolder``) in a background process; returns a
        ``mrmltraining.TrainingRun`` to poll."""
        lib = _lib()
        config = self.prepareTraining(outputFolder, start, mode, epochs, device, dataFolder, pairs)
        run = lib.TrainingRun(config, python=lib.python_executable(), env=slicer.util.startupEnvironment(), workdir=slicer.app.temporaryPath)
        run.start()
        return run

    # --- metrics ---

    def computeMetrics(self, segmentationNode, referenceSegmentationNode, matching: str = "name"):
        """Metrics table node (Organ, Dice, HD, HD95, ASD) of a segmentation against a reference."""
        return _lib().compute_metrics(segmentationNode, referenceSegmentationNode, matching=matching, scene=slicer.mrmlScene)

    def saveTableCsv(self, tableNode, path: str) -> Path:
        return _lib().save_table_csv(tableNode, path)


#
# SDMOrganSegTest
#


class SDMOrganSegTest(ScriptedLoadableModuleTest):
    """Runs the Logic on a real volume node, as the panel does, and checks the nodes it adds."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SegmentAndMeasure()
        self.setUp()
        self.test_BadLevelsLeaveSceneUnchanged()

    def _testVolume(self):
        """A hippocampus case of the repository's test data, else a synthetic ellipsoid phantom."""
        data = Path(os.environ.get("SDMORGANSEG_TESTING_DATA", _moduleDir().parent / "Testing" / "Data"))
        case = data / "hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"
        if case.is_file():
            return slicer.util.loadVolume(str(case)), data / "hippocampus" / "labelsTr" / case.name
        import numpy as np

        z, y, x = np.mgrid[:32, :40, :36]
        phantom = 100.0 * (((x - 18) / 10) ** 2 + ((y - 20) / 12) ** 2 + ((z - 16) / 8) ** 2 < 1) + np.random.default_rng(0).normal(0, 5, z.shape)
        volume = slicer.util.addVolumeFromArray(phantom.astype(np.float32), name="phantom")
        return volume, None

    def _testModel(self) -> Path:
        """The shipped default model, else a small random-weight model written to the temporary folder."""
        logic = SDMOrganSegLogic()
        if DEFAULT_MODEL in logic.shippedModels():
            return logic.shippedModels()[DEFAULT_MODEL]
        from SDMOrganSegLib.formats import modelfiles
        from SDMOrganSegLib.method import network

        folder = Path(slicer.app.temporaryPath) / "SDMOrganSegTestModel"
        if not (folder / MODEL_CARD_FILE).is_file():
            net = network.UNet3D(network.preset("cpu", 1, 2))
            organs = [modelfiles.Organ("anterior hippocampus", 1, (0.9, 0.3, 0.2)), modelfiles.Organ("posterior hippocampus", 2, (0.2, 0.5, 0.9))]
            modelfiles.save_model(net, modelfiles.ModelCard(name="test-random", architecture=net.config, organs=organs), folder, overwrite=True)
        return folder

    def test_SegmentAndMeasure(self):
        self.delayDisplay("Starting the test")
        logic = SDMOrganSegLogic()
        self.assertTrue(logic.ensureDependencies(askConfirmation=False))
        volume, labelsPath = self._testVolume()
        modelDir = self._testModel()
        card = json.loads((modelDir / MODEL_CARD_FILE).read_text(encoding="utf-8"))

        outputs = logic.segment(volume, modelDir, device="cpu", levels="0, 0.1, 0.2, 0.3")

        segmentation = outputs.segmentation.GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), len(card["organs"]))
        for index, organ in enumerate(card["organs"]):
            segment = segmentation.GetNthSegment(index)
            self.assertEqual(segment.GetName(), organ["name"])
            for got, expected in zip(segment.GetColor(), organ["color"]):
                self.assertAlmostEqual(got, expected, places=5)
        self.assertEqual(outputs.segmentation.GetNodeReference("referenceImageGeometryRef"), volume)
        for organ in card["organs"]:
            sdm = outputs.sdm_volumes[organ["name"]]
            self.assertEqual(sdm.GetImageData().GetDimensions(), volume.GetImageData().GetDimensions())
            self.assertEqual(len(outputs.contours[organ["name"]]), 4)

        if labelsPath is not None and labelsPath.is_file():
            reference = slicer.util.loadSegmentation(str(labelsPath))
            matching = "order"
        else:
            reference, matching = outputs.segmentation, "name"
        table = logic.computeMetrics(outputs.segmentation, reference, matching)
        self.assertEqual(table.GetNumberOfRows(), len(card["organs"]))
        if reference is outputs.segmentation:
            self.assertAlmostEqual(float(table.GetTable().GetValueByName(0, "Dice").ToDouble()), 1.0)
        self.delayDisplay("Test passed")

    def test_BadLevelsLeaveSceneUnchanged(self):
        logic = SDMOrganSegLogic()
        volume, _labels = self._testVolume()
        before = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(SDMOrganSegError):
            logic.segment(volume, self._testModel(), device="cpu", levels="0, 5")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)
