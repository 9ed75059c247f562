"""Render the README screenshot (and, with --icons, draw the module and extension icons).

The outputs are made exactly as the Slicer module makes them (``SDMOrganSegLib.mrml.mrmllogic`` on a headless
slicer-core scene), then drawn offscreen with plain VTK (EGL where there is no display):

* left, a 3D view of the iso-surfaces, level 0 opaque and 0.1/0.2/0.3 translucent, over the axial slice;
* right, the axial slice with each surface's intersection drawn as a line, as Slicer's slice views do.

With the shipped model (default) the SDMs are the model's prediction. Without one (``--reference-sdm``, or
automatically when no model is installed) they are the SDMs of the reference segmentation, and the
picture says so.

    python docs/experiments/make_screenshot.py [--case hippocampus_003] [--model M] [--out docs/screenshot.png] [--icons]
    python docs/experiments/make_screenshot.py --data Testing/Data/openkbp-hn --case hn_235 --model headneck-oar --out docs/screenshot_headneck.png
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]  # this file is docs/experiments/<name>.py
sys.path.insert(0, str(REPO / "SDMOrganSeg"))
os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")  # no X server needed

import SimpleITK as sitk  # noqa: E402
import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

from SDMOrganSegLib.images.contours import DEFAULT_LEVELS, iso_surfaces, level_color, level_tag  # noqa: E402
from SDMOrganSegLib.common.errors import SDMOrganSegError  # noqa: E402

DATA = REPO / "Testing" / "Data" / "hippocampus"
HIPPOCAMPUS_ORGANS = {1: ("anterior hippocampus", (0.85, 0.40, 0.30)), 2: ("posterior hippocampus", (0.35, 0.60, 0.85))}
WIDTH, HEIGHT = 1100, 520
MAX_BYTES = 300 * 1024


# --- outputs -----------------------------------------------------------------------------------------------


def reference_outputs(image: sitk.Image, labels_path: Path):
    """ComputedOutputs holding the SDMs of the reference label map (used when no model is available)."""
    from SDMOrganSegLib.mrml import mrmllogic
    from SDMOrganSegLib.method.sdm import normalized_sdm

    labels = sitk.ReadImage(str(labels_path))
    labels.CopyInformation(image)
    array = sitk.GetArrayFromImage(labels).astype(np.int32)
    organs, sdms, surfaces = [], {}, {}
    for value, (name, color) in HIPPOCAMPUS_ORGANS.items():
        organs.append(mrmllogic.OrganSpec(name, value, color))
        sdm = sitk.GetImageFromArray(normalized_sdm(array == value, image.GetSpacing()))
        sdm.CopyInformation(image)
        sdms[name] = sdm
        surfaces[name] = iso_surfaces(sdm, DEFAULT_LEVELS)
    labels_image = sitk.GetImageFromArray(array.astype(np.uint8))
    labels_image.CopyInformation(image)
    return mrmllogic.ComputedOutputs(
        model_name="reference SDM", device="none", organs=organs, labels=labels_image, sdms=sdms,
        surfaces=surfaces, levels=tuple(DEFAULT_LEVELS),
    )


def make_outputs(case: str, model: str | None, use_reference: bool, data: Path = DATA):
    """Volume node and the run's OutputNodes in a headless scene, plus a caption."""
    from SDMOrganSegLib.mrml import headless, mrmllogic
    from SDMOrganSegLib.formats import modelfiles

    session = headless.start()
    image_path = data / "imagesTr" / f"{case}.nii.gz"
    volume = headless.load_volume(image_path, name=case)
    logic = mrmllogic.SDMSegmentationLogic(session.scene)
    if not use_reference:
        try:
            model_dir = modelfiles.resolve_model(model)
        except SDMOrganSegError as error:
            print(f"note: {error}; drawing the reference segmentation's SDMs instead", file=sys.stderr)
            use_reference = True
    if use_reference:
        computed = reference_outputs(mrmllogic.volume_node_to_sitk(volume), data / "labelsTr" / f"{case}.nii.gz")
        caption = f"{case}: reference SDMs (no model)"
    else:
        computed = mrmllogic.compute_outputs(mrmllogic.volume_node_to_sitk(volume), model_dir, "cpu")
        caption = f"{case}: model '{computed.model_name}'"
    return volume, logic.create_nodes(volume, computed), caption


# --- rendering ---------------------------------------------------------------------------------------------


