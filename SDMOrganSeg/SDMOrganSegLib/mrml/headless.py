"""A headless Slicer "application" on slicer-core, so that the module's Logic runs outside Slicer.

slicer-core (PyPI) ships Slicer's MRML library and module logics, but no ``slicer.app``, no
``slicer.mrmlScene`` and no ``slicer.modules``: those are made by Slicer's Qt application at start-up.
:func:`start` makes the non-Qt part of that set-up, as trame-slicer's ``SlicerApp`` does: a
``vtkMRMLScene``, a ``vtkSlicerApplicationLogic`` and the module logics SDMOrganSeg needs (colors,
volumes, models, segmentations, subject hierarchy, tables), each given the application logic and the
scene (which registers the module's node and storage-node classes), and registered under its module
name; node classes still missing after that are registered explicitly. It then sets ``slicer.mrmlScene`` and a minimal
``slicer.modules`` (``slicer.modules.segmentations.logic()`` and so on), so code written for Slicer's
Python runs unchanged.

Inside the real Slicer application none of this is needed: :func:`start` then returns Slicer's own
scene and logics, and the load/save helpers below work with either.

What Slicer's Qt layer does and this does not: no views, no layout, no terminology files, no default
colour *files* (only the built-in colour tables), and subject-hierarchy items are not created
automatically for new nodes (SDMOrganSeg creates the items it needs explicitly).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import slicer
import vtk

from ..common.errors import SDMOrganSegError
from ..common.files import atomic_path

#: Module name (as in ``slicer.modules.<name>``) -> logic class name in slicer-core.
_LOGIC_CLASSES = {
    "colors": "vtkMRMLColorLogic",  # vtkSlicerColorLogic would look for colour files in a Slicer install
    "volumes": "vtkSlicerVolumesLogic",
    "models": "vtkSlicerModelsLogic",
    "segmentations": "vtkSlicerSegmentationsModuleLogic",
    "subjecthierarchy": "vtkSlicerSubjectHierarchyModuleLogic",
    "tables": "vtkSlicerTablesLogic",
}
#: Names under which Slicer's application logic knows these logics (GetModuleLogic).
_APP_LOGIC_NAMES = {
    "colors": "Colors",
    "volumes": "Volumes",
    "models": "Models",
    "segmentations": "Segmentations",
    "subjecthierarchy": "SubjectHierarchy",
    "tables": "Tables",
}


#: Node classes SDMOrganSeg creates or reads. The logics register their module's classes when they get the
#: scene (vtkMRMLAbstractLogic::SetMRMLScene calls RegisterNodes); any still missing is registered here.
_NODE_CLASSES = (
    "vtkMRMLScalarVolumeNode", "vtkMRMLLabelMapVolumeNode", "vtkMRMLScalarVolumeDisplayNode", "vtkMRMLLabelMapVolumeDisplayNode",
    "vtkMRMLVolumeArchetypeStorageNode", "vtkMRMLSegmentationNode", "vtkMRMLSegmentationDisplayNode",
    "vtkMRMLSegmentationStorageNode", "vtkMRMLModelNode", "vtkMRMLModelDisplayNode", "vtkMRMLModelStorageNode",
    "vtkMRMLColorTableNode", "vtkMRMLTableNode", "vtkMRMLTableStorageNode", "vtkMRMLSubjectHierarchyNode",
    "vtkMRMLScriptedModuleNode",
)


def _register_node_classes(scene: Any) -> None:
    for class_name in _NODE_CLASSES:
        if not scene.IsNodeClassRegistered(class_name):
            scene.RegisterNodeClass(getattr(slicer, class_name)())


class _Module:
    """Stands in for a ``qSlicerAbstractModule``: only ``logic()`` and ``name``."""

    def __init__(self, name: str, logic: Any) -> None:
        self.name = name
        self._logic = logic

    def logic(self) -> Any:
        return self._logic


@dataclass
class HeadlessSlicer:
    """The scene and logics of a headless session (or of the running Slicer application)."""

    scene: Any
    app_logic: Any
    logics: dict[str, Any] = field(default_factory=dict)
    in_slicer: bool = False

    def logic(self, module: str) -> Any:
        """Logic of a module by its ``slicer.modules`` name (``"segmentations"``, ``"volumes"``...)."""
        return self.logics[module]


_session: HeadlessSlicer | None = None


def in_slicer_application() -> bool:
    """True inside Slicer's own Python (the Qt application exists), False on slicer-core."""
    return getattr(slicer, "app", None) is not None


