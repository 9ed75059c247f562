"""The Training section: fine-tuning (or training from scratch) on the scene's volume + segmentation pairs or
a data folder, in the background; progress, curves, and the new model put in the model selector."""

from __future__ import annotations

import logging
from pathlib import Path

from ...common.errors import SDMOrganSegError
from ...formats.modelfiles import DEFAULT_MODEL
from ..dependencies import translated as _
from .section import SCRATCH, PanelSection, TrainingMode, TrainingSource, _isSet, _lib, _unexpected
from .segmentation import SegmentationPanel


class TrainingPanel(PanelSection):
    """Training cases (scene pairs or a data folder), the model to start from, loss, epochs, output folder;
    Train/Cancel/Resume, progress with the curves, and the new model put in the model selector."""

    POLL_INTERVAL_MS = 1000

    def __init__(self, widget) -> None:
        import qt

        super().__init__(widget)
        self.run = None  # mrmltraining.TrainingRun while a training runs
        self.curveShown = None  # (path, modification time) of the curve image shown
        self.lastSegmentation = None
        self.timer = qt.QTimer()
        self.timer.setInterval(self.POLL_INTERVAL_MS)
        self.timer.connect("timeout()", self.onPoll)

    @property
    def models(self) -> SegmentationPanel:
        """The section that keeps the model list (both combo boxes)."""
        return self.widget.segmentation

    def setup(self) -> None:
        self.ui.trainingStartComboBox.connect("currentIndexChanged(int)", self.onTrainingStartChanged)
        self.ui.addTrainingPairButton.connect("clicked(bool)", self.onAddTrainingPair)
        self.ui.removeTrainingPairButton.connect("clicked(bool)", self.onRemoveTrainingPair)
        self.ui.trainButton.connect("clicked(bool)", self.onTrainButton)
        self.ui.trainingProgressBar.setRange(0, 100)
        self.ui.trainingProgressBar.hide()
        self.ui.trainingStatusLabel.text = ""
        self.ui.trainingCurveLabel.hide()

    def stop(self) -> None:
        """Kill the training worker (a killed training keeps its last checkpoint: the same folder resumes it)."""
        self.timer.stop()
        if self.run is not None:
            self.run.cleanup()
            self.run = None

    def _selectTrainingStart(self, start: str) -> None:
        wanted = start or (DEFAULT_MODEL if DEFAULT_MODEL in self.logic.shippedModels() else SCRATCH + "cpu")
        if not wanted.startswith(SCRATCH):
            self.models.knowFolder(wanted)
        combo = self.ui.trainingStartComboBox
        index = combo.findData(wanted)
        self.models.updatingModelCombo = True
        try:
            combo.currentIndex = index if index >= 0 else 0
        finally:
            self.models.updatingModelCombo = False

    def onTrainingStartChanged(self, index: int) -> None:
        if self.models.updatingModelCombo or self.parameterNode is None:
            return
        start = self.ui.trainingStartComboBox.itemData(index) or ""
        self.parameterNode.trainingStart = start
        mode = _lib().training_mode_of(start)
        if mode is not None:  # a model to fine-tune brings its loss: its network's heads and output fix it
            self.parameterNode.trainingMode = TrainingMode(mode)

    def _currentTrainingStart(self) -> str:
        data = self.ui.trainingStartComboBox.currentData
        return str(data) if data else SCRATCH + "cpu"

    def _fromScene(self) -> bool:
        return self.parameterNode.trainingSource == TrainingSource.SCENE

    def _trainingPairs(self) -> list:
        """The (volume, segmentation) training pairs of the parameter node (a removed node reads as None)."""
        pn = self.parameterNode
        return list(zip(pn.trainingVolumes, pn.trainingSegmentations)) if pn is not None else []

    def updateSection(self) -> None:
        import slicer

        pn = self.parameterNode
        if pn is None:
            return
        self._selectTrainingStart(pn.trainingStart)
        fromScene = self._fromScene()
        self.ui.trainingSceneWidget.setVisible(fromScene)
        self.ui.trainingFolderWidget.setVisible(not fromScene)
        segmentation = pn.trainingSegmentation
        if segmentation is not self.lastSegmentation:
            # A newly chosen segmentation brings the volume it was made on (a result of this module, for instance).
            self.lastSegmentation = segmentation
            volume = segmentation.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()) if segmentation else None
            if volume is not None and volume.IsA("vtkMRMLScalarVolumeNode") and volume is not pn.trainingVolume:
                pn.trainingVolume = volume
        self.ui.trainingPairsListWidget.clear()
        for volume, segmentation in self._trainingPairs():
            self.ui.trainingPairsListWidget.addItem(
                f"{volume.GetName() if volume else _('(removed)')} + {segmentation.GetName() if segmentation else _('(removed)')}"
            )

    def _trainingProblems(self) -> list:
        pn = self.parameterNode
        if pn is None:
            return [_("No parameter node.")]
        problems = []
        if self._fromScene():
            if len(self._trainingPairs()) < 2:
                problems.append(_("Add at least two volume + segmentation pairs (one in five, at least one, is kept to validate on)."))
        elif not _isSet(pn.trainingDataFolder):
            problems.append(_("Choose a data folder."))
        if not _isSet(pn.trainingOutputFolder):
            problems.append(_("Choose an output folder for the run."))
        return problems

    def updateTrainButton(self) -> None:
        if self.widget._starting:
            return
        button = self.ui.trainButton
        if self.run is not None:
            button.text = _("Cancel training")
            button.toolTip = _("Stop the training; the checkpoint of the last finished epoch is kept, and Resume training continues from it")
            button.enabled = not self.run.cancel_requested
            return
        problems = self._trainingProblems()
        resume = not problems and _lib().can_resume(self.parameterNode.trainingOutputFolder)
        button.text = _("Resume training") if resume else _("Train")
        button.enabled = not problems
        button.toolTip = "\n".join(problems) if problems else (
            _("Continue the run in the output folder from its last checkpoint") if resume
            else _("Train in the background; the model is added to the model selector when done")
        )

    def onAddTrainingPair(self) -> None:
        pn = self.parameterNode
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
        pn = self.parameterNode
        row = self.ui.trainingPairsListWidget.currentRow
        if pn is None or not 0 <= row < len(self._trainingPairs()):
            return
        del pn.trainingVolumes[row]
        del pn.trainingSegmentations[row]

    def onTrainButton(self) -> None:
        if self.run is not None:
            self.run.cancel()
            self.ui.trainingStatusLabel.text = _("Cancelling: the checkpoint of the last finished epoch is kept...")
            self.updateTrainButton()
            return
        pn = self.parameterNode
        fromScene = self._fromScene()
        self.run = self._startInBackground(
            self.ui.trainingStatusLabel, _("Preparing the training data..."), "training",
            lambda: self.logic.startTraining(
                str(pn.trainingOutputFolder), self._currentTrainingStart(), pn.trainingMode.value, pn.trainingEpochs, pn.device.value,
                dataFolder=None if fromScene else str(pn.trainingDataFolder), pairs=self._trainingPairs() if fromScene else None,
            ),
        )
        if self.run is None:
            return
        self.curveShown = None
        self.ui.trainingStatusLabel.text = _("Starting the training...")
        self.ui.trainingProgressBar.value = 0
        self.ui.trainingProgressBar.show()
        self.updateTrainButton()
        self.timer.start()

    def onPoll(self) -> None:
        """Timer tick in the main thread: epoch, loss, validation Dice, ETA and the curves; the model when done."""
        run = self.run
        if run is None:
            self.timer.stop()
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
        self.timer.stop()
        self.run = None
        try:
            if state == "done":
                result = run.result()
                self.models.addModelFolder(result["model_dir"])
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
            self._showError(_unexpected(error), self.ui.trainingStatusLabel)
        finally:
            run.cleanup()
            self.ui.trainingProgressBar.hide()
            self.widget._updateButtons()

    def _showTrainingCurve(self, path: Path) -> None:
        """Show the run's curves.png (loss and validation Dice per epoch) when it is new or has changed."""
        import qt

        try:
            shown = (str(path), path.stat().st_mtime_ns)
        except OSError:
            return
        if shown == self.curveShown:
            return
        pixmap = qt.QPixmap(str(path))
        if pixmap.isNull():  # being replaced right now: the next tick shows it
            return
        self.curveShown = shown
        self.ui.trainingCurveLabel.setPixmap(pixmap.scaledToWidth(min(pixmap.width(), 420), qt.Qt.SmoothTransformation))
        self.ui.trainingCurveLabel.show()
