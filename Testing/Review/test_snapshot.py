"""``sdmorganseg snapshot``: what Slicer's displayable managers draw, checked against the case's files.

Rendered offscreen in this process (EGL here, a CPU rasteriser: Mesa's llvmpipe), on small volumes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import REPO, make_case, require_review_extra

SIZE = (600, 600)
_SHOWN: list = []


@pytest.fixture(scope="module")
def slicer():
    require_review_extra()
    from SDMOrganSegLib.review import reviewscene

    yield reviewscene.slicer_app()
    reviewscene._quiet_teardown()


def _render(app, folder: Path, view: str, visible=None, slice_index=None):
    """Render ``view`` of the case in ``folder``; returns (pixels, view, shown). ``visible`` = (organs, levels, fill)."""
    from SDMOrganSegLib.review import reviewscene
    from SDMOrganSegLib.review.reviewcases import find_cases, load_case

    while _SHOWN:  # one case in the scene at a time, as on the page
        reviewscene.remove_case(app.scene, _SHOWN.pop())
    data = load_case(find_cases(folder)[0])
    rendered = reviewscene.offscreen_view(app, view, SIZE)
    shown = reviewscene.show_case(app.scene, data, slice_views=[] if view == "3d" else [rendered])
    if visible is not None:
        reviewscene.set_visibility(shown, *visible)
    pixels = reviewscene.render_view(rendered, shown, view, slice_index)
    _SHOWN.append(shown)
    return pixels, rendered, shown


def _pixel_to_index(rendered, labels: sitk.Image, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Continuous (i, j, k) voxel indices of pixels (row from the top), through the slice node's XY-to-RAS."""
    matrix = rendered.get_view_node().GetXYToRAS()
    xy_to_ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    height = SIZE[1]
    xy = np.stack([columns, height - 1 - rows, np.zeros_like(rows), np.ones_like(rows)]).astype(float)
    ras = (xy_to_ras @ xy)[:3].T
    lps = ras * np.array([-1.0, -1.0, 1.0])
    return np.array([labels.TransformPhysicalPointToContinuousIndex(tuple(map(float, p))) for p in lps])


def _boundary_voxels(labels: np.ndarray) -> np.ndarray:
    """(i, j, k) of voxels with a 6-neighbour of another label (outside the image counts as background)."""
    padded = np.pad(labels, 1)
    centre = padded[1:-1, 1:-1, 1:-1]
    differs = np.zeros(labels.shape, bool)
    for axis in range(3):
        for shift in (-1, 1):
            differs |= np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1] != centre
    return np.argwhere(differs)[:, ::-1]  # (z, y, x) -> (i, j, k)


def test_zero_contour_lies_on_the_segmentation_boundary(slicer, segmented):
    from scipy.spatial import cKDTree

    case = segmented / "hippocampus_003"
    pixels, rendered, shown = _render(slicer, case, "axial")
    labels = shown.data.computed.labels
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 70) & (pixels[..., 2] < 70)
    rows, columns = np.nonzero(red)
    assert rows.size > 100, "the level-0 contour (red) is missing from the axial view"
    index = _pixel_to_index(rendered, labels, rows, columns)
    boundary = _boundary_voxels(sitk.GetArrayFromImage(labels))
    distance, _ = cKDTree(boundary).query(index)
    # One voxel, as the issue asks, plus what drawing adds: the 2-pixel line reaches 1 pixel beside the
    # contour, and a pixel centre is up to half a pixel from the point it shows (in voxels: pixel size / spacing).
    pixel_mm = float(np.linalg.norm([rendered.get_view_node().GetXYToRAS().GetElement(r, 0) for r in range(3)]))
    tolerance = 1.0 + 1.5 * pixel_mm / min(labels.GetSpacing())
    assert distance.max() <= tolerance, f"a red pixel lies {distance.max():.2f} voxels from the boundary (tolerance {tolerance:.2f})"


def test_organ_fills_have_the_cards_colours(slicer, segmented):
    """With contours hidden, fill = 0.75 image + 0.25 organ colour (the panel's 2D fill opacity): the colour
    is recovered from a render with and one without the fill."""
    from SDMOrganSegLib.review import reviewscene

    case = segmented / "hippocampus_001"
    summary = json.loads((case / "summary.json").read_text())
    organs = set(summary["organs"])
    filled, rendered, shown = _render(slicer, case, "axial", (organs, set(), True))
    reviewscene.set_visibility(shown, set(), set(), False)
    rendered.render()
    plain = reviewscene.window_pixels(rendered.render_window()).astype(float)
    alpha = reviewscene.FILL_OPACITY
    recovered = (filled.astype(float) - (1 - alpha) * plain) / alpha
    labels = sitk.GetArrayFromImage(shown.data.computed.labels)
    height, width = SIZE[1], SIZE[0]
    rows, columns = np.mgrid[0:height:3, 0:width:3]
    index = np.rint(_pixel_to_index(rendered, shown.data.computed.labels, rows.ravel(), columns.ravel())).astype(int)
    inside_image = np.all((index >= 1) & (index < np.array(labels.shape[::-1]) - 1), axis=1)
    for name, organ in summary["organs"].items():
        i, j, k = index[inside_image].T
        # interior voxels: the organ's label in the voxel and its four in-plane neighbours (no blended edge)
        interior = np.ones(i.shape, bool)
        for di, dj in ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)):
            interior &= labels[k, j + dj, i + di] == organ["label"]
        assert interior.sum() > 20, f"too few interior pixels of {name}"
        found = np.median(recovered[rows.ravel()[inside_image][interior], columns.ravel()[inside_image][interior]], axis=0) / 255
        # 8-bit rounding of both renders: (0.5 + 0.75 * 0.5) / 0.25 = 3.5 levels, plus one level of interpolation.
        assert np.allclose(found, organ["color"], atol=4.5 / 255), f"{name}: drawn {found.round(3)}, card {organ['color']}"


