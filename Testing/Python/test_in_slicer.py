"""The module, the background worker and the batch script as 3D Slicer runs them, with Slicer stood in.

No Slicer application runs here, so the parts of Slicer's Python that the module touches (``qt``,
``slicer.util``, ``slicer.app``, the scripted-module base classes) are small stand-ins that record what the
module asks of them. Everything runs on any Python the tests run on, 3.9 and 3.12 included (CI), without
PyTorch and without slicer-core:

- SDMOrganSeg.py imports, the panel survives a run that ends after the scene was closed, and the
  Logic's package install: versions checked, PyTorch through the PyTorch extension when present, the
  optional package tried on its own and skipped with a note, a pip failure as one line, the GPU label
  refreshed afterwards;
- the worker is started the way Slicer starts it, through a launcher (``PythonSlicer`` is CTK's launcher,
  the real interpreter its child), and cancelling or closing the module leaves no process behind;
- ``batch.py`` under ``Slicer --no-main-window --python-script`` makes Slicer exit with a non-zero code
  on an unexpected exception, instead of leaving a window-less Slicer running.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import REPO

sys.path.insert(0, str(REPO / "SDMOrganSeg"))

from SDMOrganSegLib.mrml import background, dependencies, mrmllogic  # noqa: E402

MODULE_FILE = REPO / "SDMOrganSeg" / "SDMOrganSeg.py"
BATCH = REPO / "SDMOrganSeg" / "Scripts" / "batch.py"
posix_only = pytest.mark.skipif(os.name == "nt", reason="the launcher stand-in is a POSIX executable script")


# --- Slicer's Python, stood in ------------------------------------------------------------------------------


class _Widget(SimpleNamespace):
    """A Qt widget: properties can be set and read, any method call does nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class _ComboBox(_Widget):
    """A QComboBox: items with data, the current one."""

    def __init__(self) -> None:
        super().__init__(items=[], currentIndex=-1, enabled=True, toolTip="")

    def clear(self) -> None:
        self.items, self.currentIndex = [], -1

    def addItem(self, text: str, data=None) -> None:
        self.items.append((text, data))

    def insertSeparator(self, index: int) -> None:
        self.items.insert(index, ("", None))

    def findData(self, data) -> int:
        return next((index for index, (_text, value) in enumerate(self.items) if value == data), -1)

    def itemData(self, index: int):
        return self.items[index][1]

    @property
    def count(self) -> int:
        return len(self.items)

    @property
    def currentData(self):
        return self.items[self.currentIndex][1] if 0 <= self.currentIndex < len(self.items) else None


class _Ui:
    """``self.ui`` of the panel: a widget stand-in for every name (combo boxes hold their items)."""

    def __init__(self) -> None:
        self._widgets: dict[str, _Widget] = {}

    def __getattr__(self, name: str) -> _Widget:
        if name.endswith("ComboBox"):
            return self._widgets.setdefault(name, _ComboBox())
        return self._widgets.setdefault(name, _Widget(text="", value=0, enabled=True, toolTip="", currentData=None))


class _QTimer:
    def __init__(self) -> None:
        self.active = False

    def setInterval(self, milliseconds: int) -> None:
        pass

    def connect(self, signal: str, slot) -> None:
        pass

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False

    @staticmethod
    def singleShot(milliseconds: int, callback) -> None:
        pass  # never fires: the tests call what they need themselves


class _QPixmap:
    """A QPixmap of an image file: records which files were read."""

    loaded: list = []

    def __init__(self, path: str) -> None:
        self.path = path
        _QPixmap.loaded.append(path)

    def isNull(self) -> bool:
        return not Path(self.path).is_file()

    def width(self) -> int:
        return 900

    def scaledToWidth(self, width: int, mode: int) -> "_QPixmap":
        return self


