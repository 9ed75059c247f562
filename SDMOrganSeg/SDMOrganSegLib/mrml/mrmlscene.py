"""MRML basics shared by the Logic's parts: volume nodes <-> SimpleITK images, and scene changes that are
undone when a run fails.

Coordinates: MRML nodes live in Slicer's RAS world; SimpleITK images, files on disk and the core
library's contours are LPS. The two differ by negating x and y; :func:`volume_node_to_sitk` and
:func:`sitk_to_volume_node` convert the full IJK-to-physical matrix (oblique directions included), so a
round trip keeps the geometry exactly.

All or nothing: code that adds nodes does it inside :func:`removed_on_failure`, which removes every node
(and subject-hierarchy item) added in the block when it raises, so a failed or cancelled run leaves the
scene's node count as it was. ``slicer`` is imported inside the functions that need it, so that this module
also imports in a plain Python process.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

from ..common.errors import ProgressCallback, SDMOrganSegError

#: LPS <-> RAS: negate x and y.
_FLIP = np.diag([-1.0, -1.0, 1.0])


def slicer_module() -> Any:
    import slicer  # only where Slicer or slicer-core exists; the worker process never gets here

    return slicer


def reporter(progress: ProgressCallback | None) -> ProgressCallback:
    return progress or (lambda fraction, message: None)


# --- geometry: volume nodes <-> SimpleITK images -------------------------------------------------------


def ijk_to_ras_matrix(volumeNode: Any) -> np.ndarray:
    """The node's 4x4 IJK-to-RAS matrix as a numpy array."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def vtk_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
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


def image_data_from_sitk(image: sitk.Image, dtype: Any = None) -> vtk.vtkImageData:
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
    slicer = slicer_module()
    scene = scene if scene is not None else slicer.mrmlScene
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise SDMOrganSegError("only scalar 3D images can become volume nodes")
    node = scene.AddNewNodeByClass(node_class, scene.GenerateUniqueName(name))
    node.SetIJKToRASMatrix(vtk_matrix(sitk_ijk_to_ras(image)))
    node.SetAndObserveImageData(image_data_from_sitk(image, dtype))
    return node


# --- scene changes that are undone on failure ----------------------------------------------------------


def node_ids(scene: Any) -> list[str]:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


@contextlib.contextmanager
def removed_on_failure(scene: Any, keep: bool = True) -> Iterator[list[int]]:
    """Remove every node added inside the block if it raises (or always, with ``keep=False``).

    Yields a list to which the block appends subject-hierarchy items it created (folders are items,
    not nodes). Nodes are found by comparing node IDs before and after, which also catches display,
    storage and colour nodes created on the way.
    """
    before = set(node_ids(scene))
    items: list[int] = []
    try:
        yield items
    except BaseException:
        _remove_new(scene, before, items)
        raise
    if not keep:
        _remove_new(scene, before, items)


def _remove_new(scene: Any, before: set[str], items: list[int]) -> None:
    added = [node_id for node_id in node_ids(scene) if node_id not in before]
    for node_id in reversed(added):
        node = scene.GetNodeByID(node_id)
        if node is not None and scene.IsNodePresent(node):
            scene.RemoveNode(node)
    sh = scene.GetSubjectHierarchyNode()
    for item in reversed(items):
        if sh is not None and item:
            sh.RemoveItem(item, False, True)


def put_in_folder(scene: Any, node: Any, folder: int) -> None:
    sh = scene.GetSubjectHierarchyNode()
    item = sh.GetItemByDataNode(node)
    if item:
        sh.SetItemParent(item, folder)
    else:  # slicer-core does not add items for new nodes by itself; Slicer's application does
        sh.CreateItem(folder, node)


def unique_folder_name(scene: Any, name: str) -> str:
    sh = scene.GetSubjectHierarchyNode()
    children = vtk.vtkIdList()
    sh.GetItemChildren(sh.GetSceneItemID(), children, False)
    taken = {sh.GetItemName(children.GetId(i)) for i in range(children.GetNumberOfIds())}
    candidate, number = name, 2
    while candidate in taken:
        candidate, number = f"{name} ({number})", number + 1
    return candidate


def segment_ids(segmentation: Any) -> list[str]:
    return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]

