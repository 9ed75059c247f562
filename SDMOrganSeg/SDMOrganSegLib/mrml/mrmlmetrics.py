"""The Metrics section on MRML: Dice, HD, HD95 and ASD of a segmentation against a reference
segmentation, as a table node, and the table as CSV."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import vtk
from vtk.util import numpy_support

from ..common.errors import SDMOrganSegError
from ..common.files import atomic_path
from ..formats.modelfiles import organ_key
from .mrmlscene import put_in_folder, removed_on_failure, segment_ids, slicer_module

#: Segment-matching modes of :func:`match_segments`.
MATCH_BY_NAME, MATCH_BY_ORDER = "name", "order"
#: Columns of the metrics table (and of its CSV).
METRICS_COLUMNS = ("Organ", "Dice", "HD (mm)", "HD95 (mm)", "ASD (mm)")


def match_segments(segmentationNode: Any, referenceSegmentationNode: Any, mode: str = MATCH_BY_NAME) -> list[tuple[str, str]]:
    """(segment ID, reference segment ID) pairs: by name (ignoring case, spaces, ``_`` and ``-``) or by order."""
    segmentation = segmentationNode.GetSegmentation()
    reference = referenceSegmentationNode.GetSegmentation()
    ids, reference_ids = segment_ids(segmentation), segment_ids(reference)
    if mode == MATCH_BY_ORDER:
        if len(ids) != len(reference_ids):
            raise SDMOrganSegError(
                f"matching by order needs as many segments in both: {len(ids)} vs {len(reference_ids)}; match by name instead"
            )
        return list(zip(ids, reference_ids))
    if mode != MATCH_BY_NAME:
        raise SDMOrganSegError(f"unknown segment matching {mode!r}; use {MATCH_BY_NAME!r} or {MATCH_BY_ORDER!r}")
    by_name = {organ_key(reference.GetSegment(i).GetName()): i for i in reference_ids}
    pairs = [(i, by_name[organ_key(segmentation.GetSegment(i).GetName())]) for i in ids if organ_key(segmentation.GetSegment(i).GetName()) in by_name]
    if not pairs:
        raise SDMOrganSegError(
            f"no segment of {segmentationNode.GetName()!r} has the name of a segment of {referenceSegmentationNode.GetName()!r}; "
            "rename the reference segments or match by order"
        )
    return pairs


def export_labelmap(segmentationNode: Any, segment_ids: Sequence[str], geometry_node: Any, scene: Any) -> tuple[np.ndarray, Any]:
    """The segments as one label map array ``(z, y, x)``, the i-th segment of ``segment_ids`` as value i + 1,
    on the grid of ``geometry_node`` (None: the segmentation's own reference geometry), and the temporary
    label map node it was exported to (the caller removes it, e.g. in ``removed_on_failure(keep=False)``)."""
    slicer = slicer_module()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", scene.GenerateUniqueName("__sdmorganseg_temp__"))
    ids = vtk.vtkStringArray()
    for segment_id in segment_ids:
        ids.InsertNextValue(segment_id)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if geometry_node is None:
        ok = logic.ExportSegmentsToLabelmapNode(segmentationNode, ids, labelmap, None, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
    else:
        ok = logic.ExportSegmentsToLabelmapNode(segmentationNode, ids, labelmap, geometry_node)
    if not ok:
        raise SDMOrganSegError(f"could not export segment {', '.join(segment_ids)!r} of {segmentationNode.GetName()!r} to a label map")
    image_data = labelmap.GetImageData()
    dims = image_data.GetDimensions()
    return numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0]), labelmap


def _export_mask(segmentationNode: Any, segment_id: str, geometry_node: Any, scene: Any) -> tuple[np.ndarray, Any]:
    labels, labelmap = export_labelmap(segmentationNode, [segment_id], geometry_node, scene)
    return labels != 0, labelmap


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
    from ..method.metrics import organ_metrics

    slicer = slicer_module()
    scene = scene if scene is not None else slicer.mrmlScene
    if segmentationNode is None or referenceSegmentationNode is None:
        raise SDMOrganSegError("choose both a segmentation and a reference segmentation to compare")
    pairs = list(segment_pairs) if segment_pairs is not None else match_segments(segmentationNode, referenceSegmentationNode, matching)
    reference_volume = segmentationNode.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())
    rows: list[tuple[str, Any]] = []
    with removed_on_failure(scene, keep=False):
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
        put_in_folder(scene, table, parent)
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
    # The header Slicer shows is the title followed by " [unit]": titles without the unit ("HD [mm]", not
    # "HD (mm) [mm]"); the column names (and so the CSV header) keep it.
    for name in METRICS_COLUMNS[1:]:
        unit = "mm" if name.endswith(" (mm)") else ""
        table.SetColumnTitle(name, name[: -len(" (mm)")] if unit else name)
        table.SetColumnUnitLabel(name, unit)
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