def _axial_slice_actor(volume, k: int, upsample: int = 4) -> tuple[vtk.vtkImageActor, float, np.ndarray]:
    """An image actor showing axial slice k of the volume, placed in RAS, smoothly upsampled."""
    from SDMOrganSegLib.mrml import mrmllogic

    image = mrmllogic.volume_node_to_sitk(volume)
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    # CT in a soft-tissue window (HU); other images between percentiles.
    low, high = (-160.0, 240.0) if array.min() < -500 else np.percentile(array, [1, 99.5])
    plane = np.clip((array[k] - low) / max(high - low, 1e-6), 0, 1)
    data = vtk.vtkImageData()
    data.SetDimensions(plane.shape[1], plane.shape[0], 1)
    data.GetPointData().SetScalars(numpy_support.numpy_to_vtk((plane * 255).astype(np.uint8).reshape(-1), deep=True))
    resize = vtk.vtkImageResize()
    resize.SetInputData(data)
    resize.SetOutputDimensions(plane.shape[1] * upsample, plane.shape[0] * upsample, 1)
    resize.InterpolateOn()
    resize.SetResizeMethodToOutputDimensions()
    resize.Update()
    actor = vtk.vtkImageActor()
    actor.GetMapper().SetInputData(resize.GetOutput())
    # The resized image keeps the slice's extent in voxel units (its spacing shrinks), so the volume's
    # IJK->RAS, moved to slice k, places it in RAS.
    ijk_to_ras = mrmllogic.ijk_to_ras_matrix(volume)
    shift = np.eye(4)
    shift[2, 3] = k
    matrix = ijk_to_ras @ shift
    vtk_matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            vtk_matrix.SetElement(r, c, matrix[r, c])
    actor.SetUserMatrix(vtk_matrix)
    z_ras = (ijk_to_ras @ np.array([0, 0, k, 1.0]))[2]
    return actor, float(z_ras), ijk_to_ras


def _surface_actor(model, opacity: float | None = None) -> vtk.vtkActor:
    display = model.GetDisplayNode()
    normals = vtk.vtkPolyDataNormals()
    normals.SetInputData(model.GetPolyData())
    normals.SplittingOff()
    mapper = vtk.vtkPolyDataMapper()
    mapper.SetInputConnection(normals.GetOutputPort())
    mapper.ScalarVisibilityOff()
    actor = vtk.vtkActor()
    actor.SetMapper(mapper)
    actor.GetProperty().SetColor(display.GetColor())
    actor.GetProperty().SetOpacity(display.GetOpacity() if opacity is None else opacity)
    actor.GetProperty().SetSpecular(0.2)
    return actor


def _intersection_actor(model, z_ras: float, lift: float) -> vtk.vtkActor:
    plane = vtk.vtkPlane()
    plane.SetOrigin(0, 0, z_ras)
    plane.SetNormal(0, 0, 1)
    cutter = vtk.vtkCutter()
    cutter.SetCutFunction(plane)
    cutter.SetInputData(model.GetPolyData())
    mapper = vtk.vtkPolyDataMapper()
    mapper.SetInputConnection(cutter.GetOutputPort())
    mapper.ScalarVisibilityOff()
    actor = vtk.vtkActor()
    actor.SetMapper(mapper)
    actor.SetPosition(0, 0, lift)  # moved towards the camera, so the image never hides the lines
    actor.GetProperty().SetColor(model.GetDisplayNode().GetColor())
    actor.GetProperty().SetLineWidth(3.0)
    actor.GetProperty().LightingOff()
    return actor


def _text(text: str, x: float, y: float, size: int, color=(1, 1, 1), bold: bool = False) -> vtk.vtkTextActor:
    actor = vtk.vtkTextActor()
    actor.SetInput(text)
    actor.GetPositionCoordinate().SetCoordinateSystemToNormalizedViewport()
    actor.SetPosition(x, y)
    props = actor.GetTextProperty()
    props.SetFontSize(size)
    props.SetColor(color)
    props.SetBold(bold)
    return actor


