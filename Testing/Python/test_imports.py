"""Every library module imports on the Python running the tests, with and without PyTorch.

CI runs this file under Python 3.9 (Slicer 5.6 and 5.8) and 3.12 (Slicer 5.10) as well, where PyTorch is
not installed: what Python evaluates at import time (type aliases, decorators, default values) has to
work there, as Slicer imports the module at start-up and the worker and the batch script import the
library. Modules that import PyTorch at the top are imported a second time against a stand-in ``torch``
whose every attribute is a placeholder, so that their own module-level code runs on this Python too.
Each check runs in a fresh interpreter, so nothing stood in leaks into the other tests.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

LIBRARY = REPO / "SDMOrganSeg" / "SDMOrganSegLib"
#: Modules that import PyTorch at the top. Every other module must import without it: the Slicer module,
#: the model cards and the metrics are used before PyTorch is installed.
NEEDS_TORCH = {"method.augmentation", "method.losses", "method.network", "method.widening", "engines.training"}
#: Modules that need Slicer or slicer-core (no slicer-core wheel exists for Python 3.9).
NEEDS_SLICER = {"mrml.headless"}
#: Modules that need the review extra (trame-slicer, and with it slicer-core) at the top.
NEEDS_REVIEW = {"review.offscreenviews"}

_IMPORT_ALL = r"""
import importlib, json, sys, types

path, mode, names = sys.argv[1], sys.argv[2], sys.argv[3:]
if mode == "no-torch":
    sys.modules["torch"] = None  # "import torch" raises ModuleNotFoundError, as where it is not installed
else:
    class Placeholder:
        def __init__(self, *args, **kwargs): pass
        def __call__(self, *args, **kwargs): return Placeholder()
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return Placeholder()
        def __mro_entries__(self, bases): return (object,)  # class Net(torch.nn.Module)
        def __iter__(self): return iter(())

    class StandIn(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return Placeholder()

    for name in ("torch", "torch.nn", "torch.nn.functional", "torch.utils", "torch.utils.data", "torch.backends"):
        sys.modules[name] = StandIn(name)
sys.path.insert(0, path)
results = {}
for name in names:
    try:
        importlib.import_module("SDMOrganSegLib." + name)
        results[name] = None
    except ModuleNotFoundError as error:
        results[name] = ["missing", error.name]
    except Exception as error:
        results[name] = ["error", f"{type(error).__name__}: {error}"]
print(json.dumps(results))
"""


def _modules() -> list[str]:
    return sorted(".".join(path.relative_to(LIBRARY).with_suffix("").parts) for path in LIBRARY.rglob("*.py") if path.stem != "__init__")


def _import_all(mode: str, names: list[str]) -> dict:
    process = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALL, str(LIBRARY.parent), mode, *names],
        capture_output=True, text=True, timeout=300, cwd=str(REPO),
    )
    assert process.returncode == 0, process.stderr
    return json.loads(process.stdout.strip().splitlines()[-1])


def _slicer_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("slicer") is not None


def _review_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("trame_slicer") is not None


def test_the_lists_name_real_modules():
    assert NEEDS_TORCH | NEEDS_SLICER | NEEDS_REVIEW <= set(_modules())


def test_every_module_imports_without_pytorch():
    results = _import_all("no-torch", _modules())
    for name, failure in results.items():
        if failure is None:
            assert name not in NEEDS_TORCH, f"{name} imports without PyTorch now: take it off NEEDS_TORCH"
        elif failure == ["missing", "torch"]:
            assert name in NEEDS_TORCH, f"{name} must import without PyTorch (import it inside the functions that need it)"
        elif failure == ["missing", "trame_slicer"] and not _review_available():
            assert name in NEEDS_REVIEW, f"{name} must import without the review extra"
        elif failure == ["missing", "slicer"] and not _slicer_available():
            assert name in NEEDS_SLICER | NEEDS_REVIEW, f"{name} must import without Slicer"
        else:
            pytest.fail(f"SDMOrganSegLib.{name} does not import on Python {sys.version.split()[0]}: {failure}")


def test_modules_that_need_pytorch_evaluate_on_this_python():
    results = _import_all("stand-in-torch", sorted(NEEDS_TORCH))
    failures = {name: failure for name, failure in results.items() if failure is not None}
    assert not failures, f"on Python {sys.version.split()[0]}: {failures}"
