"""The Segmentation section: input volume, model (shipped or a loaded folder), device, levels, Apply/Cancel,
progress and the outputs; the GPU label."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import time
from pathlib import Path
from typing import Optional

from ...common.errors import CancelledError, InputMismatchError, SDMOrganSegError
from ...formats.modelfiles import CARD_FILE as MODEL_CARD_FILE
from ...formats.modelfiles import DEFAULT_MODEL
from ..dependencies import translated as _
from .section import LOAD_MODEL_FOLDER, SCRATCH, PanelSection, _lib, _unexpected


class SegmentationPanel(PanelSection):
    """Input volume, model (shipped or a loaded folder), device, levels, Apply/Cancel, progress and the outputs;
    the GPU label (a probe process asks PyTorch which GPU it sees)."""

    POLL_INTERVAL_MS = 200

    def __init__(self, widget) -> None:
        import qt

        super().__init__(widget)
        self.run = None  # mrmllogic.BackgroundRun while a segmentation runs
        self.runVolume = None
        self.lastOutputs = None
        #: Model folders the user loaded (or a training made) this session: in both model combo boxes.
        self.loadedModelFolders: list[str] = []
        self.updatingModelCombo = False
        self.devicesProbe: Optional[subprocess.Popen] = None
        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(self.POLL_INTERVAL_MS)
        self.pollTimer.connect("timeout()", self.onPollRun)

    def setup(self) -> None:
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.show2DCheckBox.connect("toggled(bool)", self.onVisibilityChanged)
        self.ui.show3DCheckBox.connect("toggled(bool)", self.onVisibilityChanged)
        self.ui.progressBar.setRange(0, 100)
        self.ui.progressBar.hide()
        self.ui.statusLabel.text = ""
        self.ui.outputSummaryLabel.text = _("No segmentation yet.")
        self.populateModelComboBox()

    def stop(self) -> None:
        """Kill the worker and the GPU probe, each with every process it started."""
        self.pollTimer.stop()
        if self.run is not None:
            self.run.cleanup()
            self.run = None
        if self.devicesProbe is not None:
            _lib().kill_process_tree(self.devicesProbe)
            self.devicesProbe = None

    def onSceneStartClose(self) -> None:
        if self.run is not None:
            self.run.cancel()  # its input volume is about to disappear
        self.lastOutputs = None

    # --- model selection (both combo boxes: the training section starts from the same models) ---

    def _modelEntries(self) -> list:
        """(label, item data) of the shipped models and the loaded model folders (named as their cards say)."""
        entries = [(name, name) for name in self.logic.shippedModels()]
        for folder in self.loadedModelFolders:
            card = self.logic.readModelCard(folder)
            entries.append((_("{name} (folder)").format(name=card["name"] if card else Path(folder).name), folder))
        return entries

    def populateModelComboBox(self) -> None:
        combo = self.ui.modelComboBox
        self.updatingModelCombo = True
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
            self.updatingModelCombo = False

    def knowFolder(self, folder: str) -> None:
        """A model folder saved in the scene, not yet in the combo boxes: add it."""
        if folder not in self.logic.shippedModels() and folder not in self.loadedModelFolders and Path(folder).is_dir():
            self.loadedModelFolders.append(folder)
            self.populateModelComboBox()

    def selectModelInComboBox(self, model: str) -> None:
        combo = self.ui.modelComboBox
        wanted = model or (DEFAULT_MODEL if DEFAULT_MODEL in self.logic.shippedModels() else "")
        if wanted:
            self.knowFolder(wanted)
        index = combo.findData(wanted)
        self.updatingModelCombo = True
        try:
            combo.currentIndex = index if index >= 0 else 0
        finally:
            self.updatingModelCombo = False
        self._updateModelInfo()

    def onModelChanged(self, index: int) -> None:
        import qt

        pn = self.parameterNode
        if self.updatingModelCombo or pn is None:
            return
        data = self.ui.modelComboBox.itemData(index)
        if data == LOAD_MODEL_FOLDER:
            folder = qt.QFileDialog.getExistingDirectory(self.widget.parent, _("Choose a model folder (holding model.json and model.safetensors)"))
            if folder:
                if not (Path(folder) / MODEL_CARD_FILE).is_file():
                    self._showError(_("{folder} has no {card}; it is not an SDMOrganSeg model folder").format(folder=folder, card=MODEL_CARD_FILE))
                elif folder not in self.loadedModelFolders:
                    self.loadedModelFolders.append(folder)
                    self.populateModelComboBox()
                if (Path(folder) / MODEL_CARD_FILE).is_file():
                    pn.model = folder
            self.selectModelInComboBox(pn.model)  # back to a real entry
            return
        pn.model = data or ""

    def addModelFolder(self, folder: str) -> None:
        """Put a new model folder in the model selector and select it for the next segmentation."""
        if folder not in self.loadedModelFolders:
            self.loadedModelFolders.append(folder)
        self.populateModelComboBox()
        if self.parameterNode is not None:
            self.parameterNode.model = folder
        self.selectModelInComboBox(folder)

    def _updateModelInfo(self) -> None:
        card = self.logic.readModelCard(self.currentModel())
        if card is None:
            self.ui.modelInfoLabel.text = _("No model: install one or load a model folder.")
            return
        organs = ", ".join(organ.get("name", "?") for organ in card.get("organs", []))
        description = card.get("description") or card.get("name", "")
        self.ui.modelInfoLabel.text = _("Organs: {organs}").format(organs=organs) + (f"\n{description}" if description else "")

    def currentModel(self) -> str:
        data = self.ui.modelComboBox.currentData
        return "" if data in (None, LOAD_MODEL_FOLDER) else str(data)

    # --- devices ---

    def startDevicesProbe(self) -> None:
        import qt
        import slicer

        if importlib.util.find_spec("torch") is None:
            self.ui.gpuLabel.text = _("PyTorch is not installed: models with model.onnx (the shipped ones) run on ONNX Runtime, "
                                      "on the CPU; PyTorch is offered when you train, or for a model without model.onnx.")
            return
        if self.devicesProbe is not None:  # a probe from before an install: it would report the old state
            _lib().kill_process_tree(self.devicesProbe)
            self.devicesProbe = None
        try:
            command = _lib().probe_devices_command(_lib().python_executable())
            self.devicesProbe = _lib().start_process(
                command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True,
                env=slicer.util.startupEnvironment(),
            )
        except (OSError, SDMOrganSegError) as error:
            self.ui.gpuLabel.text = _("Could not check for a GPU: {error}").format(error=error)
            return
        self.ui.gpuLabel.text = _("Checking for a GPU...")
        qt.QTimer.singleShot(500, self._pollDevicesProbe)

    def _pollDevicesProbe(self) -> None:
        import qt

        probe = self.devicesProbe
        if probe is None:
            return
        if probe.poll() is None:
            qt.QTimer.singleShot(500, self._pollDevicesProbe)
            return
        output = (probe.communicate()[0] or "").strip().splitlines()
        self.devicesProbe = None
        found = output[-1] if output else ""
        if found.startswith("cuda: "):
            self.ui.gpuLabel.text = _("GPU found: {name}").format(name=found[len("cuda: "):])
        elif found == "cpu":
            self.ui.gpuLabel.text = _("No CUDA GPU found: the network will run on the CPU.")
        else:
            self.ui.gpuLabel.text = _("Could not check for a GPU (PyTorch did not start).")

    # --- the run ---

    def updateApplyButton(self) -> bool:
        """Apply (or Cancel while a segmentation runs: then True, and the other buttons are left as they are)."""
        if self.run is not None:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the segmentation; nothing is added to the scene")
            self.ui.applyButton.enabled = not self.run.cancel_requested
            return True
        self.ui.applyButton.text = _("Apply")
        problems = []
        pn = self.parameterNode
        if pn is None or not pn.inputVolume:
            problems.append(_("Select an input volume."))
        if not self.currentModel():
            problems.append(_("Select a model or load a model folder."))
        if pn is not None:
            try:
                _lib().parse_levels(pn.levels)
            except ValueError as error:
                problems.append(str(error))
        self.ui.applyButton.enabled = not problems
        self.ui.applyButton.toolTip = "\n".join(problems) if problems else _("Segment the input volume with the selected model")
        return False

    def onApplyButton(self) -> None:
        import slicer

        if self.run is not None:
            self.run.cancel()
            self.ui.statusLabel.text = _("Cancelling...")
            self.widget._updateButtons()
            return
        pn = self.parameterNode
        volume, model, device, levels, runtime = pn.inputVolume, self.currentModel(), pn.device.value, pn.levels, pn.runtime.value

        def start():
            try:
                return self.logic.startSegmentation(volume, model, device, levels, runtime)
            except InputMismatchError as error:  # checked before the worker starts: minutes saved
                question = _("{reason}.\n\nSegment this volume with this model anyway?").format(reason=error.reason[:1].upper() + error.reason[1:])
                if not slicer.util.confirmYesNoDisplay(question, windowTitle=_("SDM Organ Segmentation")):
                    self.ui.statusLabel.text = _("Not segmented: {reason}.").format(reason=error.reason)
                    return None
                return self.logic.startSegmentation(volume, model, device, levels, runtime, force=True)

        self.run = self._startInBackground(self.ui.statusLabel, _("Starting..."), "segmentation", start, needs={"model": model, "runtime": runtime})
        if self.run is None:
            return
        self.runVolume = pn.inputVolume
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()
        self.widget._updateButtons()
        self.pollTimer.start()

    def onPollRun(self) -> None:
        """Timer tick in the main thread: progress while running; nodes are created here when done."""
        import slicer

        run = self.run
        if run is None:
            self.pollTimer.stop()
            return
        state = run.poll()
        fraction, message = run.progress
        self.ui.progressBar.value = int(round(100 * min(max(fraction, 0.0), 1.0)))
        if state == "running":
            elapsed = time.monotonic() - run.started_at
            self.ui.statusLabel.text = _("Cancelling...") if run.cancel_requested else f"{message} ({elapsed:.0f} s)"
            return
        self.pollTimer.stop()
        self.run = None
        pn = self.parameterNode
        try:
            if state == "done" and pn is None:  # the scene was closed after the run had finished
                self.ui.statusLabel.text = _("The scene was closed during the segmentation; nothing was added.")
            elif state == "done":
                self.ui.statusLabel.text = _("Adding the results to the scene...")
                slicer.app.processEvents()
                outputs = self.logic.createOutputNodes(self.runVolume, run.result(), pn.show2D, pn.show3D)
                self._showOutputs(outputs, time.monotonic() - run.started_at, self.runVolume)
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
            self._showError(_unexpected(error))
        finally:
            run.cleanup()
            self.runVolume = None
            self.ui.progressBar.hide()
            self.widget._updateButtons()

    def _showOutputs(self, outputs, seconds: float, volume) -> None:
        import slicer

        self.lastOutputs = outputs
        computed = outputs.computed
        volumes = ", ".join(f"{name} {_lib().format_volume_ml(ml)}" for name, ml in outputs.organ_volumes_ml().items())
        self.ui.outputSummaryLabel.text = _("{model} on {device}, {seconds:.1f} s. Volumes: {volumes}.").format(
            model=computed.model_name, device=computed.device, seconds=seconds, volumes=volumes
        ) + ("\n" + "\n".join(computed.notes) if computed.notes else "")
        self.ui.statusLabel.text = _("Done: added folder '{folder}'.").format(
            folder=slicer.mrmlScene.GetSubjectHierarchyNode().GetItemName(outputs.folder_item)
        )
        self.parameterNode.evaluatedSegmentation = outputs.segmentation
        # Show the segmented volume (the selector may have moved on while the run was going).
        slicer.util.setSliceViewerLayers(background=volume, fit=True)

    def onVisibilityChanged(self, _checked: bool = False) -> None:
        import slicer

        if self.lastOutputs is None or self.parameterNode is None:
            return
        if not slicer.mrmlScene.IsNodePresent(self.lastOutputs.segmentation):
            self.lastOutputs = None
            return
        self.logic.setVisibility(self.lastOutputs, self.ui.show2DCheckBox.checked, self.ui.show3DCheckBox.checked)
