"""SDM Organ Segmentation: a 3D Slicer module that segments organs by predicting signed distance maps.

This file is the module, the panel's shell and the Logic facade; everything else is in the library's Slicer
side, ``SDMOrganSegLib.mrml``, of which it imports only the public names (``SDMOrganSegLib.mrml.__all__``).
The panel (Widget) loads the .ui file, binds it to a parameter node and hands each section to its class
(``mrml.panels``: segmentation, training, metrics); the Logic delegates to ``mrml.mrmllogic`` (which the
batch script and the tests use too). Heavy Python packages (PyTorch and friends) are checked only when a run
or a metrics computation starts, and installed only after the user agrees (``mrml.dependencies``).
"""

# No "from __future__ import annotations": parameterNodeWrapper reads the parameter node's annotations
# with typing.get_type_hints, which needs them to be real types, not strings.

import logging
import os
import pathlib
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

# Only the light public names of the library's Slicer side: Slicer imports every module at start-up.
from SDMOrganSegLib.mrml import CARD_FILE as MODEL_CARD_FILE
from SDMOrganSegLib.mrml import (
    DEFAULT_MODEL, DeviceChoice, InputMismatchError, RuntimeChoice, SDMOrganSegError, SegmentMatching, TrainingMode, TrainingSource,
    dependencies, moduletest, panels, read_card, resolve_model, shipped_models,
)


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
    trainingMode: TrainingMode = TrainingMode.DUAL  # the default model's (hippocampus)
    trainingEpochs: Annotated[int, WithinRange(1, 10000)] = 20
    trainingOutputFolder: pathlib.Path


#
# SDMOrganSegWidget
#


class SDMOrganSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel's shell: the .ui file, the Logic and the parameter node; each section is a class of its own
    (``panels.SegmentationPanel``, ``TrainingPanel``, ``MetricsPanel``), every computation is in the Logic."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[SDMOrganSegLogic] = None
        self._parameterNode: Optional[SDMOrganSegParameterNode] = None
        self._parameterNodeGuiTag = None
        #: True from a click on Apply, Train or Compute until the run has started (packages may be installed
        #: meanwhile, and pip's output loop processes events: a second click must find the buttons disabled).
        self._starting = False
        self.segmentation = panels.SegmentationPanel(self)
        self.training = panels.TrainingPanel(self)
        self.metrics = panels.MetricsPanel(self)

    # The sections' runs, as scripts (and the tests) reach them on the widget.
    _run = property(lambda self: self.segmentation.run, lambda self, run: setattr(self.segmentation, "run", run))
    _trainingRun = property(lambda self: self.training.run, lambda self, run: setattr(self.training, "run", run))
    _devicesProbe = property(lambda self: self.segmentation.devicesProbe, lambda self, probe: setattr(self.segmentation, "devicesProbe", probe))
    _loadedModelFolders = property(lambda self: self.segmentation.loadedModelFolders)

    def _onPollRun(self) -> None:
        self.segmentation.onPollRun()

    def _onPollTraining(self) -> None:
        self.training.onPoll()

    def _startDevicesProbe(self) -> None:
        self.segmentation.startDevicesProbe()

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

        for section in (self.segmentation, self.metrics, self.training):
            section.setup()
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
        self.segmentation.stop()
        self.training.stop()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self.segmentation.onSceneStartClose()
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
        self.segmentation.selectModelInComboBox(self._parameterNode.model if self._parameterNode else "")
        self.metrics.showTable()
        self.training.updateSection()
        self._updateButtons()

    # --- what the sections share ---

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
        if self.segmentation.updateApplyButton():
            return  # a segmentation runs: Apply is its Cancel button
        self.metrics.updateButtons()
        self.training.updateTrainButton()

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
        return shipped_models()

    def resolveModel(self, model: str) -> Path:
        """A model folder from a shipped model name or a folder path; empty: the default shipped model."""
        if not model and DEFAULT_MODEL not in self.shippedModels():
            raise SDMOrganSegError(_("no model is installed; load a model folder"))
        path = resolve_model(model or None)
        if not (path / MODEL_CARD_FILE).is_file():
            raise SDMOrganSegError(_("model folder {folder} has no {card}; choose an SDMOrganSeg model folder").format(folder=model, card=MODEL_CARD_FILE))
        return path

    def readModelCard(self, model: str) -> Optional[dict[str, Any]]:
        """The checked model card as a dict, or None when the model cannot be found or read."""
        try:
            return read_card(self.resolveModel(model)).to_dict()
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
        """Install the packages that are missing or too old, after the user agrees; False if the user declined
        (``dependencies.Installation``, where ``installedPackages`` and ``installNotes`` come from).

        A segmentation needs ONNX Runtime (or, for ``runtime`` torch or a ``model`` without model.onnx, PyTorch);
        training and fine-tuning need PyTorch and the ONNX exporter (``forTraining``); the metrics only scipy.
        The optional packages (``isal``) are offered once per Slicer session. A failed install raises
        SDMOrganSegError with one line.
        """
        if forMetricsOnly:
            required = []
        elif forTraining:
            required = list(dependencies.FOR_TRAINING)
        else:
            required = list(self.runtimeRequirements(model, runtime))
        required += [r for r in dependencies.REQUIRED if not forMetricsOnly or r.module in dependencies.FOR_METRICS]
        installation = dependencies.Installation()
        try:
            return installation.run(required, offer_optional=not forMetricsOnly and not SDMOrganSegLogic._optionalOffered, ask=askConfirmation)
        finally:
            self.installedPackages, self.installNotes = installation.installed, installation.notes
            SDMOrganSegLogic._optionalOffered = SDMOrganSegLogic._optionalOffered or installation.offered_optional

    #: Whether the optional packages were offered in this Slicer session.
    _optionalOffered = False

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
            card = read_card(modelDir)
            reason = lib.modality_mismatch(image, card.modality, card.field_of_view)
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


class SDMOrganSegTest(moduletest.ModuleTest, ScriptedLoadableModuleTest):
    """The module's self-test (``moduletest.ModuleTest``): the Logic on a real volume node, as the panel runs it."""

    def newLogic(self):
        return SDMOrganSegLogic()
