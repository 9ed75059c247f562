"""Iso-surfaces of SDM images as VTK PolyData in physical LPS coordinates (millimetres).

LPS is the coordinate system of ITK and of NIfTI/NRRD files on disk; Slicer converts to its RAS world by
negating x and y (see :func:`lps_to_ras`). Surfaces come from VTK's flying edges (linear interpolation),
so the level-0 surface passes midway between voxel centres of opposite sign.
"""

from __future__ import annotations

from pathlib import Path

from typing import Iterable, Sequence

import numpy as np
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

#: Levels drawn by default and their colours, as in the paper's Figure 4 (red, orange, yellow, green).
DEFAULT_LEVELS = (0.0, 0.1, 0.2, 0.3)
#: LZ4 level of the .vtp files (VTK's 1-9, 9 the smallest): see write_polydata.
_LZ4_LEVEL = 9

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


def _below_profiles(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum of every ``(z, y)`` row and every ``(z, x)`` column of an SDM array (NaN ignored). Two passes
    over the volume give the box of the voxels at or below any level (:func:`_box_from_profiles`)."""
    return np.fmin.reduce(array, axis=2), np.fmin.reduce(array, axis=1)


def _box_from_profiles(profiles: tuple[np.ndarray, np.ndarray], shape: Sequence[int], level: float) -> tuple[slice, ...] | None:
    """Smallest box (plus one voxel) holding every voxel at or below ``level``; surfaces lie inside it."""
    rows, columns = profiles
    present = [
        np.flatnonzero(np.fmin.reduce(rows, axis=1) <= level),  # z: a slice holds such a voxel
        np.flatnonzero(np.fmin.reduce(rows, axis=0) <= level),  # y
        np.flatnonzero(np.fmin.reduce(columns, axis=0) <= level),  # x
    ]
    if present[0].size == 0:
        return None
    return tuple(slice(max(int(p[0]) - 1, 0), min(int(p[-1]) + 2, int(n))) for p, n in zip(present, shape))


def _crop_box(array: np.ndarray, level: float) -> tuple[slice, ...] | None:
    """Smallest box (plus one voxel) holding every voxel at or below ``level``; surfaces lie inside it."""
    return _box_from_profiles(_below_profiles(array), array.shape, level)


def _surface_in_box(array: np.ndarray, level: float, box: tuple[slice, ...] | None, matrix: np.ndarray) -> vtk.vtkPolyData:
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
    index = numpy_support.vtk_to_numpy(polydata.GetPoints().GetData()).astype(np.float64)
    index += np.array([box[2].start, box[1].start, box[0].start], dtype=np.float64)
    # index @ matrix[:3, :3].T + origin, written out: numpy's matmul of an (n, 3) by a 3 x 3 matrix is
    # several times slower than broadcast products, and an axis-aligned image (a diagonal matrix, the
    # usual case) needs only one of them (the same values: the other terms are exact zeros).
    linear = matrix[:3, :3]
    if np.count_nonzero(linear - np.diag(np.diagonal(linear))) == 0:
        physical = index
        physical *= np.diagonal(linear)
    else:
        physical = index[:, :1] * linear[:, 0]
        physical += index[:, 1:2] * linear[:, 1]
        physical += index[:, 2:] * linear[:, 2]
    physical += matrix[:3, 3]
    # float32 millimetres, as flying edges' own points: within 3e-5 mm of the float64 ones over 500 mm,
    # and 20 % smaller and 1.3x faster to write.
    points = vtk.vtkPoints()
    points.SetData(numpy_support.numpy_to_vtk(physical.astype(np.float32), deep=True))
    polydata.SetPoints(points)
    return polydata


def iso_surface(sdm: sitk.Image, level: float, array: np.ndarray | None = None) -> vtk.vtkPolyData:
    """Surface where the SDM equals ``level``, in LPS mm; empty PolyData when the level is not crossed.

    Only the box around the voxels at or below the level is contoured, which is what keeps four levels
    of nine CT organs within the speed goal.
    """
    if array is None:
        array = sitk.GetArrayViewFromImage(sdm)
    return _surface_in_box(array, float(level), _crop_box(array, float(level)), _index_to_lps(sdm))


def iso_surfaces(sdm: sitk.Image, levels: Iterable[float] = DEFAULT_LEVELS) -> dict[float, vtk.vtkPolyData]:
    """:func:`iso_surface` at each level; the boxes of all levels come from one pass over the SDM."""
    array = sitk.GetArrayViewFromImage(sdm)
    profiles = _below_profiles(array)
    matrix = _index_to_lps(sdm)
    return {
        float(level): _surface_in_box(array, float(level), _box_from_profiles(profiles, array.shape, float(level)), matrix)
        for level in levels
    }


def lps_to_ras(polydata: vtk.vtkPolyData) -> vtk.vtkPolyData:
    """A copy with x and y negated (LPS <-> RAS), for Slicer's RAS world. Only the points are copied: the
    cells are shared with ``polydata`` (a deep copy of a 9-organ CT's contours, 15 M triangles, took 1.8 s)."""
    out = vtk.vtkPolyData()
    out.ShallowCopy(polydata)
    if out.GetNumberOfPoints():
        points = numpy_support.vtk_to_numpy(polydata.GetPoints().GetData()).copy()
        points[:, :2] *= -1
        negated = vtk.vtkPoints()
        negated.SetData(numpy_support.numpy_to_vtk(points, deep=True))
        out.SetPoints(negated)
    return out


def read_polydata(path: str | Path) -> vtk.vtkPolyData:
    """A ``.vtp`` written by :func:`write_polydata`, without the coordinate-system field it carries on disk."""
    reader = vtk.vtkXMLPolyDataReader()
    reader.SetFileName(str(path))
    reader.Update()
    polydata = vtk.vtkPolyData()
    polydata.ShallowCopy(reader.GetOutput())
    polydata.GetFieldData().RemoveArray("SPACE")
    return polydata


def write_polydata(polydata: vtk.vtkPolyData, path: str, coordinate_system: str = "LPS") -> None:
    """Write ``.vtp`` (XML, raw appended binary, LZ4) with the coordinate system in its field data, as Slicer does."""
    copy = vtk.vtkPolyData()
    copy.ShallowCopy(polydata)
    space = vtk.vtkStringArray()
    space.SetName("SPACE")
    space.InsertNextValue(coordinate_system)
    copy.GetFieldData().AddArray(space)
    writer = vtk.vtkXMLPolyDataWriter()
    writer.SetFileName(str(path))
    writer.SetInputData(copy)
    # Raw appended binary (no base64), LZ4: 3.1x faster to write than zlib at level 1 (itself 2.8x faster
    # than VTK's default inline base64 zlib) for files 2.1x as large, which next to the SDM volumes of a
    # CT run adds about 12 % on disk (benchmarks/bench_contours.py, bench_segment.py). Every VTK XML reader since
    # VTK 8.1 (Slicer 4.10, ParaView 5.5) reads it.
    writer.SetDataModeToAppended()
    writer.EncodeAppendedDataOff()
    writer.SetCompressorTypeToLZ4()
    writer.SetCompressionLevel(_LZ4_LEVEL)
    if not writer.Write():
        raise OSError(f"VTK could not write {path}")


def parse_levels(text: str | Sequence[float]) -> tuple[float, ...]:
    """Levels from ``"0,0.1,0.2"`` or a sequence; each must lie in [-1, 1]."""
    values = [float(v) for v in (text.split(",") if isinstance(text, str) else text) if str(v).strip() != ""]
    if not values or any(not -1.0 <= v <= 1.0 for v in values):
        raise ValueError("SDM levels must be numbers in [-1, 1], e.g. 0,0.1,0.2,0.3")
    return tuple(values)
