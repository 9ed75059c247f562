"""The MRML side of SDMOrganSeg: volume nodes in, segmentation, SDM volumes and contour models out.

Used by the Slicer module's Logic, by ``Scripts/batch.py`` and by the tests, in Slicer or on slicer-core
(see :mod:`.headless`). Nothing here imports Qt. ``slicer`` itself is imported inside the functions that
need it, so the Slicer-free half of this module (:func:`compute_outputs`, :func:`worker_main`) also runs
in the plain Python process that does the heavy work in the background (:class:`BackgroundRun`).

Coordinates: MRML nodes live in Slicer's RAS world; SimpleITK images, files on disk and the core
library's contours are LPS. The two differ by negating x and y; :func:`volume_node_to_sitk` and
:func:`sitk_to_volume_node` convert the full IJK-to-physical matrix (oblique directions included), so a
round trip keeps the geometry exactly.

Order of work in :meth:`SDMSegmentationLogic.segment_volume`: everything heavy (network, contours) is
computed first, without touching the scene; only then are nodes created, and if anything fails or the
user cancels while they are created, every node created so far is removed again, so the scene's node
count is what it was before the run.
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

from .contours import DEFAULT_LEVELS, iso_surfaces, level_color, level_tag, lps_to_ras, parse_levels, write_polydata
from .errors import CancelCheck, CancelledError, ProgressCallback, SDMOrganSegError, check_cancel
from .files import atomic_path, safe_name
from .terminology import slicer_terminology_entry

#: LPS <-> RAS: negate x and y.
_FLIP = np.diag([-1.0, -1.0, 1.0])
#: Attribute that marks SDMOrganSeg's shared diverging colour table in a scene.
_COLOR_TABLE_ATTRIBUTE = "SDMOrganSeg.ColorTable"
#: Opacity of the 3D surfaces of nonzero levels (the level-0 surface, the organ itself, is opaque).
OUTER_LEVEL_OPACITY = 0.3
#: Segment-matching modes of :func:`match_segments`.
MATCH_BY_NAME, MATCH_BY_ORDER = "name", "order"
#: Columns of the metrics table (and of its CSV).
METRICS_COLUMNS = ("Organ", "Dice", "HD (mm)", "HD95 (mm)", "ASD (mm)")


def _slicer() -> Any:
    import slicer  # only where Slicer or slicer-core exists; the worker process never gets here

    return slicer


def _report(progress: ProgressCallback | None) -> ProgressCallback:
    return progress or (lambda fraction, message: None)


# --- geometry: volume nodes <-> SimpleITK images -------------------------------------------------------


def ijk_to_ras_matrix(volumeNode: Any) -> np.ndarray:
    """The node's 4x4 IJK-to-RAS matrix as a numpy array."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _vtk_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def volume_node_to_sitk(volumeNode: Any) -> sitk.Image:
    """A SimpleITK image (LPS) with the voxels and exact geometry of a scalar volume node.

    The node's own transform (its parent transform node) is not applied: the image is in the node's
    local coordinates, and outputs built from it are put under the same transform.
    """
    if volumeNode is None:
        raise SDMOrganSegError("no input volume is selected; choose a volume to segment")
    name = volumeNode.GetName()
    image_data = volumeNode.GetImageData()
    if image_data is None or image_data.GetPointData() is None or image_data.GetPointData().GetScalars() is None:
        raise SDMOrganSegError(f"volume {name!r} holds no image data; load a volume first")
    components = image_data.GetNumberOfScalarComponents()
    if components != 1:
        raise SDMOrganSegError(
            f"volume {name!r} has {components} components per voxel (colour or vector image); give a scalar (grey-level) volume"
        )
    dims = image_data.GetDimensions()
    scalars = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars())
    image = sitk.GetImageFromArray(scalars.reshape(dims[2], dims[1], dims[0]))  # copies the voxels
    ijk_to_ras = ijk_to_ras_matrix(volumeNode)
    # MRML keeps geometry in the node; a non-zero extent start still shifts the first voxel's index.
    first_index = np.array(image_data.GetExtent()[0::2], dtype=float)
    linear = ijk_to_ras[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0):
        raise SDMOrganSegError(f"volume {name!r} has a degenerate geometry (zero voxel size); it cannot be segmented")
    direction_lps = _FLIP @ (linear / spacing)
    origin_lps = _FLIP @ (linear @ first_index + ijk_to_ras[:3, 3])
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin_lps])
    image.SetDirection([float(d) for d in direction_lps.reshape(-1)])
    return image


def _image_data_from_sitk(image: sitk.Image, dtype: Any = None) -> vtk.vtkImageData:
    array = sitk.GetArrayFromImage(image)  # a fresh array, handed to VTK without another copy
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(image.GetSize())
    vtk_array = numpy_support.numpy_to_vtk(np.ascontiguousarray(array).reshape(-1), deep=False)
    image_data.GetPointData().SetScalars(vtk_array)
    return image_data


def sitk_ijk_to_ras(image: sitk.Image) -> np.ndarray:
    """4x4 IJK-to-RAS matrix of a SimpleITK image (whose geometry is LPS)."""
    matrix = np.eye(4)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    matrix[:3, :3] = _FLIP @ direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = _FLIP @ np.asarray(image.GetOrigin(), dtype=float)
    return matrix


