"""The Python packages SDMOrganSeg needs beyond what 3D Slicer bundles, and whether the installed ones do.

Checked from the packages' metadata, without importing them: importing PyTorch takes seconds, and on
Windows an imported package's files are locked, so an upgrade would fail. The Slicer module installs what
:func:`unmet` reports (after the user agrees); the required packages in one go, each optional one on its
own so that one without a wheel for the platform is skipped with a note instead of failing the install
(:class:`Installation`, which imports ``slicer`` only when it runs).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import re
import sys
from dataclasses import dataclass
from typing import Iterable, Sequence


@dataclass(frozen=True)
class Requirement:
    """A package: import name, pip name, lowest version that works, and what it is for."""

    module: str
    distribution: str
    minimum: str
    purpose: str

    @property
    def pip(self) -> str:
        """The pip requirement, e.g. ``torch>=2.2``."""
        return f"{self.distribution}>={self.minimum}"


#: Runs the network of a model that has ``model.onnx`` (every shipped model): 13-28 MB to download. 1.19.2 is
#: the last release with wheels for Python 3.9 (Slicer 5.6 and 5.8).
ONNXRUNTIME = Requirement("onnxruntime", "onnxruntime", "1.19.2", "runs the network")
#: Trains and fine-tunes, and runs the network of a model without ``model.onnx`` (or with ``--runtime torch``).
TORCH = Requirement("torch", "torch", "2.2", "trains models, and runs those without model.onnx")
#: The ONNX exporter PyTorch uses to write ``model.onnx`` at the end of a training.
EXPORTER = (
    Requirement("onnx", "onnx", "1.17", "writes model.onnx at the end of a training"),
    Requirement("onnxscript", "onnxscript", "0.5", "writes model.onnx at the end of a training"),
)
#: Installed with pip along with the network's runtime (Slicer bundles numpy, SimpleITK and VTK; 5.6 and later also scipy).
REQUIRED = (
    Requirement("safetensors", "safetensors", "0.4", "reads the model weights"),
    Requirement("edt", "edt", "3.0", "computes distance maps"),
    Requirement("scipy", "scipy", "1.11", "computes the surface metrics"),
)
#: Each tried on its own; without them the module still works, more slowly.
OPTIONAL = (Requirement("isal", "isal", "1.6", "gzips the saved volumes 5-6x faster (zlib is used without it)"),)
#: What the metrics need (no network).
FOR_METRICS = ("scipy",)


def for_segmentation(runtime: str, has_onnx: bool) -> tuple[Requirement, ...]:
    """The runtime a segmentation needs: ONNX Runtime for a model with ``model.onnx`` (``runtime`` ``auto`` or
    ``onnxruntime``), PyTorch for ``torch`` or a model without it (see ``modelfiles.choose_runtime``)."""
    if runtime == "torch" or (runtime == "auto" and not has_onnx):
        return (TORCH,)
    return (ONNXRUNTIME,)


#: What training and fine-tuning need on top of :data:`REQUIRED`.
FOR_TRAINING = (TORCH, *EXPORTER)


def version_tuple(version: str) -> tuple[int, ...]:
    """The release numbers of a version string: ``"2.13.0+cu128"`` -> ``(2, 13, 0)``."""
    match = re.match(r"\d+(?:\.\d+)*", version.strip())
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def installed_version(requirement: Requirement) -> str | None:
    """The installed version; None when the package cannot be imported, ``""`` when it has no metadata."""
    if importlib.util.find_spec(requirement.module) is None:
        return None
    try:
        return importlib.metadata.version(requirement.distribution)
    except importlib.metadata.PackageNotFoundError:
        return ""  # importable without metadata (a source tree on the path): taken as it is


def problem(requirement: Requirement) -> str | None:
    """Why the installed package will not do (``not installed``, ``version X is older than Y``), or None."""
    version = installed_version(requirement)
    if version is None:
        return "not installed"
    if version and version_tuple(version) < version_tuple(requirement.minimum):
        return f"version {version} is older than the {requirement.minimum} needed"
    return None


def unmet(requirements: Iterable[Requirement]) -> list[tuple[Requirement, str]]:
    """(requirement, problem) for each requirement the installed packages do not meet."""
    found = [(requirement, problem(requirement)) for requirement in requirements]
    return [(requirement, reason) for requirement, reason in found if reason is not None]


def loaded_too_old(requirement: Requirement) -> str | None:
    """A one-line refusal when this process has imported the package and it is too old: pip would replace
    its files under the running code (and on Windows fail on the locked ones); only a restart loads the new
    version. None otherwise."""
    if requirement.module not in sys.modules:
        return None
    reason = problem(requirement)
    if not reason or reason == "not installed":
        return None
    return (
        f"{requirement.distribution} {installed_version(requirement)} is loaded in this Slicer session and is older than the "
        f"{requirement.minimum} needed; it cannot be upgraded while loaded: restart Slicer and run again: the "
        "upgrade is then offered before anything loads it"
    )


def describe(found: Sequence[tuple[Requirement, str]]) -> str:
    """One line per package: ``torch>=2.2 (runs the network): not installed``."""
    return "\n".join(f"{requirement.pip} ({requirement.purpose}): {reason}" for requirement, reason in found)


def failure_detail(error: BaseException) -> str:
    """What went wrong in an install, in a few words: pip's exit code (and last line, when known)."""
    code = getattr(error, "returncode", None)
    output = getattr(error, "output", None) or getattr(error, "stderr", None)
    lines = [line.strip() for line in output.splitlines() if line.strip()] if isinstance(output, str) else []
    detail = f"pip stopped with exit code {code}" if code is not None else " ".join(str(error).split()) or type(error).__name__
    return f"{detail}: {lines[-1]}" if lines else detail


