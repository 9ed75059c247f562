"""A reviewed case in a MRML scene rendered by Slicer's own displayable managers (``trame-slicer`` on
``slicer-core``): offscreen snapshots for ``sdmorganseg snapshot`` and the views of the review page.

The nodes, colours and contours come from :meth:`SDMSegmentationLogic.create_nodes`, the code that builds
the Slicer panel's outputs; this module only adds the image, the views and what the review toggles.
Needs the ``review`` extra (``pip install -e ".[review]"``); it is imported only by the commands that use it.

Offscreen rendering: :func:`choose_offscreen_backend` sets ``VTK_DEFAULT_OPENGL_WINDOW`` to the first
backend that renders here (EGL, then OSMesa) before any render window exists, so no user sets VTK
variables.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk

from ..images.contours import level_tag
from ..common.errors import SDMOrganSegError
from .reviewcases import CaseData

VIEWS = ("axial", "coronal", "sagittal", "3d")
#: Offscreen VTK render windows, in the order tried: EGL (a GPU, or Mesa's llvmpipe), then OSMesa (CPU).
BACKENDS = ("vtkEGLRenderWindow", "vtkOSOpenGLRenderWindow")
#: The compared run's contours: the same levels in a blue-to-violet ramp, so both runs read at a glance.
COMPARE_LEVEL_COLORS = {0.0: (0.0, 0.85, 1.0), 0.1: (0.2, 0.55, 1.0), 0.2: (0.45, 0.4, 1.0), 0.3: (0.75, 0.3, 1.0)}
#: Opacity of the segmentation's fill in slice views (the panel's; the contours draw the boundary).
FILL_OPACITY = 0.25
SDM_OVERLAY_OPACITY = 0.5
#: JPEG quality of the page's images, one for every frame: trame-rca's default (50 while changing, then 90)
#: renders each change twice, and a render costs far more than encoding (600 x 600: ~2 ms either way).
PAGE_IMAGE_QUALITY = 90
#: Multisampling of slice views. trame-slicer asks for 8 samples; slice views draw an image and 2-pixel
#: lines, where Mesa's llvmpipe pays 2-3x the CPU per frame for softer line edges (benchmarks/RESULTS.md).
SLICE_VIEW_MULTISAMPLES = 0

# A window that renders 4x4 pixels red and reads one back: SupportsOpenGL() says yes for OSMesa even
# where libOSMesa is missing, so only a real render tells. In a child process: a broken driver must not
# take this process down, and its messages stay out of the user's terminal.
_PROBE = r"""
import sys
import vtkmodules.vtkRenderingOpenGL2 as gl
from vtkmodules.vtkRenderingCore import vtkRenderer
window = getattr(gl, sys.argv[1])()
window.SetOffScreenRendering(1)
window.SetSize(4, 4)
renderer = vtkRenderer()
renderer.SetBackground(1.0, 0.0, 0.0)
window.AddRenderer(renderer)
window.Render()
from vtkmodules.vtkCommonCore import vtkUnsignedCharArray
pixel = vtkUnsignedCharArray()
window.GetPixelData(1, 1, 1, 1, 0, pixel, 0)
print("RENDERS" if pixel.GetValue(0) > 200 and pixel.GetValue(1) < 50 else "BLANK")
"""


def choose_offscreen_backend() -> str:
    """Set ``VTK_DEFAULT_OPENGL_WINDOW`` to a working offscreen backend (kept when the user set it) and
    return it; an :class:`SDMOrganSegError` naming the fix when none renders."""
    chosen = os.environ.get("VTK_DEFAULT_OPENGL_WINDOW")
    if chosen:
        return chosen
    for backend in BACKENDS:
        try:
            probe = subprocess.run([sys.executable, "-c", _PROBE, backend], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0 and "RENDERS" in probe.stdout:
            os.environ["VTK_DEFAULT_OPENGL_WINDOW"] = backend
            return backend
    raise SDMOrganSegError(
        "no offscreen OpenGL works here (neither EGL nor OSMesa); install Mesa's EGL or OSMesa "
        "(Debian/Ubuntu: apt-get install libegl1 libgl1-mesa-dri, or libosmesa6)"
    )


def require_review_extra() -> None:
    """A one-line error naming the fix when trame-slicer (the review extra) is not installed."""
    import importlib.util

    for module in ("trame_slicer", "trame"):
        if importlib.util.find_spec(module) is None:
            raise SDMOrganSegError(
                f"the review tools need the review extra ({module} is not installed); install it in a virtual environment "
                "of its own: pip install -r requirements-review.lock -e '.[review]' (Python 3.10-3.12; README, 'Review in a browser')"
            )


def slicer_app() -> Any:
    """A trame-slicer application (scene, application logic, displayable managers), offscreen."""
    require_review_extra()
    choose_offscreen_backend()
    from trame_slicer.core import SlicerApp

    return SlicerApp()


def view_definition(view: str) -> Any:
    from trame_slicer.views import ViewLayoutDefinition

    return {
        "axial": ViewLayoutDefinition.axial_view,
        "coronal": ViewLayoutDefinition.coronal_view,
        "sagittal": ViewLayoutDefinition.sagittal_view,
        "3d": ViewLayoutDefinition.threed_view,
    }[view]()


@dataclass
class ShownCase:
    """A case's nodes in a scene: its image, the run's outputs, and the compared run's (or None)."""

    data: CaseData
    volume: Any
    outputs: Any  # mrmlsegmentation.OutputNodes
    compare: Any = None  # OutputNodes of the compared run
    compare_data: CaseData | None = None
    sdm_range_mm: dict[str, tuple[float, float]] = field(default_factory=dict)

    def nodes(self) -> list[Any]:
        found = [self.volume, *self.outputs.nodes()]
        if self.compare is not None:
            found += self.compare.nodes()
        return found