def sitk_to_volume_node(
    image: sitk.Image,
    name: str = "volume",
    scene: Any = None,
    node_class: str = "vtkMRMLScalarVolumeNode",
    dtype: Any = None,
) -> Any:
    """A new volume node (added to ``scene``, default ``slicer.mrmlScene``) holding ``image``.

    The node's IJK-to-RAS matrix is the image's LPS geometry with x and y negated; no display node is
    created (call ``CreateDefaultDisplayNodes`` to show it).
    """
    slicer = _slicer()
    scene = scene if scene is not None else slicer.mrmlScene
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise SDMOrganSegError("only scalar 3D images can become volume nodes")
    node = scene.AddNewNodeByClass(node_class, scene.GenerateUniqueName(name))
    node.SetIJKToRASMatrix(_vtk_matrix(sitk_ijk_to_ras(image)))
    node.SetAndObserveImageData(_image_data_from_sitk(image, dtype))
    return node


# --- the computation (no scene needed) -----------------------------------------------------------------


@dataclass(frozen=True)
class OrganSpec:
    """An organ as the outputs need it: segment name, label value, colour (RGB in [0, 1]) and, when the
    card has one, Slicer's terminology entry string (SNOMED CT codes; see :mod:`.terminology`)."""

    name: str
    label: int
    color: tuple[float, float, float]
    terminology_entry: str = ""


@dataclass
class ComputedOutputs:
    """Everything one run computed, on the input's grid, before any node exists.

    ``sdms`` maps organ name to its SDM image; ``surfaces`` maps organ name and level to the iso-surface
    in LPS millimetres (possibly empty when the SDM never reaches that level).
    """

    model_name: str
    device: str
    organs: list[OrganSpec]
    labels: sitk.Image
    sdms: dict[str, sitk.Image]
    surfaces: dict[str, dict[float, vtk.vtkPolyData]]
    levels: tuple[float, ...]
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)  #: options that change the result (see SegmentationResult)

    def organ_volumes_ml(self) -> dict[str, float]:
        voxel_ml = float(np.prod(self.labels.GetSpacing())) / 1000.0
        array = sitk.GetArrayViewFromImage(self.labels)
        counts = np.bincount(array.reshape(-1).astype(np.int64), minlength=max(o.label for o in self.organs) + 1)
        return {organ.name: float(counts[organ.label]) * voxel_ml for organ in self.organs}


def as_levels(levels: str | Sequence[float]) -> tuple[float, ...]:
    """Levels from text (``"0, 0.1"``) or numbers; a bad value is an SDMOrganSegError naming it."""
    try:
        return parse_levels(levels)
    except ValueError as error:
        raise SDMOrganSegError(f"{error} (got {levels!r})") from None


def compute_outputs(
    image: sitk.Image,
    model_dir: str | Path | None = None,
    device: str = "auto",
    levels: str | Sequence[float] = DEFAULT_LEVELS,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
    fraction: tuple[float, float] = (0.0, 1.0),
    *,
    tta: bool = False,
    largest_component: bool = False,
) -> ComputedOutputs:
    """Segment ``image`` with a model folder and contour the SDMs; no MRML involved.

    ``fraction`` is the part of the progress range this step reports into; ``tta`` and ``largest_component``
    are :func:`SDMOrganSegLib.inference.segment_image`'s.
    """
    check_cancel(cancel)  # before importing PyTorch, which takes seconds
    from .inference import segment_image  # torch: imported only when a run starts
    from .modelfiles import load_model, resolve_model

    levels = as_levels(levels)
    report = _report(progress)
    low, high = fraction
    started = time.perf_counter()
    report(low, "loading the model")
    model = load_model(resolve_model(model_dir))
    check_cancel(cancel)

    def network_progress(part: float, message: str) -> None:
        report(low + (high - low) * 0.02 + (high - low) * 0.86 * part, message)

    result = segment_image(image, model, device, progress=network_progress, cancel=cancel, tta=tta, largest_component=largest_component)
    surfaces: dict[str, dict[float, vtk.vtkPolyData]] = {}
    tick = time.perf_counter()
    for index, organ in enumerate(result.organs):
        check_cancel(cancel)
        report(low + (high - low) * (0.88 + 0.12 * index / len(result.organs)), f"contours of {organ.name}")
        surfaces[organ.name] = iso_surfaces(result.sdms[organ.name], levels)
    timings = dict(result.timings, contours_s=time.perf_counter() - tick, compute_s=time.perf_counter() - started)
    report(high, "computed")
    return ComputedOutputs(
        model_name=result.model_name,
        device=result.device,
        organs=[
            OrganSpec(o.name, int(o.label), tuple(float(c) for c in o.color), slicer_terminology_entry(o.terminology) if o.terminology else "")
            for o in result.organs
        ],
        labels=result.labels,
        sdms=dict(result.sdms),
        surfaces=surfaces,
        levels=levels,
        timings=timings,
        notes=list(result.notes),
        settings=dict(result.settings),
    )


# --- the nodes -----------------------------------------------------------------------------------------


@dataclass
class OutputNodes:
    """The nodes one run created, all inside one subject-hierarchy folder."""

    folder_item: int
    segmentation: Any
    sdm_volumes: dict[str, Any]
    contours: dict[str, dict[float, Any]]
    color_table: Any
    computed: ComputedOutputs

    def nodes(self) -> list[Any]:
        """The run's data nodes (not display nodes, not the shared colour table)."""
        found = [self.segmentation, *self.sdm_volumes.values()]
        for models in self.contours.values():
            found.extend(models.values())
        return found

    def organ_volumes_ml(self) -> dict[str, float]:
        return self.computed.organ_volumes_ml()