@pytest.fixture()
def slicer_python(monkeypatch, tmp_path) -> SimpleNamespace:
    """Stand-ins for ``qt`` and ``slicer`` in sys.modules; returns what they recorded."""
    recorded = SimpleNamespace(pip=[], status=[], errors=[], confirmations=[], answer=True, connections=[])

    def base(name: str) -> type:
        return type(name, (), {"__init__": lambda self, *args, **kwargs: None})

    qt = types.ModuleType("qt")
    qt.QTimer = _QTimer
    qt.QIcon = lambda path: path
    qt.QPixmap = _QPixmap
    qt.Qt = SimpleNamespace(SmoothTransformation=1)
    slicer = types.ModuleType("slicer")
    for name in ("vtkMRMLScalarVolumeNode", "vtkMRMLSegmentationNode", "vtkMRMLTableNode"):
        setattr(slicer, name, base(name))
    util = types.ModuleType("slicer.util")
    util.VTKObservationMixin = type("VTKObservationMixin", (), {
        "__init__": lambda self: None, "addObserver": lambda self, *args: None,
        "removeObserver": lambda self, *args: None, "removeObservers": lambda self: None,
    })
    util.pip_install = lambda requirements: recorded.pip.append(list(requirements))
    util.confirmOkCancelDisplay = lambda text, **kwargs: recorded.confirmations.append(text) or recorded.answer
    util.WaitCursor = contextlib.nullcontext
    util.showStatusMessage = lambda message, duration=0: recorded.status.append(message)
    util.errorDisplay = lambda message, **kwargs: recorded.errors.append(message)
    util.startupEnvironment = lambda: dict(os.environ)
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.WithinRange = lambda minimum, maximum: (minimum, maximum)
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest"):
        setattr(scripted, name, base(name))
    slicer.util, slicer.i18n, slicer.parameterNodeWrapper, slicer.ScriptedLoadableModule = util, i18n, wrapper, scripted
    slicer.app = SimpleNamespace(
        connect=lambda signal, slot: recorded.connections.append((signal, slot)), processEvents=lambda: None,
        temporaryPath=str(tmp_path),
    )
    for name, stand_in in {"qt": qt, "slicer": slicer, "slicer.util": util, "slicer.i18n": i18n,
                           "slicer.parameterNodeWrapper": wrapper, "slicer.ScriptedLoadableModule": scripted}.items():
        monkeypatch.setitem(sys.modules, name, stand_in)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # no PyTorch extension unless a test adds one
    return recorded


@pytest.fixture()
def module(slicer_python, monkeypatch):
    """SDMOrganSeg.py, imported as Slicer imports it at start-up."""
    spec = importlib.util.spec_from_file_location("SDMOrganSeg", MODULE_FILE)
    loaded = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "SDMOrganSeg", loaded)
    spec.loader.exec_module(loaded)
    return loaded


@pytest.fixture()
def packages(monkeypatch, slicer_python) -> dict[str, str]:
    """Installed versions by pip name (all missing at first); the stand-in pip_install adds what it installs,
    except the names in ``packages["fail"]`` (comma separated), for which pip fails."""
    versions: dict[str, str] = {"fail": ""}

    def installed_version(requirement):
        return versions.get(requirement.distribution)

    def pip_install(requirements):
        slicer_python.pip.append(list(requirements))
        for requirement in requirements:
            name = requirement.split(">=")[0]
            if name in versions["fail"].split(","):
                raise subprocess.CalledProcessError(1, ["python-real", "-m", "pip", "install", requirement])
        for requirement in requirements:
            versions[requirement.split(">=")[0]] = "99.0"

    monkeypatch.setattr(dependencies, "installed_version", installed_version)
    sys.modules["slicer.util"].pip_install = pip_install
    return versions


def _all_installed(versions: dict[str, str]) -> None:
    for requirement in (dependencies.ONNXRUNTIME, *dependencies.FOR_TRAINING, *dependencies.REQUIRED, *dependencies.OPTIONAL):
        versions[requirement.distribution] = "99.0"


# --- the module -----------------------------------------------------------------------------------------------


def test_module_imports_without_pytorch_on_this_python(module):
    assert module.SDMOrganSegLogic().readModelCard("hippocampus")["organs"]


def test_a_run_that_ends_after_the_scene_was_closed_adds_nothing_and_shows_no_error(module, slicer_python):
    class FinishedRun:
        progress, started_at, cancel_requested, message, cleaned = (1.0, "done"), time.monotonic(), False, "", False

        def poll(self):
            return "done"

        def result(self):
            raise AssertionError("nothing may be read once the scene is closed")

        def cleanup(self):
            self.cleaned = True

    widget = module.SDMOrganSegWidget()
    widget.ui = _Ui()
    run = widget._run = FinishedRun()
    widget._parameterNode = None  # onSceneStartClose sets it to None
    widget._onPollRun()
    assert slicer_python.errors == []
    assert "nothing was added" in widget.ui.statusLabel.text
    assert run.cleaned and widget._run is None