def _remove_display_nodes(scene: Any, _event: int, node: Any) -> None:
    # Slicer's application removes a displayable node's display nodes with it; a bare scene does not.
    if scene is None or node is None or not hasattr(node, "GetNumberOfDisplayNodes"):
        return
    for index in reversed(range(node.GetNumberOfDisplayNodes())):
        display = node.GetNthDisplayNode(index)
        if display is not None and scene.IsNodePresent(display):
            scene.RemoveNode(display)


_remove_display_nodes.CallDataType = vtk.VTK_OBJECT  # receive the node as call data


def _create_session() -> HeadlessSlicer:
    # Send VTK/MRML warnings to stderr instead of a window that does not exist.
    output = vtk.vtkOutputWindow()
    output.SetDisplayModeToAlwaysStdErr()
    vtk.vtkOutputWindow.SetInstance(output)

    scene = slicer.vtkMRMLScene()
    scene.AddObserver(slicer.vtkMRMLScene.NodeAboutToBeRemovedEvent, _remove_display_nodes)
    # The application adds one crosshair node at start-up; some logics expect it.
    crosshair = slicer.vtkMRMLCrosshairNode()
    crosshair.SetCrosshairName("default")
    scene.AddNode(crosshair)

    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    app_logic.SetSliceLogics(vtk.vtkCollection())
    app_logic.SetViewLogics(vtk.vtkCollection())

    logics: dict[str, Any] = {}
    for module, class_name in _LOGIC_CLASSES.items():
        logic = getattr(slicer, class_name)()
        # Application logic first: some logics look up others through it when they get the scene.
        if hasattr(logic, "SetMRMLApplicationLogic"):
            logic.SetMRMLApplicationLogic(app_logic)
        logic.SetMRMLScene(scene)
        app_logic.SetModuleLogic(_APP_LOGIC_NAMES[module], logic)
        logics[module] = logic
    _register_node_classes(scene)
    # The built-in colour tables (Grey, Labels, ...) that volume display nodes refer to.
    logics["colors"].AddDefaultColorNodes()
    return HeadlessSlicer(scene=scene, app_logic=app_logic, logics=logics, in_slicer=False)


def _slicer_session() -> HeadlessSlicer:
    modules = slicer.modules
    logics = {name: getattr(modules, name).logic() for name in _LOGIC_CLASSES if hasattr(modules, name)}
    return HeadlessSlicer(scene=slicer.mrmlScene, app_logic=slicer.app.applicationLogic(), logics=logics, in_slicer=True)


def start(install_globals: bool = True) -> HeadlessSlicer:
    """The session: Slicer's own inside Slicer, else a headless one created on first call.

    With ``install_globals`` (the default) the headless session also becomes ``slicer.mrmlScene`` and
    ``slicer.modules``, as in Slicer; later calls return the same session.
    """
    global _session
    if in_slicer_application():
        return _slicer_session()
    if _session is None:
        _session = _create_session()
    if install_globals:
        slicer.mrmlScene = _session.scene
        slicer.modules = SimpleNamespace(**{name: _Module(name, logic) for name, logic in _session.logics.items()})
    return _session


def module_logic(module: str) -> Any:
    """``slicer.modules.<module>.logic()``, starting a headless session when none exists."""
    if not in_slicer_application() and getattr(slicer, "modules", None) is None:
        start()
    return getattr(slicer.modules, module).logic()


