"""One wrapper for the panel's long jobs (segmentation and training): a separate Python process, polled
from the caller's timer, with progress, cancel and a one-line result.

Why a process and not a thread: the network and the SDM resampling hold the GIL for long stretches of
Python, and in Slicer a Python thread only gets the GIL when the main thread runs Python, so a thread
would either freeze the GUI or crawl. A process (as MONAIAuto3DSeg and SlicerNNUnet run theirs) also
frees all GPU memory when it ends, and a cancel that the worker does not honour in time (one huge tile,
a long epoch) can kill it. The worker runs in a process group of its own (:func:`start_process`), and
killing it kills the group: in Slicer the process started is CTK's launcher and the worker its child.
:meth:`BackgroundProcess.cleanup` (the module calls it when it is closed and when Slicer quits) does the
same, and so does this Python's exit for runs not cleaned up. A crashed Slicer runs none of that: the
request names the caller's process id and the worker watches it (:func:`watch_parent`), ending itself
within seconds of the caller's death, so no orphan keeps the GPU busy.

Protocol, all files in a private temporary folder: the caller writes ``request.json`` (``{"job": name,
...}``) and whatever inputs the job needs; the worker (:func:`worker_main`) runs the job's ``run_job``
(see :data:`JOBS`), writes ``progress.json`` as it goes and, at the end, ``result.json`` (status ``ok``
with the job's description of its outputs, ``error`` with a one-line message, or ``cancelled``).
Cancelling creates the file ``cancel``, which the job checks when it can. Worker output goes to
``worker.log`` (never a pipe, which could fill and block it). Nothing here imports Slicer, VTK or PyTorch.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..common.errors import CancelledError, SDMOrganSegError

RESULT, PROGRESS, CANCEL, REQUEST, LOG = "result.json", "progress.json", "cancel", "request.json", "worker.log"
#: Seconds a cancelled worker gets to stop by itself before it is killed.
CANCEL_GRACE_S = 5.0
#: How often the worker checks that the process that started it is still alive.
PARENT_CHECK_S = 2.0
#: The worker's exit status when it ends itself because its caller is gone.
EXIT_ORPHANED = 3
#: Job name -> library module (its path below SDMOrganSegLib) whose ``run_job(folder, request, report, cancel)`` the worker runs; it returns
#: a JSON-able description of its outputs for ``result.json``.
JOBS = {"segment": "mrml.mrmlsegmentation", "train": "mrml.mrmltraining"}
#: The library's top package (this module is SDMOrganSegLib.mrml.background).
LIBRARY = __name__.split(".")[0]

#: ``report(fraction, message, now=False)``: progress for the panel; written a few times a second at most,
#: unless ``now`` (rare messages, such as one per epoch, that must not be skipped).
Report = Callable[..., None]


def write_json_atomic(path: Path, values: Mapping[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(values), encoding="utf-8")
    os.replace(temporary, path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _lib_parent() -> str:
    """The folder that holds SDMOrganSegLib/ (this file is SDMOrganSegLib/mrml/background.py)."""
    return str(Path(__file__).resolve().parents[2])


def start_process(command: Sequence[str], **popen_arguments: Any) -> subprocess.Popen:
    """Start ``command`` as the leader of a process group of its own, without a console window.

    In Slicer the command is ``PythonSlicer``, which is CTK's launcher: it sets up the environment and
    runs the real interpreter (``python-real``) as its child. Killing only the launcher would leave that
    child running (and holding the GPU); :func:`kill_process_tree` stops the whole group instead.
    """
    if os.name == "nt":
        popen_arguments["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
    else:
        popen_arguments["start_new_session"] = True  # a new session and process group, whose id is the pid
    return subprocess.Popen(list(command), **popen_arguments)


def kill_process_tree(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """Kill a process started by :func:`start_process` and every process it started, then reap it."""
    if process.poll() is None:
        if os.name == "nt":
            # /T: the process and its children (the launcher's python-real), /F: at once.
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout,
                               creationflags=subprocess.CREATE_NO_WINDOW)
        else:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)  # the group still exists: its leader is not reaped yet
        with contextlib.suppress(OSError):
            process.kill()  # in case taskkill could not run
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout)


#: Background runs whose worker may still be running; stopped when this Python exits.
_RUNNING: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_running_workers() -> None:
    for run in list(_RUNNING):
        run.cleanup()


class BackgroundProcess:
    """One job in a worker process (see the module's docstring); subclasses name the job and its inputs.

    ``state`` is new, running, done, failed or cancelled; ``progress`` is (fraction, message) and
    ``message`` the one-line outcome once the run has ended.
    """

    job = ""
    #: What the user is told when the worker dies without a result, and when a cancelled run has ended.
    what = "the background process"
    cancelled_message = "cancelled by the user"

    def __init__(
        self, request: Mapping[str, Any], python: str | None = None, env: Mapping[str, str] | None = None,
        workdir: str | Path | None = None,
    ) -> None:
        self.request = {"job": self.job, "parent_pid": os.getpid(), **request}
        self.python = python or sys.executable
        self.env = dict(env) if env is not None else None
        self._parent_dir = workdir
        self.workdir: Path | None = None
        self._process: subprocess.Popen | None = None
        self._log = None
        self._cancel_requested_at: float | None = None
        self.state = "new"  #: new, running, done, failed, cancelled
        self.progress: tuple[float, str] = (0.0, "starting")
        self.message = ""
        self.started_at = 0.0

    def _write_inputs(self, folder: Path) -> None:
        """Write the job's input files into the worker's folder (before the worker starts)."""

    def start(self) -> None:
        """Write the inputs and the request and start the worker; returns at once."""
        self.workdir = Path(tempfile.mkdtemp(prefix="sdmorganseg-run-", dir=self._parent_dir))
        self._write_inputs(self.workdir)
        write_json_atomic(self.workdir / REQUEST, self.request)
        code = f"import sys; sys.path.insert(0, {_lib_parent()!r}); from SDMOrganSegLib.mrml.background import worker_main; sys.exit(worker_main(sys.argv[1:]))"
        self._log = open(self.workdir / LOG, "wb")
        self._process = start_process(
            [self.python, "-c", code, str(self.workdir)], stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
        )
        _RUNNING.add(self)
        self.started_at = time.monotonic()
        self.state = "running"

    def cancel(self) -> None:
        """Ask the worker to stop; :meth:`poll` reports ``cancelled`` once it has."""
        if self.state == "running" and self.workdir is not None and self._cancel_requested_at is None:
            (self.workdir / CANCEL).touch()
            self._cancel_requested_at = time.monotonic()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested_at is not None

    def poll(self) -> str:
        """Update :attr:`progress` and :attr:`state` (``running``, ``done``, ``failed``, ``cancelled``)."""
        if self.state != "running" or self._process is None or self.workdir is None:
            return self.state
        values = read_json(self.workdir / PROGRESS)
        if values:
            self.progress = (float(values.get("fraction", 0.0)), str(values.get("message", "")))
        code = self._process.poll()
        if code is None:
            if self._cancel_requested_at is not None and time.monotonic() - self._cancel_requested_at > CANCEL_GRACE_S:
                kill_process_tree(self._process)
                self._finish("cancelled", self.cancelled_message)
            return self.state
        result = read_json(self.workdir / RESULT)
        if result is None:
            tail = self.log_tail()
            self._finish(
                "cancelled" if self._cancel_requested_at is not None else "failed",
                self.cancelled_message if self._cancel_requested_at is not None
                else f"{self.what} stopped unexpectedly (exit code {code}){': ' + tail if tail else ''}",
            )
        else:
            self._finish(str(result.get("status", "failed")), str(result.get("message", "")))
        return self.state

    def _finish(self, state: str, message: str) -> None:
        self.state = state if state in ("done", "failed", "cancelled") else ("done" if state == "ok" else "failed")
        self.message = message
        if self._log is not None:
            self._log.close()
            self._log = None

    def wait(self, timeout: float | None = None, interval: float = 0.1) -> str:
        """Poll until the run ends (for scripts and tests; the GUI polls from a timer instead)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() == "running":
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                deadline = None
            time.sleep(interval)
        return self.state

    def log_tail(self, lines: int = 1) -> str:
        """The last non-empty line(s) of the worker's output."""
        if self.workdir is None:
            return ""
        try:
            text = (self.workdir / LOG).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        found = [line.strip() for line in text.splitlines() if line.strip()]
        return " / ".join(found[-lines:])

    def result_values(self) -> dict[str, Any]:
        """``result.json`` of a finished (``done``) run: the job's description of its outputs."""
        values = read_json(self.workdir / RESULT) if self.state == "done" and self.workdir is not None else None
        if not values or values.get("status") != "ok":
            raise SDMOrganSegError(f"the run has no result ({self.state}: {self.message})")
        return values

    def cleanup(self) -> None:
        """Stop the worker (and its children) if it still runs and delete the temporary folder."""
        if self._process is not None:
            kill_process_tree(self._process)
        _RUNNING.discard(self)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (without signalling it: ``os.kill(pid, 0)`` would end it on Windows)."""
    if os.name == "nt":
        import ctypes

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x00100000, False, pid)  # SYNCHRONIZE
        if not handle:
            return False
        try:
            return kernel32.WaitForSingleObject(handle, 0) == 0x00000102  # WAIT_TIMEOUT: still running
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)  # POSIX: signal 0 only checks
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def watch_parent(pid: int, on_gone: Callable[[], None], interval: float = PARENT_CHECK_S) -> threading.Thread:
    """Call ``on_gone()`` (from a daemon thread) once process ``pid`` no longer exists."""

    def watch() -> None:
        while process_alive(pid):
            time.sleep(interval)
        on_gone()

    thread = threading.Thread(target=watch, name="sdmorganseg-parent-watch", daemon=True)
    thread.start()
    return thread


def worker_main(argv: Sequence[str]) -> int:
    """Entry point of the background process: ``worker_main([workdir])``; see :class:`BackgroundProcess`."""
    folder = Path(argv[0])
    cancel_file = folder / CANCEL
    last_write = [0.0]

    def report(fraction: float, message: str, now: bool = False) -> None:
        tick = time.monotonic()
        if now or tick - last_write[0] > 0.2 or fraction >= 1.0:  # a few writes per second are plenty for a bar
            try:
                write_json_atomic(folder / PROGRESS, {"fraction": fraction, "message": message})
            except OSError:
                pass  # Windows refuses to replace a file the panel is reading right now: skip this update
            last_write[0] = tick

    try:
        request = read_json(folder / REQUEST) or {}
        if request.get("parent_pid"):  # the caller crashed: end at once, as cleanup() would have ended us
            watch_parent(int(request["parent_pid"]), lambda: os._exit(EXIT_ORPHANED))
        job = JOBS.get(str(request.get("job")))
        if job is None:
            raise SDMOrganSegError(f"unknown background job {request.get('job')!r}; choose one of {', '.join(JOBS)}")
        module = importlib.import_module(f"{LIBRARY}.{job}")
        description = module.run_job(folder, request, report, cancel_file.exists)
        report(1.0, "done", now=True)
        write_json_atomic(folder / RESULT, {"status": "ok", "message": "", **description})
        return 0
    except CancelledError as error:
        write_json_atomic(folder / RESULT, {"status": "cancelled", "message": str(error)})
        return 0
    except SDMOrganSegError as error:
        write_json_atomic(folder / RESULT, {"status": "error", "message": str(error)})
        return 1
    except MemoryError:
        write_json_atomic(folder / RESULT, {"status": "error", "message": "out of memory; close other programs or use a smaller volume"})
        return 1
    except Exception as error:  # a bug: keep the traceback in the log, one line for the user
        import traceback

        traceback.print_exc()
        write_json_atomic(folder / RESULT, {"status": "error", "message": f"internal error ({type(error).__name__}: {error}); details in {folder / LOG}"})
        return 1


def python_executable() -> str:
    """The Python to run the worker with: ``PythonSlicer`` inside Slicer, else this interpreter."""
    import slicer  # only called where Slicer or slicer-core exists

    if getattr(slicer, "app", None) is not None:
        found = shutil.which("PythonSlicer")
        if not found:
            raise SDMOrganSegError("PythonSlicer was not found next to Slicer; reinstall Slicer")
        return found
    return sys.executable


def probe_devices_command(python: str | None = None) -> list[str]:
    """Command printing one line: the CUDA GPU PyTorch sees (``cuda: <name>``), or ``cpu``."""
    code = (
        "import torch; print('cuda: ' + torch.cuda.get_device_name(0) + ' (' + str(round(torch.cuda.get_device_properties(0).total_memory / 2**30)) + ' GiB)'"
        " if torch.cuda.is_available() else 'cpu')"
    )
    return [python or sys.executable, "-c", code]