def install_failure(error: BaseException, what: str) -> str:
    """A one-line message for an install of ``what`` that failed with ``error`` (e.g. CalledProcessError)."""
    return (
        f"could not install {what} ({failure_detail(error)}); check the network connection and try again "
        "(pip's messages are in the Python console)"
    )


# --- installing them in Slicer (the module's Logic: SDMOrganSegLogic.ensureDependencies) ---


def translated(text: str) -> str:
    """``text`` in the user's language: Slicer's translation in the context of the module file (SDMOrganSeg.py),
    whose panel and Logic say these words. Imported when called: this module imports without Slicer."""
    from slicer.i18n import translate

    return translate("SDMOrganSeg", text)


_ = translated


class Installation:
    """One installation in Slicer's Python, after the user agreed: ``installed`` (pip requirements) and
    ``notes`` for the user; ``offered_optional`` once the optional packages were offered (the module offers
    them once per session: one without a wheel for this platform would otherwise be asked for at every run)."""

    def __init__(self) -> None:
        self.installed: list[str] = []
        self.notes: list[str] = []
        self.offered_optional = False

    def run(self, required: Sequence[Requirement], offer_optional: bool, ask: bool) -> bool:
        """Install what of ``required`` (and, with ``offer_optional``, of :data:`OPTIONAL`) is missing or too
        old; False if the user declined. PyTorch comes from the PyTorch extension's PyTorchUtils when it is
        installed (light-the-torch picks the build that matches the NVIDIA driver), otherwise from pip. The
        other required packages are installed with pip in one go; each optional one on its own, and skipped
        with a note if that fails. A failed install raises SDMOrganSegError with one line."""
        import slicer

        from ..common.errors import SDMOrganSegError

        # A package this Slicer has imported cannot be replaced under it (as TotalSegmentator refuses too).
        loaded = [message for message in map(loaded_too_old, required) if message]
        if loaded:
            raise SDMOrganSegError(loaded[0])
        unmetRequired = unmet(required)
        unmetOptional = unmet(OPTIONAL) if offer_optional else []
        if not unmetRequired and not unmetOptional:
            return True
        self.offered_optional = True
        if ask:
            text = _("SDM Organ Segmentation needs these Python packages:\n\n{packages}\n\n").format(
                packages=describe(unmetRequired)) if unmetRequired else ""
            if unmetOptional:
                text += _("Optional (skipped if they cannot be installed):\n\n{packages}\n\n").format(packages=describe(unmetOptional))
            if any(requirement is TORCH for requirement, _reason in unmetRequired):
                text += _("PyTorch is large: about 0.2 GB to download for computers without an NVIDIA GPU, 2-3 GB with one "
                          "(1-6 GB on disk); the installation can take 5-20 minutes.\n\n")
            text += _("Install them now? This needs a network connection.")
            if not slicer.util.confirmOkCancelDisplay(text, windowTitle=_("Install Python packages")):
                return not unmetRequired  # without the optional ones the module works, more slowly
        with slicer.util.WaitCursor():
            others = [requirement for requirement, _reason in unmetRequired if requirement is not TORCH]
            if len(others) < len(unmetRequired) and not self._installTorch():
                return False
            if others:
                self._pipInstall([requirement.pip for requirement in others])
            for requirement, _reason in unmetOptional:
                try:
                    slicer.util.pip_install([requirement.pip])
                except Exception as error:  # e.g. no wheel for this platform: the module works without it
                    logging.exception("pip install %s failed", requirement.pip)
                    self.notes.append(_("Optional package {name} was not installed ({detail}): it only {purpose}.").format(
                        name=requirement.distribution, detail=failure_detail(error), purpose=requirement.purpose))
                else:
                    self.installed.append(requirement.pip)
        importlib.invalidate_caches()
        stillUnmet = unmet(required)
        if stillUnmet:
            raise SDMOrganSegError(_("after the installation {packages} still does not meet the requirement ({reason}); restart Slicer and try again").format(
                packages=stillUnmet[0][0].distribution, reason=stillUnmet[0][1]))
        return True

    def _pipInstall(self, requirements: list[str]) -> None:
        """slicer.util.pip_install, with a failure turned into one line (pip's output is in the Python console)."""
        import slicer

        from ..common.errors import SDMOrganSegError

        try:
            slicer.util.pip_install(requirements)
        except Exception as error:  # CalledProcessError, OSError, ...: pip's details are in the console already
            logging.exception("pip install %s failed", " ".join(requirements))
            raise SDMOrganSegError(install_failure(error, " ".join(requirements))) from None
        self.installed.extend(requirements)

    def _installTorch(self) -> bool:
        """Install or upgrade PyTorch (the user has agreed already); False if PyTorchUtils was declined."""
        from ..common.errors import SDMOrganSegError

        requirement = TORCH
        try:
            import PyTorchUtils  # the PyTorch extension
        except ImportError:
            PyTorchUtils = None
        if PyTorchUtils is None:
            self.notes.append(_("PyTorch was installed with pip; for the build that matches your GPU driver, "
                                "install the PyTorch extension from the Extensions Manager."))
            self._pipInstall([requirement.pip])
        else:
            try:
                torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=f">={requirement.minimum}")
            except Exception as error:  # light-the-torch or pip failed
                logging.exception("PyTorchUtils could not install PyTorch")
                raise SDMOrganSegError(install_failure(error, requirement.pip)) from None
            if torch is None:
                return False
            self.installed.append(requirement.pip)
        return True