def default_scene() -> Any:
    """``slicer.mrmlScene``, starting a headless session when none exists."""
    if getattr(slicer, "mrmlScene", None) is None:
        start()
    return slicer.mrmlScene


# --- loading -----------------------------------------------------------------------------------------


def load_volume(path: str | Path, name: str | None = None, labelmap: bool = False, scene: Any = None) -> Any:
    """Read an image file with Slicer's volume reader into a new scalar (or label map) volume node.

    The node gets display nodes as when a user loads a file; the file is read by ITK through
    ``vtkSlicerVolumesLogic``, exactly as Slicer's "Add data" does.
    """
    path = Path(path)
    if not path.is_file():
        raise SDMOrganSegError(f"volume file {path} does not exist; check the path")
    logic = module_logic("volumes")
    scene = scene if scene is not None else default_scene()
    if logic.GetMRMLScene() is not scene:
        raise SDMOrganSegError("load_volume can only load into the session's scene")
    node_name = name or _file_stem(path)
    node = logic.AddArchetypeVolume(str(path), node_name, 1 if labelmap else 0)
    if node is None:
        raise SDMOrganSegError(f"Slicer could not read {path} as a volume; it must be an intact NIfTI, NRRD or MetaImage file")
    return node


def load_segmentation(path: str | Path, name: str | None = None) -> Any:
    """Read a ``.seg.nrrd`` (or a label map file, one segment per label value) into a segmentation node."""
    path = Path(path)
    if not path.is_file():
        raise SDMOrganSegError(f"segmentation file {path} does not exist; check the path")
    node = module_logic("segmentations").LoadSegmentationFromFile(str(path), True, name or _file_stem(path))
    if node is None:
        raise SDMOrganSegError(f"Slicer could not read {path} as a segmentation")
    return node


def _file_stem(path: Path) -> str:
    name = path.name
    for suffix in (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".vtk", ".vtp"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


# --- saving ------------------------------------------------------------------------------------------


def _storage_node_for(node: Any) -> Any:
    if node.IsA("vtkMRMLSegmentationNode"):
        return slicer.vtkMRMLSegmentationStorageNode()
    if node.IsA("vtkMRMLVolumeNode"):
        return slicer.vtkMRMLVolumeArchetypeStorageNode()
    if node.IsA("vtkMRMLModelNode"):
        storage = slicer.vtkMRMLModelStorageNode()
        # Files on disk are LPS, like images; Slicer converts from its RAS world when writing.
        storage.SetCoordinateSystem(slicer.vtkMRMLStorageNode.CoordinateSystemLPS)
        return storage
    if node.IsA("vtkMRMLTableNode"):
        return slicer.vtkMRMLTableStorageNode()
    raise SDMOrganSegError(f"cannot save a {node.GetClassName()}: no storage for this kind of node")


def save_node(node: Any, path: str | Path, overwrite: bool = False, compress: bool = True) -> Path:
    """Write a volume, segmentation (``.seg.nrrd``), model (``.vtk``/``.vtp``, LPS) or table node.

    The file is written under a temporary name in the same folder and renamed when complete, and an
    existing file is replaced only with ``overwrite``. The node is not changed (no storage node is added
    to the scene).
    """
    path = Path(path)
    storage = _storage_node_for(node)
    if hasattr(storage, "SetUseCompression"):
        storage.SetUseCompression(bool(compress))
    with atomic_path(path, overwrite) as temporary:
        temporary.unlink()  # the writer would otherwise log that it replaces this empty placeholder
        storage.SetFileName(str(temporary))
        if not storage.WriteData(node):
            raise SDMOrganSegError(f"could not write {node.GetName()} to {path}")
    return path


def temporary_directory() -> Path:
    """A folder for scratch files: Slicer's temporary folder inside Slicer, else the system's."""
    if in_slicer_application():
        return Path(slicer.app.temporaryPath)
    import tempfile

    return Path(os.environ.get("SDMORGANSEG_TMP") or tempfile.gettempdir())
