"""Support code of the Slicer panel that runs without Slicer or PyTorch: the refusal to upgrade a package
the session has loaded, and the background worker's watch on its caller (a crashed Slicer leaves no orphan)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from SDMOrganSegLib.mrml import background, dependencies


def test_a_loaded_package_that_is_too_old_is_refused_with_a_restart():
    # pytest is loaded here; asking for a version it cannot have makes it "too old while loaded".
    too_new = dependencies.Requirement("pytest", "pytest", "999", "runs the tests")
    message = dependencies.loaded_too_old(too_new)
    assert message.startswith("pytest ") and "is loaded in this Slicer session" in message and "restart Slicer" in message
    assert "\n" not in message
    # Loaded and recent enough, or not loaded at all: nothing to refuse (the install offer handles the latter).
    assert dependencies.loaded_too_old(dependencies.Requirement("pytest", "pytest", "1.0", "runs the tests")) is None
    assert "sdmorganseg_no_such_module" not in sys.modules
    assert dependencies.loaded_too_old(dependencies.Requirement("sdmorganseg_no_such_module", "nothing", "1", "x")) is None


def test_the_request_names_the_caller_and_the_worker_ends_when_it_dies(tmp_path):
    run = background.BackgroundProcess({"x": 1}, workdir=tmp_path)
    assert run.request["parent_pid"] == os.getpid()
    # A stand-in caller that dies after a moment; the watch notices within about one interval.
    caller = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    noticed = []
    background.watch_parent(caller.pid, lambda: noticed.append(time.monotonic()), interval=0.1)
    assert background.process_alive(caller.pid) and not noticed
    caller.wait(timeout=10)
    deadline = time.monotonic() + 5
    while not noticed and time.monotonic() < deadline:
        time.sleep(0.05)
    assert noticed and not background.process_alive(caller.pid)
    assert background.process_alive(os.getpid())


def test_an_orphaned_worker_exits_by_itself(tmp_path):
    """worker_main with a request whose caller is already gone ends with EXIT_ORPHANED (the job would run for
    minutes otherwise: a stand-in job that sleeps 30 s)."""
    caller = subprocess.Popen([sys.executable, "-c", "pass"])
    caller.wait(timeout=10)
    code = (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from SDMOrganSegLib.mrml import background as b; "
        "b.JOBS['wait'] = 'common.errors'; "
        "import SDMOrganSegLib.common.errors as e; e.run_job = lambda *a: time.sleep(30) or {}; "
        "sys.exit(b.worker_main([sys.argv[2]]))"
    )
    background.write_json_atomic(tmp_path / background.REQUEST, {"job": "wait", "parent_pid": caller.pid})
    library = str(background.Path(background.__file__).resolve().parents[2])
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code, library, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == background.EXIT_ORPHANED, done.stderr
    assert time.monotonic() - started < 20  # not the 30 s the job would take