def _node_ids(scene: Any) -> list[str]:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


@contextlib.contextmanager
def _removed_on_failure(scene: Any, keep: bool = True) -> Iterator[list[int]]:
    """Remove every node added inside the block if it raises (or always, with ``keep=False``).

    Yields a list to which the block appends subject-hierarchy items it created (folders are items,
    not nodes). Nodes are found by comparing node IDs before and after, which also catches display,
    storage and colour nodes created on the way.
    """
    before = set(_node_ids(scene))
    items: list[int] = []
    try:
        yield items
    except BaseException:
        _remove_new(scene, before, items)
        raise
    if not keep:
        _remove_new(scene, before, items)


def _remove_new(scene: Any, before: set[str], items: list[int]) -> None:
    added = [node_id for node_id in _node_ids(scene) if node_id not in before]
    for node_id in reversed(added):
        node = scene.GetNodeByID(node_id)
        if node is not None and scene.IsNodePresent(node):
            scene.RemoveNode(node)
    sh = scene.GetSubjectHierarchyNode()
    for item in reversed(items):
        if sh is not None and item:
            sh.RemoveItem(item, False, True)


def _put_in_folder(scene: Any, node: Any, folder: int) -> None:
    sh = scene.GetSubjectHierarchyNode()
    item = sh.GetItemByDataNode(node)
    if item:
        sh.SetItemParent(item, folder)
    else:  # slicer-core does not add items for new nodes by itself; Slicer's application does
        sh.CreateItem(folder, node)


def _unique_folder_name(scene: Any, name: str) -> str:
    sh = scene.GetSubjectHierarchyNode()
    children = vtk.vtkIdList()
    sh.GetItemChildren(sh.GetSceneItemID(), children, False)
    taken = {sh.GetItemName(children.GetId(i)) for i in range(children.GetNumberOfIds())}
    candidate, number = name, 2
    while candidate in taken:
        candidate, number = f"{name} ({number})", number + 1
    return candidate


def diverging_color_table(scene: Any) -> Any:
    """The scene's SDMOrganSeg diverging colour table (blue inside, white at 0, red outside); made once."""
    slicer = _slicer()
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLColorTableNode")
        if node.GetAttribute(_COLOR_TABLE_ATTRIBUTE) == "diverging":
            return node
    table = slicer.vtkMRMLColorTableNode()
    table.SetName(scene.GenerateUniqueName("SDM diverging (blue inside, red outside)"))
    table.SetTypeToUser()
    table.SetAttribute(_COLOR_TABLE_ATTRIBUTE, "diverging")
    table.SetHideFromEditors(False)
    count = 256
    table.SetNumberOfColors(count)
    inside, zero, outside = np.array([0.23, 0.30, 0.75]), np.array([0.97, 0.97, 0.97]), np.array([0.71, 0.02, 0.15])
    for index in range(count):
        t = index / (count - 1) * 2 - 1  # -1 (most inside) .. +1 (farthest outside)
        rgb = zero + (inside - zero) * -t if t < 0 else zero + (outside - zero) * t
        table.SetColor(index, f"{t:+.3f}", float(rgb[0]), float(rgb[1]), float(rgb[2]), 1.0)
    scene.AddNode(table)
    return table


def _oriented_labelmap(labels: sitk.Image, ijk_to_ras: np.ndarray) -> Any:
    slicer = _slicer()
    maximum = int(sitk.GetArrayViewFromImage(labels).max(initial=0))
    dtype = np.uint8 if maximum < 256 else np.uint16
    image_data = _image_data_from_sitk(labels, dtype)
    oriented = slicer.vtkOrientedImageData()
    oriented.ShallowCopy(image_data)
    oriented.SetImageToWorldMatrix(_vtk_matrix(ijk_to_ras))
    return oriented


def _segment_ids(segmentation: Any) -> list[str]:
    return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]


