"""The Slicer extension's CMake lists: every library file is packaged, and every listed file exists.

Slicer's build copies only the files named in MODULE_PYTHON_SCRIPTS; a missing name makes CMake refuse to
configure (a check in SDMOrganSeg/CMakeLists.txt), which CI would otherwise only see in a Slicer build.
"""

from __future__ import annotations

import re

from conftest import REPO

MODULE = REPO / "SDMOrganSeg"


def _listed_scripts() -> set[str]:
    text = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    block = re.search(r"set\(MODULE_PYTHON_SCRIPTS(.*?)\)", text, re.S)
    assert block, "MODULE_PYTHON_SCRIPTS is not set in SDMOrganSeg/CMakeLists.txt"
    return {item.replace("${MODULE_NAME}", "SDMOrganSeg") for item in block.group(1).split()}


def test_every_library_file_is_packaged_and_every_listed_file_exists():
    on_disk = {p.relative_to(MODULE).as_posix() for pattern in ("SDMOrganSegLib/*.py", "Scripts/*.py") for p in MODULE.glob(pattern)}
    on_disk.add("SDMOrganSeg.py")
    listed = _listed_scripts()
    assert on_disk - listed == set(), "add these to MODULE_PYTHON_SCRIPTS"
    assert listed - on_disk == set(), "these are listed but do not exist"