def show_case(scene: Any, data: CaseData, compare: CaseData | None = None, slice_views: Sequence[Any] = ()) -> ShownCase:
    """Add a case's image and outputs (and a compared run's contours) to ``scene``, as the panel does.

    The image goes into the background of ``slice_views`` before the outputs exist: a slice view adds its
    image actor when it gets a volume, and actors added after the segmentation's fill hide it.
    """
    from ..mrml.mrmlscene import sitk_to_volume_node
    from ..mrml.mrmlsegmentation import SDMSegmentationLogic

    from ..images.imageio import geometry_mismatch

    if compare is not None:
        difference = geometry_mismatch(compare.computed.labels, data.computed.labels)
        if difference:
            raise SDMOrganSegError(f"its label map and this run's disagree in grid ({difference})")
    logic = SDMSegmentationLogic(scene)
    image = data.image
    if image.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkInt16, sitk.sitkUInt8, sitk.sitkUInt16, sitk.sitkInt32):
        image = sitk.Cast(image, sitk.sitkFloat32)
    volume = sitk_to_volume_node(image, data.case.name, scene=scene)
    volume.CreateDefaultDisplayNodes()
    _window_level(volume, image)
    for view in slice_views:
        view.set_background_volume_id(volume.GetID())
    outputs = logic.create_nodes(volume, data.computed)
    _drop_copies(data)
    compared = None
    if compare is not None:
        compared = logic.create_nodes(volume, compare.computed)
        _drop_copies(compare)
        compared.segmentation.GetDisplayNode().SetVisibility(False)
        for models in compared.contours.values():
            for level, model in models.items():
                display = model.GetDisplayNode()
                display.SetColor(*COMPARE_LEVEL_COLORS.get(round(level, 6), (0.6, 0.3, 1.0)))
                display.SetSliceIntersectionThickness(1)
                display.SetVisibility3D(False)  # two sets of surfaces hide each other; slices show both
    return ShownCase(data, volume, outputs, compared, compare)


def _drop_copies(data: CaseData) -> None:
    """The nodes hold their own copies of the SDMs and contours: let the read ones go. A case chosen again
    is read again."""
    data.computed.sdms = {}
    data.computed.surfaces = {}


