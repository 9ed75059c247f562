"""Segmentation on MRML: a volume node in; a segmentation, SDM volumes and contour models out.

Order of work in :meth:`SDMSegmentationLogic.segment_volume`: everything heavy (network, contours) is
computed first, without touching the scene (:func:`compute_outputs`, which also runs in the background
worker, see :class:`BackgroundRun`); only then are nodes created, and if anything fails or the user
cancels while they are created, every node created so far is removed again, so the scene's node count is
what it was before the run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import vtk

from .background import BackgroundProcess, Report
from ..images.contours import DEFAULT_LEVELS, iso_surfaces, read_polydata, level_color, level_tag, lps_to_ras, parse_levels, write_polydata
from ..common.errors import CancelCheck, ProgressCallback, SDMOrganSegError, check_cancel
from ..common.files import safe_name
from .mrmlscene import (
    image_data_from_sitk, put_in_folder, removed_on_failure, reporter, sitk_ijk_to_ras, slicer_module, unique_folder_name,
    volume_node_to_sitk, vtk_matrix,
)
from ..formats.terminology import slicer_terminology_entry

#: Attribute that marks SDMOrganSeg's shared diverging colour table in a scene.
_COLOR_TABLE_ATTRIBUTE = "SDMOrganSeg.ColorTable"
#: Opacity of the 3D surfaces of nonzero levels (the level-0 surface, the organ itself, is opaque).
OUTER_LEVEL_OPACITY = 0.3
#: The volume the background worker segments, in its folder.
_INPUT = "input.nrrd"


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

    ``sdms`` maps organ name to its SDM image (an organ left out gets its SDM volume node later, from
    :meth:`SDMSegmentationLogic.add_sdm_volume`); ``surfaces`` maps organ name and level to the iso-surface
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
    runtime: str = ""  #: what ran the network: "torch" or "onnxruntime" (see SegmentationResult)
    provider: str = ""

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
    tta: bool | None = None,
    largest_component: bool = False,
    force: bool = False,
    runtime: str = "auto",
) -> ComputedOutputs:
    """Segment ``image`` with a model folder and contour the SDMs; no MRML involved.

    ``fraction`` is the part of the progress range this step reports into; ``tta``, ``largest_component``
    and ``force`` are :func:`SDMOrganSegLib.engines.inference.segment_image`'s, ``runtime``
    :func:`SDMOrganSegLib.formats.modelfiles.load_model`'s.
    """
    check_cancel(cancel)  # before importing PyTorch, which takes seconds
    from ..engines.inference import segment_image
    from ..formats.modelfiles import load_model, resolve_model

    levels = as_levels(levels)
    report = reporter(progress)
    low, high = fraction
    started = time.perf_counter()
    report(low, "loading the model")
    model = load_model(resolve_model(model_dir), runtime=runtime)
    check_cancel(cancel)

    def network_progress(part: float, message: str) -> None:
        report(low + (high - low) * 0.02 + (high - low) * 0.86 * part, message)

    result = segment_image(image, model, device, progress=network_progress, cancel=cancel, tta=tta, largest_component=largest_component, force=force)
    surfaces: dict[str, dict[float, vtk.vtkPolyData]] = {}
    tick = time.perf_counter()
    for index, organ in enumerate(result.organs):
        check_cancel(cancel)
        report(low + (high - low) * (0.88 + 0.12 * index / len(result.organs)), f"contours of {organ.name}")
        surfaces[organ.name] = iso_surfaces(result.contour_sdm(organ.name), levels)
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
        runtime=result.runtime,
        provider=result.provider,
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



def diverging_color_table(scene: Any) -> Any:
    """The scene's SDMOrganSeg diverging colour table (blue inside, white at 0, red outside); made once."""
    slicer = slicer_module()
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
    slicer = slicer_module()
    maximum = int(sitk.GetArrayViewFromImage(labels).max(initial=0))
    dtype = np.uint8 if maximum < 256 else np.uint16
    image_data = image_data_from_sitk(labels, dtype)
    oriented = slicer.vtkOrientedImageData()
    oriented.ShallowCopy(image_data)
    oriented.SetImageToWorldMatrix(vtk_matrix(ijk_to_ras))
    return oriented