def _synthetic_case(tmp_path: Path) -> Path:
    """A 30^3 volume (RAS-stored header: x and y axes flipped) with a bright cube in the patient's left,
    anterior, superior corner, labelled as organ 1."""
    size = 30
    array = np.full((size, size, size), 100, np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    image.SetOrigin((14.5, 14.5, -14.5))  # voxel centres from -14.5 to 14.5 mm on every axis
    labels = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    labels.CopyInformation(image)
    for x in range(5, 12):  # LPS millimetres: +x left, -y anterior, +z superior
        for y in range(-12, -5):
            for z in range(5, 12):
                index = image.TransformPhysicalPointToIndex((x + 0.5, y + 0.5, z + 0.5))
                image[index] = 1000
                labels[index] = 1
    return make_case(tmp_path / "synthetic", image, labels, {"cube": (1, (0.0, 1.0, 0.0))})


@pytest.mark.parametrize("view, up, right", [("axial", "anterior", "left"), ("coronal", "superior", "left"), ("sagittal", "superior", "posterior")])
def test_slicer_orientation(slicer, tmp_path, view, up, right):
    """Slicer's orientation: anterior up in axial, superior up in coronal and sagittal; patient right on
    the screen's left in axial and coronal, anterior on the screen's left in sagittal. The cube sits in the
    patient's left, anterior, superior corner."""
    folder = _synthetic_case(tmp_path)
    pixels, _, _ = _render(slicer, folder, view, (set(), set(), False))  # the image alone
    bright = np.argwhere((pixels.min(axis=2) > 200))  # the cube, white (the rest is windowed to black)
    assert bright.size
    middle = (np.array(SIZE[::-1]) - 1) / 2  # the cubic volume is fitted to the square view, centred
    cube = bright.mean(axis=0)
    assert cube[0] < middle[0], f"{view}: the {up} cube is drawn below the middle"
    if right == "left":  # the cube is on the patient's left: screen right
        assert cube[1] > middle[1], f"{view}: the patient's left is drawn on the screen's left"
    else:  # the cube is anterior: screen left
        assert cube[1] < middle[1], f"{view}: anterior is drawn on the screen's right"


def test_offscreen_views_render_only_when_asked(slicer, tmp_path):
    """Adding a case and moving the slice ask the view for many renders: it renders none of them by itself,
    then once when asked, as the page's scheduler coalesces them; slice views draw without multisampling."""
    from vtkmodules.vtkCommonCore import vtkCommand

    from SDMOrganSegLib.review import reviewscene
    from SDMOrganSegLib.review.offscreenviews import render_pending
    from SDMOrganSegLib.review.reviewcases import find_cases, load_case

    while _SHOWN:
        reviewscene.remove_case(slicer.scene, _SHOWN.pop())
    rendered = reviewscene.offscreen_view(slicer, "axial", SIZE)
    frames = []
    rendered.render_window().AddObserver(vtkCommand.StartEvent, lambda *_: frames.append(1))
    _SHOWN.append(reviewscene.show_case(slicer.scene, load_case(find_cases(_synthetic_case(tmp_path))[0]), slice_views=[rendered]))
    rendered.set_slice_value(rendered.get_slice_value() + 1.0)
    assert frames == []
    assert render_pending([rendered]) == [rendered] and len(frames) == 1
    assert render_pending([rendered]) == [] and len(frames) == 1
    assert rendered.render_window().GetMultiSamples() == 0


def test_snapshot_command(segmented, tmp_path):
    """The command line: a PNG with the level-0 red and the card's colours; an existing file is kept."""
    require_review_extra()
    out = tmp_path / "axial.png"
    command = [sys.executable, "-m", "SDMOrganSegLib.cli", "snapshot", str(segmented / "hippocampus_004"), "--out", str(out), "--size", "300x240"]
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO / "SDMOrganSeg")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    picture = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert picture.shape[:2] == (240, 300)
    assert np.count_nonzero((picture[..., 0] > 200) & (picture[..., 1] < 70) & (picture[..., 2] < 70)) > 20
    before = out.read_bytes()
    again = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "already exists" in again.stderr
    assert out.read_bytes() == before


def test_snapshot_refuses_a_missing_folder_at_once(tmp_path):
    require_review_extra()
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO / "SDMOrganSeg")}
    done = subprocess.run([sys.executable, "-m", "SDMOrganSegLib.cli", "snapshot", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.png")],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2 and done.stderr.startswith("sdmorganseg: error:") and "does not exist" in done.stderr
    assert not (tmp_path / "x.png").exists()