# --- the Training section ---------------------------------------------------------------------------------------


class _TrainingRun:
    """A training run as the panel polls it: its state, the progress in its run folder's log.csv, its result."""

    def __init__(self, run_dir: Path, epochs: int, state: str = "running", result=None, message: str = "") -> None:
        self.run_dir, self.config, self.state, self._result, self.message = run_dir, {"epochs": epochs}, state, result, message
        self.progress, self.started_at, self.cancel_requested, self.cleaned = (0.0, "starting"), time.monotonic(), False, False

    def poll(self) -> str:
        return self.state

    def training_progress(self):
        from SDMOrganSegLib.mrml import mrmltraining

        return mrmltraining.read_training_progress(self.run_dir, self.config["epochs"])

    def result(self):
        return self._result

    def cleanup(self) -> None:
        self.cleaned = True


def _log(run_dir: Path, rows: list) -> None:
    import csv

    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "log.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["epoch", "val_mean_dice", "loss", "eta_s"])
        writer.writeheader()
        writer.writerows(rows)


def _training_panel(module, tmp_path: Path):
    widget = module.SDMOrganSegWidget()
    widget.ui, widget.logic = _Ui(), module.SDMOrganSegLogic()
    widget._parameterNode = SimpleNamespace(
        model="", trainingSource=module.TrainingSource.SCENE, trainingVolumes=[], trainingSegmentations=[],
        trainingOutputFolder=tmp_path / "run", trainingDataFolder=Path("."), inputVolume=None, levels="0", evaluatedSegmentation=None,
        referenceSegmentation=None, metricsTable=None,
    )
    return widget


def test_the_training_poll_shows_epoch_loss_dice_eta_and_the_curve_as_it_changes(module, slicer_python, tmp_path):
    widget = _training_panel(module, tmp_path)
    run = widget._trainingRun = _TrainingRun(tmp_path / "run", 20)
    _log(run.run_dir, [{"epoch": 0, "val_mean_dice": 0.84}, {"epoch": 1, "loss": -5.8, "val_mean_dice": 0.845, "eta_s": 1140}])
    _QPixmap.loaded.clear()
    widget._onPollTraining()
    assert widget.ui.trainingStatusLabel.text == (
        "Epoch 1/20: loss -5.8000, validation Dice 0.845 (best 0.845; before fine-tuning 0.840), about 19 min left"
    )
    assert widget.ui.trainingProgressBar.value == 5
    assert _QPixmap.loaded == [], "no curve image yet"
    (run.run_dir / "curves.png").write_bytes(b"png")
    widget._onPollTraining()
    widget._onPollTraining()
    assert _QPixmap.loaded == [str(run.run_dir / "curves.png")], "the curve is read once, when it appears"
    os.utime(run.run_dir / "curves.png", ns=(time.time_ns() + 10**9,) * 2)  # rewritten at the next validation
    widget._onPollTraining()
    assert len(_QPixmap.loaded) == 2
    run.cancel_requested = True
    widget._onPollTraining()
    assert widget.ui.trainingStatusLabel.text.startswith("Cancelling")
    assert widget._trainingRun is run and not run.cleaned