class SDMSegmentationLogic:
    """Runs a model on volume nodes and builds the output nodes in a scene (default ``slicer.mrmlScene``)."""

    def __init__(self, scene: Any = None) -> None:
        self._scene = scene

    @property
    def scene(self) -> Any:
        return self._scene if self._scene is not None else slicer_module().mrmlScene

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
        tta: bool | None = None,
        largest_component: bool = False,
        force: bool = False,
        runtime: str = "auto",
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
            tta, largest_component, force: see :func:`SDMOrganSegLib.engines.inference.segment_image`.
            runtime: ``auto``, ``onnxruntime`` or ``torch`` (:func:`SDMOrganSegLib.formats.modelfiles.load_model`).
        """
        levels = as_levels(levels)
        image = volume_node_to_sitk(volumeNode)
        computed = compute_outputs(
            image, model_dir, device, levels, progress, cancel, fraction=(0.0, 0.9), tta=tta, largest_component=largest_component,
            force=force, runtime=runtime,
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
        report = reporter(progress)
        # The outputs' own geometry: their image data start at index 0, while the input's extent may not
        # (volume_node_to_sitk moved the origin to its first voxel), so the input's matrix would shift them.
        ijk_to_ras = sitk_ijk_to_ras(computed.labels)
        if computed.labels.GetSize() != volumeNode.GetImageData().GetDimensions():
            raise SDMOrganSegError("the input volume changed while it was being segmented; run the segmentation again")
        with removed_on_failure(scene) as items:
            sh = scene.GetSubjectHierarchyNode()
            base = f"{volumeNode.GetName()} — {computed.model_name}"
            folder = sh.CreateFolderItem(sh.GetSceneItemID(), unique_folder_name(scene, base))
            items.append(folder)
            sh.SetItemAttribute(folder, "SDMOrganSeg.Model", computed.model_name)
            transform_id = volumeNode.GetTransformNodeID()

            report(0.9, "creating the segmentation")
            segmentation = self._segmentation_node(volumeNode, computed, ijk_to_ras, base, show2D)
            nodes = [segmentation]
            put_in_folder(scene, segmentation, folder)
            check_cancel(cancel)

            color_table = diverging_color_table(scene)
            sdm_volumes: dict[str, Any] = {}
            contours: dict[str, dict[float, Any]] = {}
            for index, organ in enumerate(computed.organs):
                check_cancel(cancel)
                report(0.92 + 0.08 * index / len(computed.organs), f"creating the nodes of {organ.name}")
                if organ.name in computed.sdms:  # the review page reads an SDM only when it is shown
                    sdm_volumes[organ.name] = self._sdm_volume(computed.sdms[organ.name], ijk_to_ras, base, organ.name, color_table, folder)
                    nodes.append(sdm_volumes[organ.name])
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
                    put_in_folder(scene, model, organ_folder)
                    contours[organ.name][level] = model
                    nodes.append(model)
            if transform_id:
                for node in nodes:
                    node.SetAndObserveTransformNodeID(transform_id)
            check_cancel(cancel)
            report(1.0, "done")
        return OutputNodes(folder, segmentation, sdm_volumes, contours, color_table, computed)

    def _segmentation_node(self, volumeNode: Any, computed: ComputedOutputs, ijk_to_ras: np.ndarray, base: str, show2D: bool) -> Any:
        slicer = slicer_module()
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
            # The card's name and colour, not Slicer's: re-picking a terminology in the Segment Editor must not
            # rename "anterior hippocampus" to "Hippocampus" (names are how outputs and references are matched).
            segment.SetNameAutoGenerated(False)
            segment.SetColorAutoGenerated(False)
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

    def add_sdm_volume(self, outputs: OutputNodes, organ: str, sdm: sitk.Image) -> Any:
        """The SDM volume of ``organ`` for outputs created without it (``create_nodes`` of a
        :class:`ComputedOutputs` whose ``sdms`` lack the organ); the existing node when there is one."""
        if organ in outputs.sdm_volumes:
            return outputs.sdm_volumes[organ]
        labels = outputs.computed.labels
        if sdm.GetSize() != labels.GetSize():
            raise SDMOrganSegError(f"the SDM of {organ} and the label map disagree in size ({sdm.GetSize()} vs {labels.GetSize()})")
        base = self.scene.GetSubjectHierarchyNode().GetItemName(outputs.folder_item)
        volume = self._sdm_volume(sdm, sitk_ijk_to_ras(labels), base, organ, outputs.color_table, outputs.folder_item)
        transform_id = outputs.segmentation.GetTransformNodeID()
        if transform_id:
            volume.SetAndObserveTransformNodeID(transform_id)
        outputs.sdm_volumes[organ] = volume
        return volume

    def _sdm_volume(self, sdm: sitk.Image, ijk_to_ras: np.ndarray, base: str, organ: str, color_table: Any, folder: int) -> Any:
        volume = self._sdm_node(sdm, ijk_to_ras, f"{base} SDM {organ}", color_table)
        volume.SetAttribute("SDMOrganSeg.Organ", organ)
        put_in_folder(self.scene, volume, folder)
        return volume

    def _sdm_node(self, sdm: sitk.Image, ijk_to_ras: np.ndarray, name: str, color_table: Any) -> Any:
        slicer = slicer_module()
        scene = self.scene
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))
        node.SetIJKToRASMatrix(vtk_matrix(ijk_to_ras))  # the output image's geometry (the input's voxels)
        node.SetAndObserveImageData(image_data_from_sitk(sdm, np.float32))
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


# --- running the computation in a background process -----------------------------------------------------


class BackgroundRun(BackgroundProcess):
    """Runs :func:`compute_outputs` in a separate Python process (see :mod:`.background`), polled from the
    caller's timer; :meth:`result` reads the SDMs, label map and contours back once it is done."""

    job = "segment"
    what = "the segmentation process"
    cancelled_message = "cancelled by the user; nothing was added"

    def __init__(
        self,
        image: sitk.Image,
        model_dir: str | Path | None,
        device: str = "auto",
        levels: str | Sequence[float] = DEFAULT_LEVELS,
        python: str | None = None,
        env: Mapping[str, str] | None = None,
        workdir: str | Path | None = None,
        force: bool = False,
        runtime: str = "auto",
    ) -> None:
        self.levels = as_levels(levels)
        self.model_dir = str(model_dir) if model_dir is not None else None
        self.device = device
        request = {"model_dir": self.model_dir, "device": device, "levels": list(self.levels), "force": bool(force), "runtime": runtime}
        super().__init__(request, python, env, workdir)
        self._image = image

    def _write_inputs(self, folder: Path) -> None:
        sitk.WriteImage(self._image, str(folder / _INPUT), useCompression=False)
        self._image = None  # the worker has it now; do not keep a second copy in memory

    def result(self) -> ComputedOutputs:
        """The computed outputs of a finished (``done``) run, read back from the worker's files."""
        values = self.result_values()
        return _read_outputs(self.workdir, values)


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
        "timings": computed.timings, "notes": computed.notes, "runtime": computed.runtime, "provider": computed.provider,
        "files": {"labels": "labels.nrrd", "sdms": sdms, "surfaces": surfaces},
    }


