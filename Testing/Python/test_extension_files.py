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
    on_disk = {p.relative_to(MODULE).as_posix() for pattern in ("SDMOrganSegLib/**/*.py", "Scripts/*.py") for p in MODULE.glob(pattern)}
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
    assert _cmake_set("EXTENSION_CATEGORY") == json.loads((REPO / "SDMOrganSeg.json").read_text(encoding="utf-8"))["category"]
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
    for url in [_cmake_set("EXTENSION_ICONURL"), *_cmake_set("EXTENSION_SCREENSHOTURLS").split()]:
        owner_and_name = repository.split("github.com/")[1]
        assert url.startswith(f"https://raw.githubusercontent.com/{owner_and_name}/{entry['scm_revision']}/")
        assert (REPO / url.split(f"/{entry['scm_revision']}/", 1)[1]).is_file(), url


def _s4ext() -> dict[str, str]:
    values = {}
    for line in (REPO / "SDMOrganSeg.s4ext").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            keyword, _, value = line.partition(" ")
            values[keyword] = value.strip()
    return values


def test_slicer_5_6_s4ext_description_agrees_with_the_cmake_lists_and_the_json_entry():
    """Slicer 5.6's Extensions Index reads only .s4ext files: SDMOrganSeg.s4ext beside SDMOrganSeg.json."""
    entry = json.loads((REPO / "SDMOrganSeg.json").read_text(encoding="utf-8"))
    s4ext = _s4ext()
    assert {"scm", "scmurl", "scmrevision", "depends", "build_subdirectory", "homepage", "category", "iconurl", "description", "screenshoturls"} <= set(s4ext)
    assert (s4ext["scm"], s4ext["scmurl"], s4ext["scmrevision"]) == (entry["scm_type"], entry["scm_url"], entry["scm_revision"])
    assert (s4ext["category"], s4ext["build_subdirectory"]) == (entry["category"], entry["build_subdirectory"])
    assert s4ext["depends"].split() == entry["build_dependencies"] == _cmake_set("EXTENSION_DEPENDS").split(";")
    for keyword, cmake in (("homepage", "EXTENSION_HOMEPAGE"), ("iconurl", "EXTENSION_ICONURL"), ("screenshoturls", "EXTENSION_SCREENSHOTURLS"),
                           ("description", "EXTENSION_DESCRIPTION"), ("contributors", "EXTENSION_CONTRIBUTORS")):
        assert s4ext[keyword] == _cmake_set(cmake), keyword


def test_license_at_the_root_is_the_apache_license_pyproject_names():
    """The Extensions Index rejects an entry without a LICENSE file at the repository root."""
    import hashlib

    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert text.split("\n")[1].strip() == "Apache License" and "Version 2.0, January 2004" in text
    # The unmodified text of https://www.apache.org/licenses/LICENSE-2.0.txt.
    assert hashlib.md5((REPO / "LICENSE").read_bytes()).hexdigest() == "3b83ef96387f14655fc854ddc3c6bd57"
    assert 'license = { text = "Apache-2.0" }' in (REPO / "pyproject.toml").read_text(encoding="utf-8")


def test_unpublished_urls_are_one_clearly_named_placeholder_the_readme_explains():
    urls = [_cmake_set(name) for name in ("EXTENSION_HOMEPAGE", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS")]
    urls += [json.loads((REPO / "SDMOrganSeg.json").read_text(encoding="utf-8"))["scm_url"], _s4ext()["scmurl"]]
    assert all("/PLACEHOLDER-OWNER/SDMOrganSeg" in url for url in urls)
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "PLACEHOLDER-OWNER" in readme and "Publishing the extension" in readme
