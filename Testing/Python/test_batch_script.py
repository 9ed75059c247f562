"""Scripts/batch.py as Slicer runs it (``Slicer --python-script``): Slicer reads the file in the locale's
encoding, and an exception escaping the script leaves a window-less Slicer running. So the file is ASCII
and a library that cannot be imported ends the script with one line and exit code 2. Needs neither PyTorch
nor Slicer: a stand-in ``slicer`` module (no application, as under plain Python) is put beside it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BATCH = REPO / "SDMOrganSeg" / "Scripts" / "batch.py"


def test_batch_script_is_ascii():
    text = BATCH.read_bytes()
    offending = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if any(byte > 127 for byte in line)]
    assert offending == [], f"non-ASCII lines in {BATCH.name}: {offending[:3]}"


def _copy_with_library(tmp_path: Path, library_init: str) -> Path:
    """batch.py in tmp/Scripts with an SDMOrganSegLib beside it whose __init__ is ``library_init``."""
    scripts = tmp_path / "Scripts"
    scripts.mkdir()
    shutil.copy(BATCH, scripts / "batch.py")
    (tmp_path / "SDMOrganSegLib").mkdir()
    (tmp_path / "SDMOrganSegLib" / "__init__.py").write_text(library_init)
    (tmp_path / "stand_in").mkdir()
    (tmp_path / "stand_in" / "slicer.py").write_text("app = None  # plain Python: sys.exit, as outside Slicer\n")
    return scripts / "batch.py"


def _run(script: Path, *args: str) -> subprocess.CompletedProcess:
    environment = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(script.parent.parent / "stand_in"), "PYTHONNOUSERSITE": "1"}
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120, env=environment)


def test_a_library_that_cannot_be_imported_ends_the_run_with_one_line(tmp_path):
    script = _copy_with_library(tmp_path, "raise ImportError('numpy is broken in this stand-in')\n")
    done = _run(script, "--input", str(tmp_path), "--output", str(tmp_path / "out"))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "ImportError" in lines[0] and "numpy is broken" in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_help_needs_no_library(tmp_path):
    script = _copy_with_library(tmp_path, "raise ImportError('not needed for --help')\n")
    done = _run(script, "--help")
    assert done.returncode == 0 and "--input" in done.stdout and done.stderr == ""