class SDMSegmentationLogic:
    """Runs a model on volume nodes and builds the output nodes in a scene (default ``slicer.mrmlScene``)."""

    def __init__(self, scene: Any = None) -> None:
        self._scene = scene

    @property
    def scene(self) -> Any:
        return self._scene if self._scene is not None else _slicer().mrmlScene

    def segment_volume(
        self,
        volumeNode: Any,
        model_dir: str | Path | None = None,
        device: str = "auto",
        levels: str | Sequence[float] = DEFAULT_LEVELS,
        show2D: bool = True,
        show3D: bool = True,
        progress: ProgressCallback | None = None,
        cancel: CancelCheck | None = None,
        *,
        tta: bool = False,
        largest_component: bool = False,
    ) -> OutputNodes:
        """Segment a volume node and add the outputs to the scene (all or nothing).

        Args:
            volumeNode: scalar volume node in the scene.
            model_dir: model folder or shipped model name; None: the default shipped model.
            device: ``auto``, ``cpu`` or ``cuda``.
            levels: SDM iso-contour levels, a sequence or text such as ``"0, 0.1, 0.2, 0.3"``.
            show2D, show3D: show the contours in slice views / the surfaces in 3D views.
            progress: called with (fraction, message).
            cancel: ``threading.Event`` or callable; when set the run stops and leaves no nodes.
            tta, largest_component: see :func:`SDMOrganSegLib.inference.segment_image`.
        """
        levels = as_levels(levels)
        image = volume_node_to_sitk(volumeNode)
        computed = compute_outputs(
            image, model_dir, device, levels, progress, cancel, fraction=(0.0, 0.9), tta=tta, largest_component=largest_component
        )
        return self.create_nodes(volumeNode, computed, show2D, show3D, progress, cancel)

    def create_nodes(
        self,
        volumeNode: Any,
        computed: ComputedOutputs,
        show2D: bool = True,
        show3D: bool = True,
        progress: ProgressCallback | None = None,
        cancel: CancelCheck | None = None,
    ) -> OutputNodes:
        """Add the nodes for ``computed`` (a run on ``volumeNode``); removes them again on any failure."""
        scene = self.scene
        if volumeNode is None or not scene.IsNodePresent(volumeNode):
            raise SDMOrganSegError("the input volume was removed from the scene while it was being segmented; nothing was added")
        report = _report(progress)
        ijk_to_ras = ijk_to_ras_matrix(volumeNode)
        if computed.labels.GetSize() != volumeNode.GetImageData().GetDimensions():
            raise SDMOrganSegError("the input volume changed while it was being segmented; run the segmentation again")
        with _removed_on_failure(scene) as items:
            sh = scene.GetSubjectHierarchyNode()
            base = f"{volumeNode.GetName()} — {computed.model_name}"
            folder = sh.CreateFolderItem(sh.GetSceneItemID(), _unique_folder_name(scene, base))
            items.append(folder)
            sh.SetItemAttribute(folder, "SDMOrganSeg.Model", computed.model_name)
            transform_id = volumeNode.GetTransformNodeID()

            report(0.9, "creating the segmentation")
            segmentation = self._segmentation_node(volumeNode, computed, ijk_to_ras, base, show2D)
            nodes = [segmentation]
            _put_in_folder(scene, segmentation, folder)
            check_cancel(cancel)

            color_table = diverging_color_table(scene)
            sdm_volumes: dict[str, Any] = {}
            contours: dict[str, dict[float, Any]] = {}
            for index, organ in enumerate(computed.organs):
                check_cancel(cancel)
                report(0.92 + 0.08 * index / len(computed.organs), f"creating the nodes of {organ.name}")
                volume = self._sdm_node(computed.sdms[organ.name], ijk_to_ras, f"{base} SDM {organ.name}", color_table)
                volume.SetAttribute("SDMOrganSeg.Organ", organ.name)
                _put_in_folder(scene, volume, folder)
                sdm_volumes[organ.name] = volume
                nodes.append(volume)
                organ_folder = sh.CreateFolderItem(folder, f"{organ.name} contours")
                items.append(organ_folder)
                contours[organ.name] = {}
                for level in computed.levels:
                    check_cancel(cancel)
                    model = self._contour_node(
                        computed.surfaces[organ.name][level], f"{base} {organ.name} SDM {level_tag(level)}", level, show2D, show3D
                    )
                    model.SetAttribute("SDMOrganSeg.Organ", organ.name)
                    model.SetAttribute("SDMOrganSeg.Level", level_tag(level))
                    _put_in_folder(scene, model, organ_folder)
                    contours[organ.name][level] = model
                    nodes.append(model)
            if transform_id:
                for node in nodes:
                    node.SetAndObserveTransformNodeID(transform_id)
            check_cancel(cancel)
            report(1.0, "done")
        return OutputNodes(folder, segmentation, sdm_volumes, contours, color_table, computed)

    def _segmentation_node(self, volumeNode: Any, computed: ComputedOutputs, ijk_to_ras: np.ndarray, base: str, show2D: bool) -> Any:
        slicer = _slicer()
        scene = self.scene
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(f"{base} segmentation"))
        node.SetAttribute("SDMOrganSeg.Model", computed.model_name)
        node.CreateDefaultDisplayNodes()
        node.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        segmentation = node.GetSegmentation()
        segmentation.SetSourceRepresentationName(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
        # One shared label map layer for all organs: the label map has one value per voxel anyway.
        labelmap = _oriented_labelmap(computed.labels, ijk_to_ras)
        used_ids: set[str] = set()
        for organ in computed.organs:
            segment_id = safe_name(organ.name)
            while segment_id in used_ids:
                segment_id += "_"
            used_ids.add(segment_id)
            segment = slicer.vtkSegment()
            segment.SetName(organ.name)
            segment.SetColor(*organ.color)
            segment.SetLabelValue(organ.label)
            if organ.terminology_entry:
                # Slicer shows the standard name and codes, and DICOM SEG export writes them.
                segment.SetTag("TerminologyEntry", organ.terminology_entry)
            segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(), labelmap)
            segmentation.AddSegment(segment, segment_id)
        display = node.GetDisplayNode()
        display.SetVisibility(bool(show2D))
        # The level-0 contour line and surface already draw the boundary: fill only, no 3D duplicate.
        display.SetVisibility2DFill(True)
        display.SetVisibility2DOutline(False)
        display.SetOpacity2DFill(0.25)
        display.SetVisibility3D(False)
        return node

    def _sdm_node(self, sdm: sitk.Image, ijk_to_ras: np.ndarray, name: str, color_table: Any) -> Any:
        slicer = _slicer()
        scene = self.scene
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))
        node.SetIJKToRASMatrix(_vtk_matrix(ijk_to_ras))  # the input volume's matrix, exactly
        node.SetAndObserveImageData(_image_data_from_sitk(sdm, np.float32))
        display = slicer.vtkMRMLScalarVolumeDisplayNode()
        scene.AddNode(display)
        display.SetAndObserveColorNodeID(color_table.GetID())
        array = sitk.GetArrayViewFromImage(sdm)
        extreme = max(float(np.abs(array).max(initial=0.0)), 1e-6)
        # Symmetric around 0 so that white is the organ surface and the colours mean the same in every organ.
        display.AutoWindowLevelOff()
        display.SetWindowLevel(2.0 * extreme, 0.0)
        display.SetInterpolate(True)
        node.SetAndObserveDisplayNodeID(display.GetID())
        return node

    def _contour_node(self, polydata_lps: vtk.vtkPolyData, name: str, level: float, show2D: bool, show3D: bool) -> Any:
        scene = self.scene
        node = scene.AddNewNodeByClass("vtkMRMLModelNode", scene.GenerateUniqueName(name))
        node.SetAndObservePolyData(lps_to_ras(polydata_lps))
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        display.SetColor(*level_color(level))
        display.SetScalarVisibility(False)
        display.SetBackfaceCulling(False)
        display.SetOpacity(1.0 if abs(level) < 1e-9 else OUTER_LEVEL_OPACITY)
        display.SetVisibility(True)
        # In slice views a model is drawn as its intersection with the slice: the iso-contour line.
        display.SetVisibility2D(bool(show2D))
        display.SetSliceIntersectionThickness(2)
        display.SetSliceIntersectionOpacity(1.0)
        display.SetVisibility3D(bool(show3D))
        return node

    def set_visibility(self, outputs: OutputNodes, show2D: bool, show3D: bool) -> None:
        """Show or hide a run's contours in slice views and its surfaces in 3D views."""
        outputs.segmentation.GetDisplayNode().SetVisibility(bool(show2D))
        for models in outputs.contours.values():
            for model in models.values():
                display = model.GetDisplayNode()
                display.SetVisibility2D(bool(show2D))
                display.SetVisibility3D(bool(show3D))

    def remove_outputs(self, outputs: OutputNodes) -> None:
        """Remove a run's nodes and folders (not the shared colour table)."""
        scene = self.scene
        for node in reversed(outputs.nodes()):
            if scene.IsNodePresent(node):
                for index in reversed(range(node.GetNumberOfDisplayNodes())):
                    display = node.GetNthDisplayNode(index)
                    if display is not None and scene.IsNodePresent(display):
                        scene.RemoveNode(display)
                scene.RemoveNode(node)
        sh = scene.GetSubjectHierarchyNode()
        if sh is not None and outputs.folder_item:
            sh.RemoveItem(outputs.folder_item, False, True)