def test_choosing_a_model_to_fine_tune_sets_the_loss_it_was_trained_with(module, slicer_python, tmp_path):
    """The default model has two heads: a loss other than dual would be refused at Train, so the panel's loss
    follows the model chosen to start from (from scratch, the user's choice stays)."""
    from SDMOrganSegLib.formats.modelfiles import read_card, shipped_models

    widget = _training_panel(module, tmp_path)
    widget._parameterNode.trainingStart, widget._parameterNode.trainingMode = "", module.TrainingMode.SDM
    combo = widget.ui.trainingStartComboBox
    for text, data in (("Fine-tune hippocampus", "hippocampus"), ("Fine-tune headneck-oar", "headneck-oar"), ("From scratch", "scratch:cpu")):
        combo.addItem(text, data)
    widget.training.onTrainingStartChanged(0)
    assert widget._parameterNode.trainingStart == "hippocampus" and widget._parameterNode.trainingMode is module.TrainingMode.DUAL
    widget.training.onTrainingStartChanged(1)
    headneck_mode = read_card(shipped_models()["headneck-oar"]).training["config"]["mode"]
    assert widget._parameterNode.trainingMode is module.TrainingMode(headneck_mode)
    widget._parameterNode.trainingMode = module.TrainingMode.SDM
    widget.training.onTrainingStartChanged(2)
    assert widget._parameterNode.trainingStart == "scratch:cpu" and widget._parameterNode.trainingMode is module.TrainingMode.SDM
    assert slicer_python.errors == []


def test_a_finished_training_puts_the_model_in_the_selector_and_selects_it(module, slicer_python, tmp_path):
    import shutil

    from SDMOrganSegLib.formats.modelfiles import shipped_models

    widget = _training_panel(module, tmp_path)
    model_dir = tmp_path / "run" / "best"
    shutil.copytree(shipped_models()["hippocampus"], model_dir)
    run = widget._trainingRun = _TrainingRun(tmp_path / "run", 2, "done", {
        "model_dir": str(model_dir), "epoch": 2,
        "summary": {"anterior hippocampus": {"dice": {"mean": 0.81}}, "posterior hippocampus": {"dice": {"mean": 0.86}}},
    })
    _log(run.run_dir, [{"epoch": 0, "val_mean_dice": 0.83}, {"epoch": 2, "loss": -5.9, "val_mean_dice": 0.835}])
    widget._onPollTraining()
    assert slicer_python.errors == [] and run.cleaned and widget._trainingRun is None
    assert widget._loadedModelFolders == [str(model_dir)] and widget._parameterNode.model == str(model_dir)
    combo = widget.ui.modelComboBox
    assert combo.currentData == str(model_dir) and combo.items[combo.currentIndex][0] == "hippocampus (folder)"
    assert ("Fine-tune hippocampus (folder)", str(model_dir)) in widget.ui.trainingStartComboBox.items
    text = widget.ui.trainingStatusLabel.text
    assert text.startswith(f"Done: the model in {model_dir} is in the model selector and selected.")
    assert "anterior hippocampus 0.810, posterior hippocampus 0.860" in text and "before fine-tuning: 0.830" in text


def test_a_cancelled_training_says_the_checkpoint_is_kept_and_the_button_resumes(module, slicer_python, tmp_path):
    widget = _training_panel(module, tmp_path)
    run = widget._trainingRun = _TrainingRun(tmp_path / "run", 20, "cancelled")
    _log(run.run_dir, [{"epoch": 0, "val_mean_dice": 0.83}, {"epoch": 1, "loss": -5.8}, {"epoch": 2, "loss": -5.9}])
    (run.run_dir / "checkpoint.pt").write_bytes(b"state")
    widget._parameterNode.trainingVolumes, widget._parameterNode.trainingSegmentations = ["volume 1", "volume 2"], ["segments 1", "segments 2"]
    widget._onPollTraining()
    assert slicer_python.errors == [] and run.cleaned
    assert widget.ui.trainingStatusLabel.text == (
        f"Cancelled after epoch 2; the checkpoint is kept in {run.run_dir}: Resume training continues from it."
    )
    assert widget.ui.trainButton.text == "Resume training" and widget.ui.trainButton.enabled


def test_a_failed_training_shows_its_one_line_and_the_button_asks_for_what_is_missing(module, slicer_python, tmp_path):
    widget = _training_panel(module, tmp_path)
    run = widget._trainingRun = _TrainingRun(tmp_path / "run", 20, "failed", message="segment 'tumour' of 'case 1' is none of the organs")
    widget._onPollTraining()
    assert slicer_python.errors == ["segment 'tumour' of 'case 1' is none of the organs"] and run.cleaned
    assert widget.ui.trainButton.text == "Train" and not widget.ui.trainButton.enabled
    assert "at least two volume + segmentation pairs" in widget.ui.trainButton.toolTip


