"""pictures.py: every line lies on the image where the image shows the organ, in every view, and the grey
levels and colours are the ones a reader expects (CT window, the organ's colour)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("matplotlib")

from SDMOrganSegLib.images import pictures  # noqa: E402

#: Phantom (LPS voxel grid, 1 mm): a bright ball near the anterior (small y), left (large x) and superior
#: (large z) edges, so that a view mirrored along any of its axes puts the outline far from the ball.
SIZE_XYZ = (40, 48, 32)
CENTRE_XYZ = (28, 7, 23)
RADIUS = 4.5
GREEN = (0.0, 1.0, 0.0)
VIEWS = {name: axis for name, axis, _letters in pictures._VIEWS}


def _phantom(direction_ras: bool = False):
    z, y, x = np.mgrid[: SIZE_XYZ[2], : SIZE_XYZ[1], : SIZE_XYZ[0]]
    distance = np.sqrt((x - CENTRE_XYZ[0]) ** 2 + (y - CENTRE_XYZ[1]) ** 2 + (z - CENTRE_XYZ[2]) ** 2)
    ball = distance <= RADIUS
    image = sitk.GetImageFromArray(np.where(ball, 1000.0, 0.0).astype(np.float32))
    labels = sitk.GetImageFromArray(ball.astype(np.uint8))
    sdm = sitk.GetImageFromArray(np.clip((distance - RADIUS) / 10.0, -1, 1).astype(np.float32))
    if direction_ras:  # the same voxels stored right-to-left and front-to-back: the pictures must not change
        images = []
        for item in (image, labels, sdm):
            flipped = sitk.Flip(item, [True, True, False])
            flipped.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
            flipped.SetOrigin((float(SIZE_XYZ[0] - 1), float(SIZE_XYZ[1] - 1), 0.0))
            images.append(flipped)
        image, labels, sdm = images
    return image, labels, sdm


def _render(slices, axis: int, organs) -> np.ndarray:
    """One view drawn as the pictures draw it, filling a 400x400 canvas; RGB uint8."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4, 4), dpi=100, facecolor="black")  # black around the image too
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_axes((0, 0, 1, 1), facecolor="black")
    slices.draw(axes, axis, organs, [0, 0.1])
    axes.set_axis_off()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].astype(int)


def _centroid(mask: np.ndarray) -> np.ndarray:
    assert mask.sum() > 20, "nothing of that kind was drawn"
    return np.argwhere(mask).mean(axis=0) / np.asarray(mask.shape)  # (row, column) as fractions of the canvas


@pytest.mark.parametrize("direction_ras", [False, True], ids=["LPS", "RAS-stored"])
@pytest.mark.parametrize("view", list(VIEWS))
def test_outlines_lie_on_the_organ_in_every_view(view, direction_ras):
    image, labels, sdm = _phantom(direction_ras)
    organ = SimpleNamespace(name="ball", label=1, color=GREEN)
    slices = pictures._Slices(image, labels, {"ball": sdm}, reference=labels, window=(0.0, 1000.0))
    axis = VIEWS[view]
    plain = _render(slices, axis, [])
    drawn = _render(slices, axis, [organ])
    ball = _centroid((plain[..., 0] > 128) & (np.abs(plain[..., 0] - plain[..., 1]) < 8))  # the bright ball, grey
    lines = drawn[..., 1] - drawn[..., 0] > 150  # the outline, SDM level and reference, pure green
    # Mirrored, the outline's centre would be about 0.7 of the canvas away; the ball is 9 voxels of 32-48.
    np.testing.assert_allclose(_centroid(lines), ball, atol=0.04)
    # And the view itself is oriented as its edge letters say: anterior up (axial), superior up (coronal,
    # sagittal), patient left on the right (axial, coronal), anterior on the left (sagittal).
    row, column = ball
    expected = {"axial": (row < 0.5, column > 0.5), "coronal": (row < 0.5, column > 0.5), "sagittal": (row < 0.5, column < 0.5)}
    assert expected[view] == (True, True)


def test_the_organ_is_filled_with_its_own_colour():
    image, labels, sdm = _phantom()
    slices = pictures._Slices(image, labels, {}, reference=None, window=(-1000.0, 1000.0))
    drawn = _render(slices, 0, [SimpleNamespace(name="ball", label=1, color=(1.0, 0.0, 0.0))])
    grey = _render(slices, 0, [])
    inside = _centroid((grey[..., 0] > 200))  # the ball's centre, where the fill lies and no line passes
    row, column = (np.asarray(inside) * drawn.shape[:2]).astype(int)
    red, green, blue = drawn[row, column]
    assert red > green + 40 and abs(green - blue) <= 2  # tinted red, the grey under it still visible
    assert green > 100


def test_ct_pictures_use_the_card_window_or_soft_tissue():
    windowed = SimpleNamespace(intensity={"method": "window", "low": -500.0, "high": 1000.0}, modality="CT")
    assert pictures.display_window(windowed) == (-500.0, 1000.0)
    assert pictures.display_window(SimpleNamespace(intensity={"method": "zscore"}, modality="CT")) == (-160.0, 240.0)
    assert pictures.display_window(SimpleNamespace(intensity={"method": "percentile"}, modality="MR")) is None
    # A CT slice: air, fat (-100 HU) and muscle (50 HU) get the same grey in every case, whatever the percentiles.
    volume = np.full((4, 20, 20), -1000.0, np.float32)
    volume[:, 5:15, 5:10], volume[:, 5:15, 10:15] = -100.0, 50.0
    image = sitk.GetImageFromArray(volume)
    labels = sitk.GetImageFromArray(np.zeros(volume.shape, np.uint8))
    slices = pictures._Slices(image, labels, {}, None, window=pictures.SOFT_TISSUE_HU)
    assert slices.window == (-160.0, 240.0)
    grey = _render(slices, 0, [])
    fat, muscle = grey[200, 150, 0], grey[200, 250, 0]
    # Linear grey scale over the window: -100 HU -> 0.15, 50 HU -> 0.525 (x 255, with bilinear smoothing).
    assert abs(fat - 0.15 * 255) <= 3 and abs(muscle - 0.525 * 255) <= 3


def test_segment_writes_the_same_picture_with_pictures(tiny_model_dir, tmp_path):
    import json

    from conftest import HIPPOCAMPUS
    from test_segment_evaluate import run_cli

    image = HIPPOCAMPUS / "imagesTr" / "hippocampus_003.nii.gz"
    out = tmp_path / "out"
    done = run_cli("segment", str(image), "--model", str(tiny_model_dir), "--out", str(out), "--device", "cpu", "--quiet", "--pictures")
    assert done.returncode == 0, done.stderr
    picture = out / "hippocampus_003.png"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "hippocampus_003.png" in json.loads((out / "summary.json").read_text())["outputs"]
    from matplotlib.image import imread

    pixels = imread(str(picture))
    assert pixels.shape[1] == 1350 and pixels.shape[0] > 400  # 13.5 inches at 100 dpi, three views side by side