def render(volume, outputs, caption: str, path: Path, scale: float = 1.0) -> None:
    labels = sitk.GetArrayViewFromImage(outputs.computed.labels)
    inside = np.argwhere(labels > 0)
    k = int(round(inside[:, 0].mean())) if inside.size else labels.shape[0] // 2
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(int(WIDTH * scale), int(HEIGHT * scale))
    window.SetAlphaBitPlanes(1)
    window.SetMultiSamples(0)  # depth peeling (correct translucency) needs it off

    # 3D view: surfaces over the axial slice, seen from the front, above and to the right.
    three_d = vtk.vtkRenderer()
    three_d.SetViewport(0.0, 0.0, 0.5, 1.0)
    three_d.SetBackground(0.16, 0.18, 0.25)  # flat: gradients make the PNG several times larger
    three_d.SetUseDepthPeeling(1)
    three_d.SetMaximumNumberOfPeels(8)
    slice_actor, z_ras, _ = _axial_slice_actor(volume, k)
    three_d.AddActor(slice_actor)
    opacity = {0.1: 0.28, 0.2: 0.16, 0.3: 0.10}
    for models in outputs.contours.values():
        for level, model in models.items():
            if model.GetPolyData().GetNumberOfPoints():
                three_d.AddActor(_surface_actor(model, 1.0 if level == 0 else opacity.get(level, 0.15)))
    three_d.ResetCamera()
    camera = three_d.GetActiveCamera()
    focal = np.array(camera.GetFocalPoint())
    distance = camera.GetDistance()
    camera.SetPosition(*(focal + distance * np.array([0.45, 0.75, 0.50]) / np.linalg.norm([0.45, 0.75, 0.50])))
    camera.SetViewUp(0, 0, 1)
    three_d.ResetCamera()
    camera.Zoom(1.3)
    three_d.ResetCameraClippingRange()
    three_d.AddViewProp(_text("3D: iso-surfaces (level 0 opaque)", 0.02, 0.93, round(18 * scale), bold=True))

    # Slice view: the axial slice with the intersections of the surfaces.
    slice_view = vtk.vtkRenderer()
    slice_view.SetViewport(0.5, 0.0, 1.0, 1.0)
    slice_view.SetBackground(0, 0, 0)
    flat_slice, _, _ = _axial_slice_actor(volume, k)
    slice_view.AddActor(flat_slice)
    for models in outputs.contours.values():
        for model in models.values():
            if model.GetPolyData().GetNumberOfPoints():
                slice_view.AddActor(_intersection_actor(model, z_ras, -0.5))
    slice_view.ResetCamera()
    camera = slice_view.GetActiveCamera()
    camera.ParallelProjectionOn()
    camera.SetViewUp(0, 1, 0)  # anterior up; patient left on the right, as in radiology
    # Seen from below (the feet), as radiologists read axial slices.
    camera.SetPosition(camera.GetFocalPoint()[0], camera.GetFocalPoint()[1], camera.GetFocalPoint()[2] - 500)
    slice_view.ResetCamera()
    camera.Zoom(1.05)
    slice_view.AddViewProp(_text("Axial slice: SDM iso-contours", 0.03, 0.93, round(18 * scale), bold=True))
    for index, level in enumerate(DEFAULT_LEVELS):
        slice_view.AddViewProp(_text(f"SDM {level_tag(level)}", 0.04 + 0.24 * index, 0.03, round(18 * scale), level_color(level), bold=True))

    three_d.AddViewProp(_text(caption, 0.02, 0.03, round(14 * scale), (0.9, 0.9, 0.9)))
    window.AddRenderer(three_d)
    window.AddRenderer(slice_view)
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.ReadFrontBufferOff()
    grab.Update()
    _write_png(grab.GetOutput(), path)


def _write_png(image: vtk.vtkImageData, path: Path) -> None:
    from SDMOrganSegLib.common.files import atomic_path

    with atomic_path(path, overwrite=True) as temporary:
        writer = vtk.vtkPNGWriter()
        writer.SetCompressionLevel(9)
        writer.SetFileName(str(temporary))
        writer.SetInputData(image)
        writer.Write()


# --- icons ----------------------------------------------------------------------------------------------------