def test_missing_and_outdated_packages_are_installed_after_asking(module, packages, slicer_python, monkeypatch):
    _all_installed(packages)
    packages["torch"], packages["edt"] = "1.13.1", "2.4.0"  # too old
    del packages["safetensors"], packages["isal"]
    for name in ("torch", "edt"):  # installed, not loaded in this session (a loaded one is refused: next test)
        monkeypatch.delitem(sys.modules, name, raising=False)
    logic = module.SDMOrganSegLogic()
    assert logic.ensureDependencies(askConfirmation=True, forTraining=True)
    [question] = slicer_python.confirmations
    assert "torch>=2.2" in question and "version 1.13.1 is older than the 2.2 needed" in question
    assert "edt>=3.0" in question and "safetensors>=0.4" in question and "isal>=1.6" in question
    # PyTorch first (no PyTorch extension: pip), then the other required packages at once, then the optional one.
    assert slicer_python.pip == [["torch>=2.2"], ["safetensors>=0.4", "edt>=3.0"], ["isal>=1.6"]]
    assert logic.installedPackages == ["torch>=2.2", "safetensors>=0.4", "edt>=3.0", "isal>=1.6"]
    assert any("PyTorch extension" in note for note in logic.installNotes)
    assert logic.missingPackages() == []


def test_segmenting_installs_onnx_runtime_and_only_training_asks_for_pytorch(module, packages, slicer_python, tmp_path):
    _all_installed(packages)
    del packages["torch"], packages["onnxruntime"]
    logic = module.SDMOrganSegLogic()
    assert logic.ensureDependencies(askConfirmation=True, model="hippocampus")  # shipped: it has model.onnx
    assert slicer_python.pip == [["onnxruntime>=1.19.2"]]
    assert "torch" not in slicer_python.confirmations[0] and "PyTorch is large" not in slicer_python.confirmations[0]
    # A model folder without model.onnx, or --runtime torch, runs on PyTorch; so does training.
    folder = tmp_path / "no-onnx"
    shutil.copytree(REPO / "Resources" / "Models" / "hippocampus", folder, ignore=shutil.ignore_patterns("model.onnx"))
    card = json.loads((folder / "model.json").read_text())
    del card["onnx"]
    (folder / "model.json").write_text(json.dumps(card))
    assert logic.runtimeRequirements(str(folder)) == (dependencies.TORCH,)
    assert logic.runtimeRequirements("hippocampus", "torch") == (dependencies.TORCH,)
    slicer_python.pip.clear()
    assert logic.ensureDependencies(askConfirmation=False, forTraining=True)
    assert slicer_python.pip == [["torch>=2.2"]]


def test_an_outdated_package_this_session_loaded_is_refused_with_a_restart(module, packages, slicer_python, monkeypatch):
    """pip would replace PyTorch's files under the running code: one line asking for a restart, nothing installed."""
    _all_installed(packages)
    packages["torch"] = "1.13.1"
    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))  # another extension imported it
    with pytest.raises(module.SDMOrganSegError) as refused:
        module.SDMOrganSegLogic().ensureDependencies(askConfirmation=True, forTraining=True)
    message = str(refused.value)
    assert message.startswith("torch 1.13.1 is loaded in this Slicer session") and "restart Slicer" in message and "\n" not in message
    assert slicer_python.pip == [] and slicer_python.confirmations == []


def test_nothing_is_installed_when_the_user_declines(module, packages, slicer_python):
    slicer_python.answer = False
    assert not module.SDMOrganSegLogic().ensureDependencies(askConfirmation=True)
    assert slicer_python.pip == []


def test_optional_package_that_fails_is_skipped_with_a_note(module, packages, slicer_python):
    _all_installed(packages)
    del packages["edt"], packages["isal"]
    packages["fail"] = "isal"  # e.g. no wheel for this platform
    logic = module.SDMOrganSegLogic()
    assert logic.ensureDependencies(askConfirmation=False)
    assert slicer_python.pip == [["edt>=3.0"], ["isal>=1.6"]]
    assert logic.installedPackages == ["edt>=3.0"]
    assert logic.installNotes == [
        "Optional package isal was not installed (pip stopped with exit code 1): it only gzips the saved volumes "
        "5-6x faster (zlib is used without it)."
    ]
    # Offered once per session: the next run does not ask again.
    slicer_python.pip.clear()
    assert logic.ensureDependencies(askConfirmation=True)
    assert slicer_python.pip == [] and slicer_python.confirmations == []