# --- metrics -------------------------------------------------------------------------------------------


def _normalised(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def match_segments(segmentationNode: Any, referenceSegmentationNode: Any, mode: str = MATCH_BY_NAME) -> list[tuple[str, str]]:
    """(segment ID, reference segment ID) pairs: by name (ignoring case, spaces, ``_`` and ``-``) or by order."""
    segmentation = segmentationNode.GetSegmentation()
    reference = referenceSegmentationNode.GetSegmentation()
    ids, reference_ids = _segment_ids(segmentation), _segment_ids(reference)
    if mode == MATCH_BY_ORDER:
        if len(ids) != len(reference_ids):
            raise SDMOrganSegError(
                f"matching by order needs as many segments in both: {len(ids)} vs {len(reference_ids)}; match by name instead"
            )
        return list(zip(ids, reference_ids))
    if mode != MATCH_BY_NAME:
        raise SDMOrganSegError(f"unknown segment matching {mode!r}; use {MATCH_BY_NAME!r} or {MATCH_BY_ORDER!r}")
    by_name = {_normalised(reference.GetSegment(i).GetName()): i for i in reference_ids}
    pairs = [(i, by_name[_normalised(segmentation.GetSegment(i).GetName())]) for i in ids if _normalised(segmentation.GetSegment(i).GetName()) in by_name]
    if not pairs:
        raise SDMOrganSegError(
            f"no segment of {segmentationNode.GetName()!r} has the name of a segment of {referenceSegmentationNode.GetName()!r}; "
            "rename the reference segments or match by order"
        )
    return pairs


def _export_mask(segmentationNode: Any, segment_id: str, geometry_node: Any, scene: Any) -> tuple[np.ndarray, Any]:
    slicer = _slicer()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", scene.GenerateUniqueName("__sdmorganseg_temp__"))
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if geometry_node is None:
        ok = logic.ExportSegmentsToLabelmapNode(segmentationNode, ids, labelmap, None, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
    else:
        ok = logic.ExportSegmentsToLabelmapNode(segmentationNode, ids, labelmap, geometry_node)
    if not ok:
        raise SDMOrganSegError(f"could not export segment {segment_id!r} of {segmentationNode.GetName()!r} to a label map")
    image_data = labelmap.GetImageData()
    dims = image_data.GetDimensions()
    mask = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0]) != 0
    return mask, labelmap