def _blob_signed_distance(size: int, centre: tuple[float, float], radius: float) -> np.ndarray:
    """Signed distance (pixels, negative inside) to a lobed, brain-like closed curve."""
    theta = np.linspace(0, 2 * np.pi, 1440, endpoint=False)
    r = radius * (1 + 0.10 * np.sin(2 * theta + 0.6) + 0.06 * np.sin(5 * theta + 1.3) + 0.035 * np.sin(9 * theta))
    curve = np.stack([centre[0] + r * np.cos(theta) * 1.12, centre[1] + r * np.sin(theta) * 0.92], axis=1)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    points = np.stack([x.ravel(), y.ravel()], axis=1)
    distance = np.full(len(points), np.inf)
    for start in range(0, len(curve), 180):  # chunks keep memory small
        part = curve[start:start + 180]
        distance = np.minimum(distance, np.sqrt(((points[:, None, :] - part[None, :, :]) ** 2).sum(-1)).min(axis=1))
    path_x, path_y = curve[:, 0], curve[:, 1]
    # Even-odd rule: a point is inside when a ray to the right crosses the curve an odd number of times.
    inside = np.zeros(len(points), dtype=bool)
    for i in range(len(curve)):
        j = i - 1
        crosses = ((path_y[i] > points[:, 1]) != (path_y[j] > points[:, 1])) & (
            points[:, 0] < (path_x[j] - path_x[i]) * (points[:, 1] - path_y[i]) / (path_y[j] - path_y[i] + 1e-12) + path_x[i]
        )
        inside ^= crosses
    return np.where(inside, -distance, distance).reshape(size, size)


def draw_icon(size: int, line_width: float, ring_step: float, radius: float) -> np.ndarray:
    """RGBA uint8 icon: a tissue-coloured blob with red/orange/yellow/green iso-contours around it."""
    d = _blob_signed_distance(size, (size / 2, size / 2 + size * 0.02), radius)
    rgba = np.zeros((size, size, 4))
    # Inside: a soft, shaded fill that darkens towards the centre like a section through tissue.
    depth = np.clip(-d / radius, 0, 1)
    fill = np.array([0.93, 0.80, 0.78]) * (1 - 0.35 * depth[..., None]) + np.array([0.55, 0.35, 0.45]) * 0.35 * depth[..., None]
    fill += 0.05 * np.sin(-d * 0.9)[..., None] * (depth[..., None] > 0.15)  # faint folds
    inside_cover = np.clip(0.5 - d, 0, 1)
    rgba[..., :3] = fill
    rgba[..., 3] = inside_cover
    for index, level in enumerate(DEFAULT_LEVELS):
        cover = np.clip(line_width / 2 + 0.5 - np.abs(d - index * ring_step), 0, 1)[..., None]
        color = np.array(level_color(level))
        rgba[..., :3] = rgba[..., :3] * (1 - cover) + color * cover
        rgba[..., 3:] = np.maximum(rgba[..., 3:], cover)
    return np.clip(np.round(rgba * 255), 0, 255).astype(np.uint8)


def write_icon(rgba: np.ndarray, path: Path) -> None:
    image = vtk.vtkImageData()
    image.SetDimensions(rgba.shape[1], rgba.shape[0], 1)
    flipped = np.ascontiguousarray(rgba[::-1])  # VTK's first row is the bottom one
    array = numpy_support.numpy_to_vtk(flipped.reshape(-1, 4), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR)
    array.SetNumberOfComponents(4)
    image.GetPointData().SetScalars(array)
    _write_png(image, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", default="hippocampus_003", help="hippocampus test case (default hippocampus_003)")
    parser.add_argument("--data", type=Path, default=DATA, help="folder with imagesTr/ and labelsTr/ (default Testing/Data/hippocampus)")
    parser.add_argument("--model", default=None, help="model folder or shipped name (default: the shipped model)")
    parser.add_argument("--reference-sdm", action="store_true", help="draw the reference segmentation's SDMs instead of a model's")
    parser.add_argument("--out", default=str(REPO / "docs" / "screenshot.png"), help="output PNG (default docs/screenshot.png)")
    parser.add_argument("--icons", action="store_true", help="also redraw Resources/Icons/SDMOrganSeg.png and SDMOrganSeg.png")
    args = parser.parse_args(argv)

    if args.icons:
        write_icon(draw_icon(128, line_width=7.0, ring_step=11.0, radius=26.0), REPO / "Resources" / "Icons" / "SDMOrganSeg.png")
        write_icon(draw_icon(128, line_width=4.5, ring_step=8.0, radius=31.0), REPO / "SDMOrganSeg.png")
        print("wrote Resources/Icons/SDMOrganSeg.png and SDMOrganSeg.png")
    volume, outputs, caption = make_outputs(args.case, args.model, args.reference_sdm, args.data)
    out = Path(args.out)
    for scale in (1.0, 0.85, 0.7, 0.55):  # the README wants it under MAX_BYTES; busy contours compress worse
        render(volume, outputs, caption, out, scale)
        if out.stat().st_size <= MAX_BYTES:
            break
    print(f"wrote {out} ({out.stat().st_size // 1024} kB, {int(WIDTH * scale)}x{int(HEIGHT * scale)}): {caption}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