def test_required_package_that_fails_gives_one_line_and_no_calledprocesserror(module, packages, slicer_python):
    _all_installed(packages)
    del packages["scipy"]
    packages["fail"] = "scipy"
    with pytest.raises(module.SDMOrganSegError) as raised:
        module.SDMOrganSegLogic().ensureDependencies(askConfirmation=False, forMetricsOnly=True)
    message = str(raised.value)
    assert message.startswith("could not install scipy>=1.11 (pip stopped with exit code 1); check the network connection")
    assert "\n" not in message and "CalledProcessError" not in message
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


def test_pytorch_comes_from_the_pytorch_extension_when_it_is_installed(module, packages, slicer_python, monkeypatch):
    _all_installed(packages)
    del packages["torch"]
    calls = []

    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None):
            calls.append((askConfirmation, torchVersionRequirement))
            packages["torch"] = "2.6.0+cu124"
            return SimpleNamespace(__version__="2.6.0+cu124")

    monkeypatch.setitem(sys.modules, "PyTorchUtils", SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
    logic = module.SDMOrganSegLogic()
    assert logic.ensureDependencies(askConfirmation=True, forTraining=True)
    assert calls == [(False, ">=2.2")]  # the user was asked once, by this module
    assert slicer_python.pip == [] and logic.installedPackages == ["torch>=2.2"]


def test_declining_in_the_pytorch_extension_stops_the_run(module, packages, slicer_python, monkeypatch):
    _all_installed(packages)
    del packages["torch"]
    utils = SimpleNamespace(PyTorchUtilsLogic=lambda: SimpleNamespace(installTorch=lambda **kwargs: None))
    monkeypatch.setitem(sys.modules, "PyTorchUtils", utils)
    assert not module.SDMOrganSegLogic().ensureDependencies(askConfirmation=False, forTraining=True)


def test_the_gpu_label_is_refreshed_after_an_install(module, packages, slicer_python, monkeypatch):
    _all_installed(packages)
    del packages["torch"]
    widget = module.SDMOrganSegWidget()
    widget.ui, widget.logic = _Ui(), module.SDMOrganSegLogic()
    probes = []
    monkeypatch.setattr(widget, "_startDevicesProbe", lambda: probes.append("probe"))
    assert widget._ensureDependencies(forTraining=True)
    assert probes == ["probe"]
    assert any("PyTorch extension" in message for message in slicer_python.status)
    probes.clear()
    assert widget._ensureDependencies(forTraining=True)  # nothing to install: no new probe
    assert probes == []


def test_version_numbers_compare_as_numbers():
    assert dependencies.version_tuple("2.13.0+cpu") == (2, 13, 0)
    assert dependencies.version_tuple("2.10.0") > dependencies.version_tuple("2.9")
    assert dependencies.version_tuple("1.26.4.dev0") >= dependencies.version_tuple("1.26")
    assert dependencies.version_tuple("unknown") == ()


# --- the background worker, started as Slicer starts it -------------------------------------------------------

#: A stand-in for CTK's launcher (PythonSlicer): it starts the real interpreter as its child and waits.
#: The child stands for a worker that does not stop by itself (one huge tile): it writes its pid and sleeps.
LAUNCHER = """#!{python}
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(300)", {pid_file!r}])
sys.exit(child.wait())
"""


def _launcher(tmp_path: Path) -> tuple[Path, Path]:
    pid_file = tmp_path / "worker.pid"
    launcher = tmp_path / "PythonSlicer"
    launcher.write_text(LAUNCHER.format(python=sys.executable, pid_file=str(pid_file)), encoding="utf-8")
    launcher.chmod(0o755)
    return launcher, pid_file


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):  # a zombie waiting for its (new) parent to reap it is gone too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _worker_pid(pid_file: Path) -> int:
    deadline = time.monotonic() + 60
    while not (pid_file.is_file() and pid_file.read_text()):
        assert time.monotonic() < deadline, "the launcher did not start its child"
        time.sleep(0.05)
    return int(pid_file.read_text())