def _window_level(volume: Any, image: sitk.Image) -> None:
    """Percentiles 1-99 as the window, so one bright voxel (some MRIs have them) does not turn it black."""
    array = sitk.GetArrayViewFromImage(image)
    step = max(1, array.size // 1_000_000)
    low, high = np.percentile(array.reshape(-1)[::step], (1.0, 99.0))
    if high <= low:
        low, high = float(array.min()), float(array.max()) + 1e-6
    display = volume.GetDisplayNode()
    display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")  # what Slicer's volumes logic gives a new volume
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(float(low), float(high))


def remove_case(scene: Any, shown: ShownCase) -> None:
    from ..mrml.mrmlsegmentation import SDMSegmentationLogic

    logic = SDMSegmentationLogic(scene)
    if shown.compare is not None:
        logic.remove_outputs(shown.compare)
    logic.remove_outputs(shown.outputs)
    for index in reversed(range(shown.volume.GetNumberOfDisplayNodes())):
        scene.RemoveNode(shown.volume.GetNthDisplayNode(index))
    scene.RemoveNode(shown.volume)


def set_visibility(shown: ShownCase, organs: set[str], levels: set[str], fill: bool = True) -> None:
    """Show the contours of the chosen organs at the chosen levels (``level_tag`` strings), in slice views
    and in 3D, and each chosen organ's fill; everything else hidden."""
    for outputs, is_compare in ((shown.outputs, False), (shown.compare, True)):
        if outputs is None:
            continue
        for organ, models in outputs.contours.items():
            for level, model in models.items():
                model.GetDisplayNode().SetVisibility(organ in organs and level_tag(level) in levels)
        if not is_compare:
            display = outputs.segmentation.GetDisplayNode()
            segmentation = outputs.segmentation.GetSegmentation()
            for index in range(segmentation.GetNumberOfSegments()):
                segment_id = segmentation.GetNthSegmentID(index)
                display.SetSegmentVisibility(segment_id, fill and segmentation.GetSegment(segment_id).GetName() in organs)


def sdm_range_mm(shown: ShownCase, organ: str) -> tuple[float, float]:
    """(deepest inside, farthest outside) signed distance in mm of ``organ`` in the label map: what the
    normalised SDM's -1 and +1 stand for (the paper's normalisation divides each side by its extreme)."""
    if organ not in shown.sdm_range_mm:
        labels = shown.data.computed.labels
        label = {o.name: o.label for o in shown.data.computed.organs}[organ]
        mask = sitk.Equal(labels, label)
        if not sitk.GetArrayViewFromImage(mask).any():
            shown.sdm_range_mm[organ] = (0.0, 0.0)
        else:
            distance = sitk.GetArrayViewFromImage(sitk.SignedMaurerDistanceMap(mask, insideIsPositive=False, squaredDistance=False, useImageSpacing=True))
            shown.sdm_range_mm[organ] = (float(distance.min()), float(distance.max()))
    return shown.sdm_range_mm[organ]


def slice_normal(view: Any) -> np.ndarray:
    """The unit normal (RAS) of a slice view: Slicer's slice offset is the position along it."""
    matrix = view.get_view_node().GetSliceToRAS()
    return np.array([matrix.GetElement(r, 2) for r in range(3)])


def slice_offset(labels: sitk.Image, normal: np.ndarray, index: int | None, view: str = "") -> float:
    """The slice offset (mm along the view's ``normal``, RAS) through slice ``index`` of the image axis
    closest to the normal, or with ``None`` through the slice with the largest organ area."""
    from ..mrml.mrmlscene import sitk_ijk_to_ras

    ijk_to_ras = sitk_ijk_to_ras(labels)
    columns = ijk_to_ras[:3, :3] / np.linalg.norm(ijk_to_ras[:3, :3], axis=0)
    ijk_axis = int(np.argmax(np.abs(normal @ columns)))  # 0 = i (x), 1 = j (y), 2 = k (z)
    size = labels.GetSize()[ijk_axis]
    if index is None:
        from .reviewcases import largest_area_slice

        index = largest_area_slice(labels, 2 - ijk_axis)  # numpy axes are (k, j, i)
    if not 0 <= index < size:
        raise SDMOrganSegError(f"slice {index} is outside the image, which has {size} slices in the {view or 'view'}'s direction (0-{size - 1})")
    centre = (np.asarray(labels.GetSize(), dtype=float) - 1) / 2
    centre[ijk_axis] = index
    return float(normal @ (ijk_to_ras @ np.append(centre, 1.0))[:3])


def parse_size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        width, height = (int(p) for p in parts)
    except ValueError:
        raise SDMOrganSegError(f"--size must look like 800x600, got {text!r}") from None
    if not (16 <= width <= 8192 and 16 <= height <= 8192):
        raise SDMOrganSegError(f"--size {text} is out of range; width and height must be 16-8192 pixels")
    return width, height


def offscreen_view(app: Any, view: str, size: tuple[int, int]) -> Any:
    """An offscreen trame-slicer view that renders only when its ``render()`` is called (see
    :mod:`.offscreenviews`); create views before adding a case's nodes (a slice view made after the SDM
    volumes exist trips VTK errors in its layer pipeline)."""
    from .offscreenviews import OffscreenViewFactory

    if not any(isinstance(f, OffscreenViewFactory) for f in getattr(app.view_manager, "_factories", [])):
        app.view_manager.register_factory(OffscreenViewFactory())
    rendered = app.view_manager.create_view(view_definition(view))
    rendered.render_window().SetSize(*size)
    if view != "3d":
        without_multisampling([rendered])
    return rendered


def without_multisampling(slice_views: Sequence[Any]) -> None:
    """Slice views drawn without multisampling (:data:`SLICE_VIEW_MULTISAMPLES`); call before their first
    render, which sizes the window's framebuffers."""
    for view in slice_views:
        view.render_window().SetMultiSamples(SLICE_VIEW_MULTISAMPLES)


def render_view(rendered: Any, shown: ShownCase, view: str, slice_index: int | None = None) -> np.ndarray:
    """Render an offscreen view of a shown case; an RGB array (rows top to bottom)."""

    if view == "3d":
        rendered.fit_view_to_content()
    else:
        rendered.set_background_volume_id(shown.volume.GetID())
        rendered.fit_view_to_content()
        rendered.set_slice_value(slice_offset(shown.data.computed.labels, slice_normal(rendered), slice_index, view))
    rendered.render()
    return window_pixels(rendered.render_window())


def window_pixels(window: Any) -> np.ndarray:
    """The render window's last frame as RGB rows, top to bottom. Read with the layered displayable
    manager's buffer copy, as trame-slicer's page does: vtkWindowToImageFilter renders again and trips the
    slice layers' pipelines."""
    from slicer import vtkMRMLLayerDisplayableManager
    from vtkmodules.util.numpy_support import vtk_to_numpy
    from vtkmodules.vtkCommonDataModel import vtkImageData

    image = vtkImageData()
    vtkMRMLLayerDisplayableManager.RenderWindowBufferToImage(window, image)
    width, height, _ = image.GetDimensions()
    pixels = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)[::-1, :, :3]
    return np.ascontiguousarray(pixels)


