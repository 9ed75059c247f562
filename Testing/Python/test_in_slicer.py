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
import os
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

from SDMOrganSegLib import mrmllogic  # noqa: E402

MODULE_FILE = REPO / "SDMOrganSeg" / "SDMOrganSeg.py"
BATCH = REPO / "SDMOrganSeg" / "Scripts" / "batch.py"
posix_only = pytest.mark.skipif(os.name == "nt", reason="the launcher stand-in is a POSIX executable script")


# --- Slicer's Python, stood in ------------------------------------------------------------------------------


class _Widget(SimpleNamespace):
    """A Qt widget: properties can be set and read, any method call does nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class _Ui:
    """``self.ui`` of the panel: a widget stand-in for every name."""

    def __init__(self) -> None:
        self._widgets: dict[str, _Widget] = {}

    def __getattr__(self, name: str) -> _Widget:
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


@pytest.fixture()
def slicer_python(monkeypatch, tmp_path) -> SimpleNamespace:
    """Stand-ins for ``qt`` and ``slicer`` in sys.modules; returns what they recorded."""
    recorded = SimpleNamespace(pip=[], status=[], errors=[], confirmations=[], answer=True, connections=[])

    def base(name: str) -> type:
        return type(name, (), {"__init__": lambda self, *args, **kwargs: None})

    qt = types.ModuleType("qt")
    qt.QTimer = _QTimer
    qt.QIcon = lambda path: path
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
    monkeypatch.setattr(mrmllogic, "CANCEL_GRACE_S", 0.3)
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
    process = _run_in_simulated_slicer("headless", "--input", str(tmp_path), "--output", str(tmp_path / "out"))
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