def _gone(*pids: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _started_run(tmp_path: Path) -> tuple[mrmllogic.BackgroundRun, int, int]:
    launcher, pid_file = _launcher(tmp_path)
    image = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.float32))
    run = mrmllogic.BackgroundRun(image, None, "cpu", python=str(launcher), workdir=tmp_path)
    run.start()
    return run, run._process.pid, _worker_pid(pid_file)


def _kill_leftovers(*pids: int) -> None:
    """After a failed test: the processes this test started, by pid, so none keeps sleeping."""
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


@posix_only
def test_cancel_kills_the_worker_behind_the_launcher(tmp_path, monkeypatch):
    monkeypatch.setattr(background, "CANCEL_GRACE_S", 0.3)
    run, launcher_pid, worker_pid = _started_run(tmp_path)
    try:
        run.cancel()
        assert run.wait(timeout=30) == "cancelled"
        assert _gone(launcher_pid, worker_pid), "the worker behind the launcher is still running"
    finally:
        run.cleanup()
        _kill_leftovers(launcher_pid, worker_pid)


@posix_only
def test_closing_the_module_or_slicer_kills_the_worker_behind_the_launcher(tmp_path, module):
    run, launcher_pid, worker_pid = _started_run(tmp_path)
    widget = module.SDMOrganSegWidget()
    widget._run = run
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    probe_launcher, probe_pid_file = _launcher(probe_dir)
    widget._devicesProbe = mrmllogic.start_process([str(probe_launcher)], stdout=subprocess.DEVNULL)
    probe_pid = _worker_pid(probe_pid_file)
    try:
        widget.stopBackgroundProcesses()  # what cleanup() and Slicer's aboutToQuit() call
        assert widget._run is None and widget._devicesProbe is None
        assert run.workdir is None
        assert _gone(launcher_pid, worker_pid, probe_pid)
    finally:
        _kill_leftovers(launcher_pid, worker_pid, probe_pid)
    # The panel connects this to Slicer's aboutToQuit() signal in setup().
    assert 'slicer.app.connect("aboutToQuit()", self.stopBackgroundProcesses)' in MODULE_FILE.read_text(encoding="utf-8")


# --- batch.py under Slicer --no-main-window --python-script --------------------------------------------------

#: Runs batch.py as Slicer's --python-script does: in __main__, with slicer.app present (no main window),
#: so the script must end the application itself through slicer.util.exit(code).
SIMULATED_SLICER = r"""
import importlib.machinery, runpy, sys, types

batch, broken, arguments = sys.argv[1], sys.argv[2], sys.argv[3:]
exits = []
slicer = types.ModuleType("slicer")
slicer.__spec__ = importlib.machinery.ModuleSpec("slicer", None)
slicer.app = object()
slicer.util = types.SimpleNamespace(exit=lambda status=0: exits.append(status))
sys.modules["slicer"] = slicer
if broken:
    sys.modules["SDMOrganSegLib." + broken] = None  # importing it raises ImportError: an unexpected exception
sys.argv = [batch, *arguments]
runpy.run_path(batch, run_name="__main__")
print("slicer.util.exit called with", exits)
"""


def _run_in_simulated_slicer(broken: str, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", SIMULATED_SLICER, str(BATCH), broken, *arguments],
        capture_output=True, text=True, timeout=300, cwd=str(REPO),
    )


def test_batch_in_slicer_exits_non_zero_on_an_unexpected_exception(tmp_path):
    process = _run_in_simulated_slicer("mrml.headless", "--input", str(tmp_path), "--output", str(tmp_path / "out"))
    assert process.returncode == 0, process.stderr  # the script returned to Slicer instead of raising
    assert "slicer.util.exit called with [2]" in process.stdout
    assert "Traceback" not in process.stderr
    [line] = process.stderr.strip().splitlines()
    assert line.startswith("error: internal error (ModuleNotFoundError: ")


@pytest.mark.parametrize(("arguments", "code"), [(["--help"], 0), (["--no-such-option"], 2)])
def test_batch_in_slicer_exits_on_usage_errors_and_help(arguments, code):
    process = _run_in_simulated_slicer("", *arguments)
    assert process.returncode == 0, process.stderr
    assert f"slicer.util.exit called with [{code}]" in process.stdout
    assert "Traceback" not in process.stderr