def _quiet_teardown() -> None:
    """Silence VTK for the rest of the process: tearing down the views after their scene's nodes makes
    the slice layers' pipelines complain about inputs that are already gone (nothing is drawn any more)."""
    from vtkmodules.vtkCommonCore import vtkObject

    vtkObject.GlobalWarningDisplayOff()


def write_png(pixels: np.ndarray, path: Path, overwrite: bool = False) -> None:
    """Write an RGB array as PNG, atomically, never replacing a file unless ``overwrite``."""
    from vtkmodules.util.numpy_support import numpy_to_vtk
    from vtkmodules.vtkCommonDataModel import vtkImageData
    from vtkmodules.vtkIOImage import vtkPNGWriter

    from ..common.files import atomic_path, check_writable

    check_writable(path, overwrite)
    height, width, _ = pixels.shape
    image = vtkImageData()
    image.SetDimensions(width, height, 1)
    image.GetPointData().SetScalars(numpy_to_vtk(np.ascontiguousarray(pixels[::-1]).reshape(-1, 3), deep=True))
    with atomic_path(path, overwrite) as temporary:
        writer = vtkPNGWriter()
        writer.SetFileName(str(temporary))
        writer.SetInputData(image)
        writer.Write()
        if writer.GetErrorCode():
            raise SDMOrganSegError(f"cannot write {path}; check the folder and its permissions")


def snapshot(
    case_dir: str | Path,
    out: str | Path,
    view: str = "axial",
    slice_index: int | None = None,
    size: tuple[int, int] = (800, 800),
    overwrite: bool = False,
) -> dict[str, Any]:
    """``sdmorganseg snapshot``: one view of a ``segment`` output folder, as Slicer shows it, to a PNG.

    Returns what was drawn (case, view, slice offset in mm, backend); nothing is written but ``out``.
    """
    from ..common.files import check_writable
    from .reviewcases import find_cases, load_case

    if view not in VIEWS:
        raise SDMOrganSegError(f"unknown view {view!r}; use one of {', '.join(VIEWS)}")
    out = Path(out)
    check_writable(out, overwrite)  # before the seconds of loading
    cases = find_cases(case_dir)
    require_review_extra()
    if len(cases) != 1:
        raise SDMOrganSegError(f"{case_dir} holds {len(cases)} cases; give one case's folder (e.g. {cases[0].folder})")
    data = load_case(cases[0])
    app = slicer_app()
    rendered = offscreen_view(app, view, size)
    shown = show_case(app.scene, data, slice_views=[] if view == "3d" else [rendered])
    pixels = render_view(rendered, shown, view, slice_index)
    write_png(pixels, out, overwrite)
    offset = None if view == "3d" else rendered.get_slice_value()
    _quiet_teardown()
    return {"case": data.case.name, "view": view, "slice_offset_mm": offset, "backend": os.environ.get("VTK_DEFAULT_OPENGL_WINDOW", "")}