def _read_outputs(folder: Path, values: Mapping[str, Any]) -> ComputedOutputs:
    """The outputs :func:`_write_outputs` wrote into ``folder`` and described in ``values``."""
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
            name: {float(level): read_polydata(folder / file_name) for level, file_name in per_level.items()}
            for name, per_level in files["surfaces"].items()
        },
        levels=levels, timings=dict(values.get("timings", {})), notes=list(values.get("notes", [])),
        runtime=str(values.get("runtime", "")), provider=str(values.get("provider", "")),
    )



def run_job(folder: Path, request: Mapping[str, Any], report: Report, cancel: CancelCheck) -> dict[str, Any]:
    """The worker's side of :class:`BackgroundRun`: segment ``input.nrrd`` and write the outputs."""
    image = sitk.ReadImage(str(folder / _INPUT))
    computed = compute_outputs(
        image, request.get("model_dir"), request.get("device", "auto"), request.get("levels", DEFAULT_LEVELS), report, cancel,
        force=bool(request.get("force", False)), runtime=request.get("runtime", "auto"),
    )
    check_cancel(cancel)
    return _write_outputs(computed, folder)


def describe_levels(levels: Iterable[float]) -> str:
    """``"0, 0.1, 0.2, 0.3"``."""
    return ", ".join(level_tag(level) for level in levels)


def format_volume_ml(volume: float) -> str:
    return f"{volume:.2f} ml" if math.isfinite(volume) else "n/a"
