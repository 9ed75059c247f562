"""Iso-surfaces of SDMs: ``contours.iso_surfaces`` against VTK flying edges on the whole volume.

    python benchmarks/bench_contours.py            # 9 organs of a 512x512x200 SDM, 4 levels, best of 3
    python benchmarks/bench_contours.py --quick    # 256x256x100, one round

The SDMs are exact normalised SDMs (``sdm.label_map_to_sdms``) of nine ellipsoid organs in a CT-sized
volume (512 x 512 x 200 voxels of 0.8 x 0.8 x 2.5 mm), as SimpleITK images; levels 0, 0.1, 0.2, 0.3.
The 0.3 level of a normalised SDM lies far out (30 % of the largest outside distance, several cm), so
its surfaces are large.

* ours: ``iso_surfaces(sdm, levels)`` for each organ (surfaces in LPS mm, as written to .vtp files);
* reference: ``vtkFlyingEdges3D`` on each whole SDM, one level per call, VTK mapping voxels to mm
  through the image's origin and spacing (the straightforward way, no cropping);
* reference, one call: the same with all four levels in one ``vtkFlyingEdges3D`` call (one mixed
  surface per organ, which the writer would still have to split by level).

Then the writing of all 36 surfaces as .vtp files: ours (``write_polydata``: raw appended binary, LZ4)
against the same with zlib at level 1 (this writer until issue 5's second round) and the first writer
settings (inline base64 binary, VTK's default zlib level).

The surfaces must agree: same point and triangle counts per organ and level as the per-level reference,
and the same points (compared sorted) within float tolerance.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import SimpleITK as sitk  # noqa: E402
import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

from SDMOrganSegLib.images import contours  # noqa: E402
from SDMOrganSegLib.method import sdm  # noqa: E402

ORGANS = 9
PREVIOUS = _common.previous_module("SDMOrganSeg/SDMOrganSegLib/contours.py")


def sdm_images(size_xyz) -> list[sitk.Image]:
    labels = _common.organ_masks(tuple(reversed(size_xyz)), ORGANS)
    images = []
    for value in range(1, ORGANS + 1):
        image = sitk.GetImageFromArray(sdm.normalized_sdm(labels == value, _common.CT_SPACING_XYZ))
        image.SetSpacing(_common.CT_SPACING_XYZ)
        image.SetOrigin((-200.0, -180.0, -310.0))
        images.append(image)
    return images


def _whole_volume_filter(image: sitk.Image, levels) -> vtk.vtkFlyingEdges3D:
    array = sitk.GetArrayViewFromImage(image)
    grid = vtk.vtkImageData()
    grid.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    grid.SetSpacing(image.GetSpacing())
    grid.SetOrigin(image.GetOrigin())
    grid.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(array).reshape(-1), deep=False))
    surfaces = vtk.vtkFlyingEdges3D()
    surfaces.SetInputData(grid)
    for index, level in enumerate(levels):
        surfaces.SetValue(index, float(level))
    surfaces.ComputeNormalsOff()
    surfaces.ComputeGradientsOff()
    surfaces.ComputeScalarsOff()
    surfaces.Update()
    surfaces.grid = grid  # keep the image (and the numpy memory it points to) alive with the output
    return surfaces


def reference_per_level(images, levels) -> list[dict[float, vtk.vtkPolyData]]:
    out = []
    for image in images:
        surfaces = {}
        for level in levels:
            polydata = vtk.vtkPolyData()
            polydata.ShallowCopy(_whole_volume_filter(image, [level]).GetOutput())
            surfaces[float(level)] = polydata
        out.append(surfaces)
    return out


def reference_one_call(images, levels) -> list[vtk.vtkPolyData]:
    out = []
    for image in images:
        polydata = vtk.vtkPolyData()
        polydata.ShallowCopy(_whole_volume_filter(image, levels).GetOutput())
        out.append(polydata)
    return out


def ours(images, levels) -> list[dict[float, vtk.vtkPolyData]]:
    return [contours.iso_surfaces(image, levels) for image in images]


def _points(polydata: vtk.vtkPolyData) -> np.ndarray:
    return numpy_support.vtk_to_numpy(polydata.GetPoints().GetData()).astype(np.float64)


def _point_distance(a: vtk.vtkPolyData, b: vtk.vtkPolyData) -> float:
    """Largest distance from a point of either surface to the nearest point of the other."""
    from scipy.spatial import cKDTree

    pa, pb = _points(a), _points(b)
    return float(max(cKDTree(pb).query(pa)[0].max(), cKDTree(pa).query(pb)[0].max()))


def writing_benchmark(surfaces: list[dict[float, vtk.vtkPolyData]], repeat: int) -> dict:
    """Writing every surface as .vtp: ours (raw appended, LZ4) against raw appended with zlib level 1
    and the first settings (inline base64 binary, zlib at VTK's default level)."""
    import tempfile

    def zlib_level_1(polydata: vtk.vtkPolyData, path: str) -> None:
        writer = vtk.vtkXMLPolyDataWriter()
        writer.SetFileName(path)
        writer.SetInputData(polydata)
        writer.SetDataModeToAppended()
        writer.EncodeAppendedDataOff()
        writer.SetCompressorTypeToZLib()
        writer.SetCompressionLevel(1)
        writer.Write()

    writers = {"ours (write_polydata)": contours.write_polydata, "raw appended, zlib level 1": zlib_level_1}
    if PREVIOUS is not None:
        writers[f"previous write_polydata ({_common.BASELINE_COMMIT})"] = PREVIOUS.write_polydata
    sizes: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-contours-") as folder:

        def run(name: str) -> None:
            total = 0
            for organ, by_level in enumerate(surfaces):
                for level, polydata in by_level.items():
                    path = Path(folder) / f"{organ}_{level}.vtp"
                    writers[name](polydata, str(path))
                    total += path.stat().st_size
            sizes[name] = total / 1e6

        best = _common.interleaved_best({name: (lambda name=name: run(name)) for name in writers}, repeat, warmup=True)
    ours_s = best["ours (write_polydata)"]
    print(f"\n-- writing the {sum(len(s) for s in surfaces)} surfaces as .vtp, best of {repeat}")
    print(_common.table([{"": k, "seconds": v, "ratio to ours": v / ours_s, "MB": sizes[k]} for k, v in best.items()], ["", "seconds", "ratio to ours", "MB"]))
    return {"best_s": best, "mb": sizes}


def main() -> int:
    parser = _common.argument_parser(__doc__, "256x256x100, one round")
    parser.add_argument("--repeat", type=int, default=None, help="rounds (default 3, quick 1)")
    args = parser.parse_args()
    repeat = args.repeat or (1 if args.quick else 3)
    size = (256, 256, 100) if args.quick else _common.CT_SIZE_XYZ
    levels = contours.DEFAULT_LEVELS

    info = _common.print_machine("bench_contours")
    images = sdm_images(size)
    best = _common.interleaved_best(
        {
            "ours (iso_surfaces)": lambda: ours(images, levels),
            **({f"previous iso_surfaces ({_common.BASELINE_COMMIT})": lambda: [PREVIOUS.iso_surfaces(i, levels) for i in images]} if PREVIOUS else {}),
            "VTK flying edges, whole volume, per level": lambda: reference_per_level(images, levels),
            "VTK flying edges, whole volume, 4 levels in one call": lambda: reference_one_call(images, levels),
        },
        repeat,
        warmup=True,
    )
    ours_s = best["ours (iso_surfaces)"]
    print(f"\n-- {ORGANS} organs x {len(levels)} levels {levels} of a {'x'.join(map(str, size))} (x, y, z) SDM; best of {repeat}")
    rows = [{"": name, "seconds": seconds, "ratio to ours": seconds / ours_s} for name, seconds in best.items()]
    print(_common.table(rows, ["", "seconds", "ratio to ours"]))

    ours_surfaces, reference = ours(images, levels), reference_per_level(images, levels)
    same_counts, largest, points, triangles = True, 0.0, 0, 0
    for mine, theirs in zip(ours_surfaces, reference):
        for level in levels:
            a, b = mine[float(level)], theirs[float(level)]
            same_counts &= a.GetNumberOfPoints() == b.GetNumberOfPoints() and a.GetNumberOfPolys() == b.GetNumberOfPolys()
            points += a.GetNumberOfPoints()
            triangles += a.GetNumberOfPolys()
            if a.GetNumberOfPoints() == b.GetNumberOfPoints() and a.GetNumberOfPoints():
                largest = max(largest, _point_distance(a, b))
    print(f"   surfaces: {points} points, {triangles} triangles in all; same counts as the reference: {same_counts}; "
          f"max point difference {largest:.2e} mm")
    print(f"   ours: {ours_s:.2f} s (goal < 2 s); reference per level x{best['VTK flying edges, whole volume, per level'] / ours_s:.2f}")
    writing = writing_benchmark(ours_surfaces, repeat)
    _common.save_json(args.json, {"machine": info, "size_xyz": size, "best_s": best, "same_counts": same_counts,
                                  "max_point_difference_mm": largest, "writing": writing})
    return 0 if same_counts else 1


if __name__ == "__main__":
    sys.exit(main())
