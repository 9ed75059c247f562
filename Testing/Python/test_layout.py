"""The library's layout (README, "Layout"): the rules import-linter cannot check.

import-linter (``lint-imports`` in .ci/run, contracts in pyproject.toml) checks the imports inside
SDMOrganSegLib. SDMOrganSeg.py, the Slicer module file, lives outside the package, so its rule is checked
here: it imports from the library only the public names of the Slicer side (``SDMOrganSegLib.mrml.__all__``).
And every module says what it is for, every sub-package what it may import, and a module longer than
600 lines why it is one module.
"""

from __future__ import annotations

import ast

from conftest import REPO

MODULE_FILE = REPO / "SDMOrganSeg" / "SDMOrganSeg.py"
LIBRARY = REPO / "SDMOrganSeg" / "SDMOrganSegLib"
SLICER_SIDE = "SDMOrganSegLib.mrml"
LONG = 600


def _public_names() -> set[str]:
    tree = ast.parse((LIBRARY / "mrml" / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(target, ast.Name) and target.id == "__all__" for target in node.targets):
            return set(ast.literal_eval(node.value))
    raise AssertionError("SDMOrganSegLib/mrml/__init__.py has no __all__")


def _library_imports(path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every import of SDMOrganSegLib in ``path``, at the top or in a function."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names if alias.name.split(".")[0] == "SDMOrganSegLib"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "SDMOrganSegLib":
            found.append((node.lineno, node.module, [alias.name for alias in node.names]))
    return found


def test_the_module_file_imports_only_the_slicer_sides_public_names():
    public = _public_names()
    imports = _library_imports(MODULE_FILE)
    assert imports, "SDMOrganSeg.py should import the library's Slicer side"
    for line, module, names in imports:
        assert module == SLICER_SIDE and names, f"SDMOrganSeg.py:{line}: import only `from {SLICER_SIDE} import ...`, not {module}"
        assert set(names) <= public, f"SDMOrganSeg.py:{line}: {sorted(set(names) - public)} not in {SLICER_SIDE}.__all__"


def test_the_public_names_exist():
    import importlib

    side = importlib.import_module(SLICER_SIDE)
    for name in _public_names():
        assert hasattr(side, name) or (LIBRARY / "mrml" / f"{name}.py").is_file(), name


def test_every_module_has_a_docstring_and_every_sub_package_says_what_it_may_import():
    for path in sorted(LIBRARY.rglob("*.py")):
        docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        where = path.relative_to(LIBRARY)
        assert docstring, f"{where} has no docstring"
        if path.name == "__init__.py" and path.parent.parent == LIBRARY:
            assert "May import" in docstring, f"{where}: say what the sub-package may import"


def test_long_modules_say_why_and_sub_packages_stay_small():
    for path in sorted(LIBRARY.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > LONG:
            assert "Long on purpose" in (ast.get_docstring(ast.parse(text)) or ""), f"{path.relative_to(LIBRARY)}: over {LONG} lines without a reason"
    for folder in [LIBRARY, *(p for p in LIBRARY.rglob("*") if p.is_dir() and p.name != "__pycache__")]:
        modules = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
        assert len(modules) <= 12, f"{folder.relative_to(LIBRARY.parent)} holds {len(modules)} modules: group them"