def compute_metrics(
    segmentationNode: Any,
    referenceSegmentationNode: Any,
    segment_pairs: Sequence[tuple[str, str]] | None = None,
    matching: str = MATCH_BY_NAME,
    scene: Any = None,
) -> Any:
    """Dice, HD, HD95 and ASD of each segment against its reference segment, as a new table node.

    Both segmentations are exported to label maps on one geometry: the segmentation's reference volume
    (the volume it was made from), or its own reference geometry when it has none, so a reference drawn
    on another grid is resampled (nearest neighbour) onto the segmented volume's grid. ``segment_pairs``
    lists (segment ID, reference segment ID); default: :func:`match_segments` with ``matching``.
    Columns: :data:`METRICS_COLUMNS`; distances in mm, ``inf`` when one of the two masks is empty.
    """
    from .metrics import organ_metrics

    slicer = _slicer()
    scene = scene if scene is not None else slicer.mrmlScene
    if segmentationNode is None or referenceSegmentationNode is None:
        raise SDMOrganSegError("choose both a segmentation and a reference segmentation to compare")
    pairs = list(segment_pairs) if segment_pairs is not None else match_segments(segmentationNode, referenceSegmentationNode, matching)
    reference_volume = segmentationNode.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())
    rows: list[tuple[str, Any]] = []
    with _removed_on_failure(scene, keep=False):
        geometry = reference_volume
        if geometry is None and pairs:
            _, geometry = _export_mask(segmentationNode, pairs[0][0], None, scene)
        for segment_id, reference_id in pairs:
            if segmentationNode.GetSegmentation().GetSegment(segment_id) is None:
                raise SDMOrganSegError(f"{segmentationNode.GetName()!r} has no segment {segment_id!r}")
            if referenceSegmentationNode.GetSegmentation().GetSegment(reference_id) is None:
                raise SDMOrganSegError(f"{referenceSegmentationNode.GetName()!r} has no segment {reference_id!r}")
            mask, _ = _export_mask(segmentationNode, segment_id, geometry, scene)
            reference_mask, _ = _export_mask(referenceSegmentationNode, reference_id, geometry, scene)
            spacing = geometry.GetSpacing()
            name = segmentationNode.GetSegmentation().GetSegment(segment_id).GetName()
            rows.append((name, organ_metrics(mask, reference_mask, spacing)))
    table = scene.AddNewNodeByClass(
        "vtkMRMLTableNode", scene.GenerateUniqueName(f"{segmentationNode.GetName()} vs {referenceSegmentationNode.GetName()} metrics")
    )
    _fill_metrics_table(table, rows)
    sh = scene.GetSubjectHierarchyNode()
    parent = sh.GetItemParent(sh.GetItemByDataNode(segmentationNode)) if sh.GetItemByDataNode(segmentationNode) else 0
    if parent and parent != sh.GetSceneItemID():
        _put_in_folder(scene, table, parent)
    return table


def _fill_metrics_table(table: Any, rows: Sequence[tuple[str, Any]]) -> None:
    vtk_table = table.GetTable()
    organ = vtk.vtkStringArray()
    organ.SetName(METRICS_COLUMNS[0])
    columns = [organ]
    for title in METRICS_COLUMNS[1:]:
        column = vtk.vtkDoubleArray()
        column.SetName(title)
        columns.append(column)
    for name, metrics in rows:
        organ.InsertNextValue(name)
        for column, value in zip(columns[1:], (metrics.dice, metrics.hd, metrics.hd95, metrics.asd)):
            column.InsertNextValue(float(value))
    for column in columns:
        vtk_table.AddColumn(column)
    # Slicer 5.8 and later call it UseColumnTitleAsColumnHeader; Slicer 5.6 has only the older name.
    if hasattr(table, "SetUseColumnTitleAsColumnHeader"):
        table.SetUseColumnTitleAsColumnHeader(True)
    else:
        table.SetUseColumnNameAsColumnHeader(True)
    for title in METRICS_COLUMNS[1:]:
        table.SetColumnUnitLabel(title, "mm" if "mm" in title else "")
    table.Modified()


def table_rows(tableNode: Any) -> list[dict[str, Any]]:
    """The rows of a metrics table as dicts: column title -> str (organ) or float."""
    vtk_table = tableNode.GetTable()
    names = [vtk_table.GetColumn(c).GetName() for c in range(vtk_table.GetNumberOfColumns())]
    rows = []
    for r in range(vtk_table.GetNumberOfRows()):
        row: dict[str, Any] = {}
        for c, name in enumerate(names):
            column = vtk_table.GetColumn(c)
            row[name] = column.GetValue(r) if isinstance(column, vtk.vtkStringArray) else float(column.GetValue(r))
        rows.append(row)
    return rows


def save_table_csv(tableNode: Any, path: str | Path, overwrite: bool = True) -> Path:
    """Write a table node as CSV (header row of column titles; floats at full precision, ``inf`` as ``inf``).

    Written under a temporary name and renamed when complete. ``overwrite`` is on by default because the
    Slicer file dialog has already asked; the batch script passes its ``--overwrite``.
    """
    path = Path(path)
    rows = table_rows(tableNode)
    vtk_table = tableNode.GetTable()
    names = [vtk_table.GetColumn(c).GetName() for c in range(vtk_table.GetNumberOfColumns())]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(names)
    for row in rows:
        writer.writerow([repr(row[n]) if isinstance(row[n], float) else row[n] for n in names])
    with atomic_path(path, overwrite) as temporary:
        temporary.write_text(buffer.getvalue(), encoding="utf-8")
    return path


