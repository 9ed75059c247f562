"""The Slicer extension's CMake lists: every library file is packaged, and every listed file exists.

Slicer's build copies only the files named in MODULE_PYTHON_SCRIPTS; a missing name makes CMake refuse to
configure (a check in SDMOrganSeg/CMakeLists.txt), which CI would otherwise only see in a Slicer build.
"""

from __future__ import annotations

import json
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


# --- the extension as the Slicer Extensions Index builds it -------------------------------------------------

#: Slicer's extensions catalog entry schema v1.0.1 (Slicer/Slicer Schemas/), which SDMOrganSeg.json names:
#: property -> JSON type; ``additionalProperties`` is false there.
CATALOG_ENTRY_PROPERTIES = {
    "$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
    "build_dependencies": list, "build_subdirectory": str, "enabled": bool, "tier": int,
}
CATALOG_ENTRY_REQUIRED = {"$schema", "category", "scm_url"}


def _cmake_set(name: str) -> str:
    found = re.search(rf'^set\({name} "([^"]*)"\)', (REPO / "CMakeLists.txt").read_text(encoding="utf-8"), re.M)
    assert found, f"{name} is not set in CMakeLists.txt"
    return found.group(1)


def test_top_level_cmake_lists_follow_slicer_5_10_extension_template():
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    assert text.startswith("cmake_minimum_required(VERSION 3.20.6...3.22.6 FATAL_ERROR)\n\nproject(SDMOrganSeg)\n")
    for name in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert _cmake_set(name), name
    assert "EXTENSION_CATEGORY" not in text, "the category lives in the Extensions Index entry (SDMOrganSeg.json)"
    order = [text.index(marker) for marker in (
        "find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(SDMOrganSeg)",
        "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})",
    )]
    assert order == sorted(order)


def test_extensions_index_entry_matches_the_schema_and_the_cmake_lists():
    entry = json.loads((REPO / "SDMOrganSeg.json").read_text(encoding="utf-8"))
    assert entry["$schema"].endswith("/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert CATALOG_ENTRY_REQUIRED <= set(entry) <= set(CATALOG_ENTRY_PROPERTIES)
    for key, value in entry.items():
        assert isinstance(value, CATALOG_ENTRY_PROPERTIES[key]), key
    assert entry["scm_type"] == "git" and entry["tier"] in (1, 3, 5)
    # The module lists itself under the same category, and the index builds the same dependencies as CMake names.
    assert f'translate("qSlicerAbstractCoreModule", "{entry["category"]}")' in (MODULE / "SDMOrganSeg.py").read_text(encoding="utf-8")
    assert entry["build_dependencies"] == _cmake_set("EXTENSION_DEPENDS").split(";")
    repository = entry["scm_url"].removesuffix(".git")
    assert _cmake_set("EXTENSION_HOMEPAGE").startswith(repository)
    for url in (_cmake_set("EXTENSION_ICONURL"), _cmake_set("EXTENSION_SCREENSHOTURLS")):
        owner_and_name = repository.split("github.com/")[1]
        assert url.startswith(f"https://raw.githubusercontent.com/{owner_and_name}/{entry['scm_revision']}/")
        assert (REPO / url.split(f"/{entry['scm_revision']}/", 1)[1]).is_file(), url
