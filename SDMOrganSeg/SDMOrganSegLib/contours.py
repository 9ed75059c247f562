"""Iso-surfaces of SDM images as VTK PolyData in physical LPS coordinates (millimetres).

LPS is the coordinate system of ITK and of NIfTI/NRRD files on disk; Slicer converts to its RAS world by
negating x and y (see :func:`lps_to_ras`). Surfaces come from VTK's flying edges (linear interpolation),
so the level-0 surface passes midway between voxel centres of opposite sign.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

#: Levels drawn by default and their colours, as in the paper's Figure 4 (red, orange, yellow, green).
DEFAULT_LEVELS = (0.0, 0.1, 0.2, 0.3)
LEVEL_COLORS = {0.0: (1.0, 0.0, 0.0), 0.1: (1.0, 0.55, 0.0), 0.2: (1.0, 0.9, 0.0), 0.3: (0.0, 0.8, 0.0)}


def level_color(level: float) -> tuple[float, float, float]:
    """The paper's colour for a level; other levels get a colour interpolated along red-orange-yellow-green."""
    for known, color in LEVEL_COLORS.items():
        if abs(level - known) < 1e-6:
            return color
    t = float(np.clip(level / 0.3, 0.0, 1.0)) * 3
    stops = [LEVEL_COLORS[k] for k in DEFAULT_LEVELS]
    low = min(int(t), 2)
    return tuple(float(a + (b - a) * (t - low)) for a, b in zip(stops[low], stops[low + 1]))


def level_tag(level: float) -> str:
    """Level as used in file and node names: ``0``, ``0.1``, ``-0.05``."""
    return f"{level:g}"


def _index_to_lps(image: sitk.Image) -> np.ndarray:
    """4x4 matrix from continuous (i, j, k) voxel indices to LPS millimetres."""
    matrix = np.eye(4)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    matrix[:3, :3] = direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return matrix


def _crop_box(array: np.ndarray, level: float) -> tuple[slice, ...] | None:
    """Smallest box (plus one voxel) holding every voxel at or below ``level``; surfaces lie inside it."""
    below = array <= level
    box = []
    for axis in range(3):
        present = np.flatnonzero(below.any(axis=tuple(a for a in range(3) if a != axis)))
        if present.size == 0:
            return None
        box.append(slice(max(int(present[0]) - 1, 0), min(int(present[-1]) + 2, array.shape[axis])))
    return tuple(box)


def iso_surface(sdm: sitk.Image, level: float, array: np.ndarray | None = None) -> vtk.vtkPolyData:
    """Surface where the SDM equals ``level``, in LPS mm; empty PolyData when the level is not crossed.

    Only the box around the voxels at or below the level is contoured, which is what keeps four levels
    of nine CT organs within the speed goal.
    """
    if array is None:
        array = sitk.GetArrayViewFromImage(sdm)
    box = _crop_box(array, level)
    if box is None:
        return vtk.vtkPolyData()
    region = np.ascontiguousarray(array[box], dtype=np.float32)
    grid = vtk.vtkImageData()
    grid.SetDimensions(region.shape[2], region.shape[1], region.shape[0])  # VTK wants (x, y, z)
    grid.GetPointData().SetScalars(numpy_support.numpy_to_vtk(region.reshape(-1), deep=False))
    surfaces = vtk.vtkFlyingEdges3D()
    surfaces.SetInputData(grid)
    surfaces.SetValue(0, float(level))
    surfaces.ComputeNormalsOff()
    surfaces.ComputeGradientsOff()
    surfaces.ComputeScalarsOff()
    surfaces.Update()
    polydata = vtk.vtkPolyData()
    polydata.ShallowCopy(surfaces.GetOutput())
    if polydata.GetNumberOfPoints() == 0:
        return polydata
    offset = np.array([box[2].start, box[1].start, box[0].start], dtype=float)
    index = numpy_support.vtk_to_numpy(polydata.GetPoints().GetData()).astype(float) + offset
    matrix = _index_to_lps(sdm)
    physical = index @ matrix[:3, :3].T + matrix[:3, 3]
    points = vtk.vtkPoints()
    points.SetData(numpy_support.numpy_to_vtk(np.ascontiguousarray(physical), deep=True))
    polydata.SetPoints(points)
    return polydata


def iso_surfaces(sdm: sitk.Image, levels: Iterable[float] = DEFAULT_LEVELS) -> dict[float, vtk.vtkPolyData]:
    """:func:`iso_surface` at each level."""
    array = sitk.GetArrayViewFromImage(sdm)
    return {float(level): iso_surface(sdm, float(level), array) for level in levels}


def lps_to_ras(polydata: vtk.vtkPolyData) -> vtk.vtkPolyData:
    """A copy with x and y negated (LPS <-> RAS), for Slicer's RAS world."""
    out = vtk.vtkPolyData()
    out.DeepCopy(polydata)
    if out.GetNumberOfPoints():
        points = numpy_support.vtk_to_numpy(out.GetPoints().GetData())
        points[:, :2] *= -1
        out.GetPoints().Modified()
    return out


def write_polydata(polydata: vtk.vtkPolyData, path: str, coordinate_system: str = "LPS") -> None:
    """Write ``.vtp`` (XML, binary, zlib) with the coordinate system in its field data, as Slicer does."""
    copy = vtk.vtkPolyData()
    copy.ShallowCopy(polydata)
    space = vtk.vtkStringArray()
    space.SetName("SPACE")
    space.InsertNextValue(coordinate_system)
    copy.GetFieldData().AddArray(space)
    writer = vtk.vtkXMLPolyDataWriter()
    writer.SetFileName(str(path))
    writer.SetInputData(copy)
    writer.SetDataModeToBinary()
    writer.SetCompressorTypeToZLib()
    if not writer.Write():
        raise OSError(f"VTK could not write {path}")


def parse_levels(text: str | Sequence[float]) -> tuple[float, ...]:
    """Levels from ``"0,0.1,0.2"`` or a sequence; each must lie in [-1, 1]."""
    values = [float(v) for v in (text.split(",") if isinstance(text, str) else text) if str(v).strip() != ""]
    if not values or any(not -1.0 <= v <= 1.0 for v in values):
        raise ValueError("SDM levels must be numbers in [-1, 1], e.g. 0,0.1,0.2,0.3")
    return tuple(values)