# --- running the computation in a background process -----------------------------------------------------

_RESULT, _PROGRESS, _CANCEL, _REQUEST, _INPUT, _LOG = "result.json", "progress.json", "cancel", "request.json", "input.nrrd", "worker.log"
#: Seconds a cancelled worker gets to stop by itself before it is killed.
CANCEL_GRACE_S = 5.0


def _write_json_atomic(path: Path, values: Mapping[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(values), encoding="utf-8")
    os.replace(temporary, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _lib_parent() -> str:
    return str(Path(__file__).resolve().parent.parent)


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


class BackgroundRun:
    """Runs :func:`compute_outputs` in a separate Python process, polled from the caller's timer.

    Why a process and not a thread: the network and the SDM resampling hold the GIL for long stretches
    of Python, and in Slicer a Python thread only gets the GIL when the main thread runs Python, so a
    thread would either freeze the GUI or crawl. A process (as MONAIAuto3DSeg and SlicerNNUnet run
    theirs) also frees all GPU memory when it ends, and a cancel that the worker does not honour in
    time (one huge tile) can kill it. The worker runs in a process group of its own (:func:`start_process`),
    and killing it kills the group: in Slicer the process started is CTK's launcher and the worker its child.
    :meth:`cleanup` (the module calls it when it is closed and when Slicer quits) does the same, and so
    does this Python's exit for runs not cleaned up.

    Protocol, all files in a private temporary folder: the caller writes ``input.nrrd`` and
    ``request.json``; the worker (:func:`worker_main`) writes ``progress.json`` as it goes and, at the
    end, the SDMs, label map and contours plus ``result.json`` (status ``ok``, ``error`` with a one-line
    message, or ``cancelled``). Cancelling creates the file ``cancel``, which the worker checks between
    tiles. Worker output goes to ``worker.log`` (never a pipe, which could fill and block it).
    """

    def __init__(
        self,
        image: sitk.Image,
        model_dir: str | Path | None,
        device: str = "auto",
        levels: str | Sequence[float] = DEFAULT_LEVELS,
        python: str | None = None,
        env: Mapping[str, str] | None = None,
        workdir: str | Path | None = None,
    ) -> None:
        self.levels = as_levels(levels)
        self.model_dir = str(model_dir) if model_dir is not None else None
        self.device = device
        self.python = python or sys.executable
        self.env = dict(env) if env is not None else None
        self._image = image
        self._parent_dir = workdir
        self.workdir: Path | None = None
        self._process: subprocess.Popen | None = None
        self._log = None
        self._cancel_requested_at: float | None = None
        self.state = "new"  #: new, running, done, failed, cancelled
        self.progress: tuple[float, str] = (0.0, "starting")
        self.message = ""
        self.started_at = 0.0

    def start(self) -> None:
        """Write the input and start the worker; returns at once."""
        self.workdir = Path(tempfile.mkdtemp(prefix="sdmorganseg-run-", dir=self._parent_dir))
        sitk.WriteImage(self._image, str(self.workdir / _INPUT), useCompression=False)
        self._image = None  # the worker has it now; do not keep a second copy in memory
        _write_json_atomic(self.workdir / _REQUEST, {"model_dir": self.model_dir, "device": self.device, "levels": list(self.levels)})
        code = f"import sys; sys.path.insert(0, {_lib_parent()!r}); from SDMOrganSegLib.mrmllogic import worker_main; sys.exit(worker_main(sys.argv[1:]))"
        self._log = open(self.workdir / _LOG, "wb")
        self._process = start_process(
            [self.python, "-c", code, str(self.workdir)], stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
        )
        _RUNNING.add(self)
        self.started_at = time.monotonic()
        self.state = "running"

    def cancel(self) -> None:
        """Ask the worker to stop; :meth:`poll` reports ``cancelled`` once it has."""
        if self.state == "running" and self.workdir is not None and self._cancel_requested_at is None:
            (self.workdir / _CANCEL).touch()
            self._cancel_requested_at = time.monotonic()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested_at is not None

    def poll(self) -> str:
        """Update :attr:`progress` and :attr:`state` (``running``, ``done``, ``failed``, ``cancelled``)."""
        if self.state != "running" or self._process is None or self.workdir is None:
            return self.state
        values = _read_json(self.workdir / _PROGRESS)
        if values:
            self.progress = (float(values.get("fraction", 0.0)), str(values.get("message", "")))
        code = self._process.poll()
        if code is None:
            if self._cancel_requested_at is not None and time.monotonic() - self._cancel_requested_at > CANCEL_GRACE_S:
                kill_process_tree(self._process)
                self._finish("cancelled", "cancelled by the user; nothing was added")
            return self.state
        result = _read_json(self.workdir / _RESULT)
        if result is None:
            tail = self.log_tail()
            self._finish(
                "cancelled" if self._cancel_requested_at is not None else "failed",
                "cancelled by the user; nothing was added" if self._cancel_requested_at is not None
                else f"the segmentation process stopped unexpectedly (exit code {code}){': ' + tail if tail else ''}",
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
            text = (self.workdir / _LOG).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        found = [line.strip() for line in text.splitlines() if line.strip()]
        return " / ".join(found[-lines:])

    def result(self) -> ComputedOutputs:
        """The computed outputs of a finished (``done``) run, read back from the worker's files."""
        if self.state != "done" or self.workdir is None:
            raise SDMOrganSegError(f"the run has no result ({self.state}: {self.message})")
        return _read_outputs(self.workdir)

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


def _write_outputs(computed: ComputedOutputs, folder: Path) -> dict[str, Any]:
    sitk.WriteImage(computed.labels, str(folder / "labels.nrrd"), useCompression=False)
    sdms, surfaces = {}, {}
    for index, organ in enumerate(computed.organs):
        sdms[organ.name] = f"sdm_{index}.nrrd"
        sitk.WriteImage(computed.sdms[organ.name], str(folder / sdms[organ.name]), useCompression=False)
        surfaces[organ.name] = {}
        for level_index, level in enumerate(computed.levels):
            file_name = f"surface_{index}_{level_index}.vtp"
            write_polydata(computed.surfaces[organ.name][level], str(folder / file_name))
            surfaces[organ.name][repr(level)] = file_name
    return {
        "model_name": computed.model_name, "device": computed.device, "levels": list(computed.levels),
        "organs": [{"name": o.name, "label": o.label, "color": list(o.color), "terminology_entry": o.terminology_entry} for o in computed.organs],
        "timings": computed.timings, "notes": computed.notes,
        "files": {"labels": "labels.nrrd", "sdms": sdms, "surfaces": surfaces},
    }


def _read_polydata(path: Path) -> vtk.vtkPolyData:
    reader = vtk.vtkXMLPolyDataReader()
    reader.SetFileName(str(path))
    reader.Update()
    polydata = vtk.vtkPolyData()
    polydata.ShallowCopy(reader.GetOutput())
    polydata.GetFieldData().RemoveArray("SPACE")
    return polydata


def _read_outputs(folder: Path) -> ComputedOutputs:
    values = _read_json(folder / _RESULT)
    if not values or values.get("status") != "ok":
        raise SDMOrganSegError("the segmentation process left no result")
    files = values["files"]
    organs = [
        OrganSpec(o["name"], int(o["label"]), tuple(float(c) for c in o["color"]), str(o.get("terminology_entry", "")))
        for o in values["organs"]
    ]
    levels = tuple(float(level) for level in values["levels"])
    return ComputedOutputs(
        model_name=values["model_name"], device=values["device"], organs=organs,
        labels=sitk.ReadImage(str(folder / files["labels"])),
        sdms={name: sitk.ReadImage(str(folder / file_name)) for name, file_name in files["sdms"].items()},
        surfaces={
            name: {float(level): _read_polydata(folder / file_name) for level, file_name in per_level.items()}
            for name, per_level in files["surfaces"].items()
        },
        levels=levels, timings=dict(values.get("timings", {})), notes=list(values.get("notes", [])),
    )


def worker_main(argv: Sequence[str]) -> int:
    """Entry point of the background process: ``worker_main([workdir])``; see :class:`BackgroundRun`."""
    folder = Path(argv[0])
    cancel_file = folder / _CANCEL
    last_write = [0.0]

    def progress(fraction: float, message: str) -> None:
        now = time.monotonic()
        if now - last_write[0] > 0.2 or fraction >= 1.0:  # a few writes per second are plenty for a bar
            try:
                _write_json_atomic(folder / _PROGRESS, {"fraction": fraction, "message": message})
            except OSError:
                pass  # Windows refuses to replace a file the panel is reading right now: skip this update
            last_write[0] = now

    try:
        request = _read_json(folder / _REQUEST) or {}
        image = sitk.ReadImage(str(folder / _INPUT))
        computed = compute_outputs(
            image, request.get("model_dir"), request.get("device", "auto"), request.get("levels", DEFAULT_LEVELS),
            progress, cancel_file.exists,
        )
        check_cancel(cancel_file.exists)
        description = _write_outputs(computed, folder)
        progress(1.0, "done")
        _write_json_atomic(folder / _RESULT, {"status": "ok", "message": "", **description})
        return 0
    except CancelledError as error:
        _write_json_atomic(folder / _RESULT, {"status": "cancelled", "message": str(error)})
        return 0
    except SDMOrganSegError as error:
        _write_json_atomic(folder / _RESULT, {"status": "error", "message": str(error)})
        return 1
    except MemoryError:
        _write_json_atomic(folder / _RESULT, {"status": "error", "message": "out of memory; close other programs or use a smaller volume"})
        return 1
    except Exception as error:  # a bug: keep the traceback in the log, one line for the user
        import traceback

        traceback.print_exc()
        _write_json_atomic(folder / _RESULT, {"status": "error", "message": f"internal error ({type(error).__name__}: {error}); details in {folder / _LOG}"})
        return 1


def python_executable() -> str:
    """The Python to run the worker with: ``PythonSlicer`` inside Slicer, else this interpreter."""
    slicer = _slicer()
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


def describe_levels(levels: Iterable[float]) -> str:
    """``"0, 0.1, 0.2, 0.3"``."""
    return ", ".join(level_tag(level) for level in levels)


def format_volume_ml(volume: float) -> str:
    return f"{volume:.2f} ml" if math.isfinite(volume) else "n/a"
