"""Pictures for reviewing a batch: one PNG per case and an overview of all cases, with matplotlib.

Case picture (:func:`case_picture`): axial, coronal and sagittal slices through the centre of the organs,
in radiological convention (patient right on the left of axial and coronal views), with orientation letters
on every edge and each slice's position in mm. Per organ, in its colour (the model card's, which the Slicer
segmentation uses too): the segmentation as a light fill with a thick outline, the SDM iso-contours of the
nonzero levels (thin, same colour; the 0 level is the outline itself) and, when a reference is given, the
reference outline (dashed). The title gives each organ's Dice, the legend the organs and the line styles.

Grey levels: a CT is shown in a fixed window in Hounsfield units (:func:`display_window`: the model card's
intensity window, else the soft-tissue window W400/L40), so that the same tissue looks the same in every
case; other images from their 1st to 99th percentile.

The image and every line share one coordinate system: column ``c`` and row ``r`` of a slice are drawn at
``x = c, y = r`` whatever the orientation of the axes (``imshow`` places pixel centres there, and the
contours get those coordinates explicitly; ``contour(..., origin="upper")`` would instead flip the rows,
which mirrored the axial outlines front to back).

Overview (:func:`overview_picture`): a grid of axial thumbnails, one per case, sorted by the case's worst
organ Dice (lowest first), so that a reviewer sees the failures first.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

#: Views: name, axis of the LPS-ordered array (z, y, x) that is fixed, edge letters (left, right, top, bottom).
_VIEWS = (("axial", 0, ("R", "L", "A", "P")), ("coronal", 1, ("R", "L", "S", "I")), ("sagittal", 2, ("A", "P", "S", "I")))
#: Letters of increasing LPS x, y, z, and of decreasing.
_POSITIVE, _NEGATIVE = ("L", "P", "S"), ("R", "A", "I")
OUTLINE_WIDTH, LEVEL_WIDTH, REFERENCE_WIDTH = 2.2, 0.8, 1.6
#: Opacity of the organ fill: the anatomy under it stays visible.
FILL_ALPHA = 0.28
#: The usual soft-tissue window (width 400 HU, level 40 HU), for a CT model whose card has no window.
SOFT_TISSUE_HU = (-160.0, 240.0)


@dataclass
class Thumbnail:
    """An axial view of one case, small, for the overview."""

    case: str
    pixels: np.ndarray  #: RGB uint8
    dice: dict[str, float]  #: organ -> Dice (empty without a reference)

    @property
    def worst(self) -> tuple[str, float] | None:
        scored = {name: value for name, value in self.dice.items() if math.isfinite(value)}
        return min(scored.items(), key=lambda item: item[1]) if scored else None


def _lps(image: sitk.Image) -> sitk.Image:
    return sitk.DICOMOrient(image, "LPS")


def _window(volume: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(volume, [1, 99])
    return float(low), float(high if high > low else low + 1)


def display_window(card: Any) -> tuple[float, float] | None:
    """Grey-level window (low, high) for pictures of a model's inputs: the card's intensity window
    (``{"method": "window", "low": ..., "high": ...}``) when it has one, the soft-tissue window for another
    CT model, and None (each image's 1st-99th percentile) for MR and unknown modalities."""
    intensity = getattr(card, "intensity", None) or {}
    if intensity.get("method") == "window":
        return float(intensity["low"]), float(intensity["high"])
    if getattr(card, "modality", None) == "CT":
        return SOFT_TISSUE_HU
    return None


def _position(value: float, axis: int) -> str:
    """A coordinate along LPS axis ``axis`` as "12.0 mm S" / "3.5 mm R"."""
    letter = _POSITIVE[axis] if value >= 0 else _NEGATIVE[axis]
    return f"{abs(value):.1f} mm {letter}"


class _Slices:
    """The volumes of one case reoriented to LPS, and the slices through a chosen centre."""

    def __init__(
        self, image: sitk.Image, labels: sitk.Image, sdms: Mapping[str, sitk.Image], reference: sitk.Image | None,
        window: tuple[float, float] | None = None,
    ) -> None:
        oriented = _lps(image)
        self.spacing = oriented.GetSpacing()  # x, y, z
        self.volume = sitk.GetArrayFromImage(oriented).astype(np.float32)
        self.labels = sitk.GetArrayFromImage(_lps(labels))
        self.sdms = {name: sitk.GetArrayFromImage(_lps(sdm)) for name, sdm in sdms.items()}
        self.reference = sitk.GetArrayFromImage(_lps(reference)) if reference is not None else None
        found = np.argwhere(self.labels > 0)
        if not found.size and self.reference is not None:
            found = np.argwhere(self.reference > 0)
        self.centre = found.mean(axis=0).round().astype(int) if found.size else np.array(self.volume.shape) // 2
        self.point = oriented.TransformIndexToPhysicalPoint([int(i) for i in self.centre[::-1]])  # LPS mm
        self.window = tuple(window) if window is not None else _window(self.volume)

    def cut(self, array: np.ndarray, axis: int) -> np.ndarray:
        index = [slice(None)] * 3
        index[axis] = int(self.centre[axis])
        return array[tuple(index)]

    def shape_ratio(self, axis: int) -> float:
        """Height / width in mm of the view fixing ``axis``."""
        rows, columns = self.cut(self.volume, axis).shape
        return rows / columns * self.aspect(axis)

    def aspect(self, axis: int) -> float:
        """Row spacing / column spacing of the view fixing ``axis`` (z, y, x order)."""
        sx, sy, sz = self.spacing
        return {0: sy / sx, 1: sz / sx, 2: sz / sy}[axis]

    def draw(self, axes: Any, axis: int, organs: Sequence[Any], levels: Sequence[float], thin: float = 1.0) -> None:
        """One view: the image, then per organ its fill, SDM levels, reference (dashed) and outline."""
        from matplotlib.colors import ListedColormap

        origin = "upper" if axis == 0 else "lower"  # axial: anterior up; coronal and sagittal: superior up
        picture = self.cut(self.volume, axis)
        axes.imshow(picture, cmap="gray", vmin=self.window[0], vmax=self.window[1], origin=origin,
                    aspect=self.aspect(axis), interpolation="bilinear")
        # Pixel centres as imshow puts them (x = column, y = row) for either origin: the lines use the same.
        xy = (np.arange(picture.shape[1]), np.arange(picture.shape[0]))
        labels = self.cut(self.labels, axis)
        for organ in organs:
            color = tuple(float(c) for c in organ.color)
            mask = labels == organ.label
            if mask.any():
                axes.imshow(np.where(mask, 1.0, np.nan), cmap=ListedColormap([color]), vmin=0, vmax=1, alpha=FILL_ALPHA,
                            origin=origin, aspect=self.aspect(axis), interpolation="nearest")
            sdm = self.cut(self.sdms[organ.name], axis) if organ.name in self.sdms else None
            if sdm is not None:
                for level in (lv for lv in levels if lv != 0 and sdm.min() < lv < sdm.max()):
                    axes.contour(*xy, sdm, levels=[level], colors=[color], linewidths=LEVEL_WIDTH * thin, alpha=0.75)
            if self.reference is not None:
                reference = self.cut(self.reference, axis) == organ.label
                if reference.any():
                    axes.contour(*xy, reference, levels=[0.5], colors=[color], linewidths=REFERENCE_WIDTH * thin, linestyles="dashed")
            if mask.any():
                axes.contour(*xy, mask, levels=[0.5], colors=[color], linewidths=OUTLINE_WIDTH * thin)
        axes.set_xticks([])
        axes.set_yticks([])


def _letters(axes: Any, letters: tuple[str, str, str, str], size: float) -> None:
    from matplotlib import patheffects

    # Yellow with a black rim: readable on dark air and on bright tissue alike.
    style = dict(transform=axes.transAxes, color="yellow", fontsize=size, fontweight="bold", ha="center", va="center",
                 path_effects=[patheffects.withStroke(linewidth=3, foreground="black")])
    left, right, top, bottom = letters
    axes.text(0.04, 0.5, left, **style)
    axes.text(0.96, 0.5, right, **style)
    axes.text(0.5, 0.95, top, **style)
    axes.text(0.5, 0.05, bottom, **style)


def _dice_text(organs: Sequence[Any], dice: Mapping[str, float] | None) -> str:
    if dice is None:
        return "no reference: no Dice"
    parts = [f"{o.name} {dice[o.name]:.3f}" if math.isfinite(dice.get(o.name, math.nan)) else f"{o.name} not scored" for o in organs]
    return "Dice: " + ", ".join(parts)


def case_picture(
    path: str | Path,
    case: str,
    image: sitk.Image,
    labels: sitk.Image,
    sdms: Mapping[str, sitk.Image],
    organs: Sequence[Any],
    levels: Sequence[float],
    title: str,
    reference: sitk.Image | None = None,
    dice: Mapping[str, float] | None = None,
    window: tuple[float, float] | None = None,
) -> Thumbnail:
    """Write the case picture (PNG) and return its axial thumbnail for :func:`overview_picture`.

    ``organs`` have ``name``, ``label`` and ``color`` (RGB 0-1); ``dice`` maps organ names to Dice (NaN:
    not scored), given with ``reference``; ``window``: grey-level window (:func:`display_window`), None for
    the image's 1st-99th percentile.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    slices = _Slices(image, labels, sdms, reference, window)
    # As tall as the tallest view needs at 4.4 inches a view, plus room for the titles and the legend.
    tallest = max(slices.shape_ratio(axis) for _name, axis, _letters in _VIEWS)
    legend_rows = math.ceil((len(organs) + 3) / 6)
    figure = Figure(figsize=(13.5, min(max(4.4 * tallest, 2.6), 7.5) + 1.5 + 0.3 * legend_rows), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.subplots(1, 3)
    for axes, (name, axis, letters) in zip(grid, _VIEWS):
        slices.draw(axes, axis, organs, levels)
        _letters(axes, letters, 13)
        lps_axis = 2 - axis  # the LPS axis this view is fixed along
        axes.set_title(f"{name}, {_position(slices.point[lps_axis], lps_axis)}", fontsize=12)
    nonzero = [lv for lv in levels if lv != 0]
    handles = [Line2D([0], [0], color=tuple(o.color), lw=6, label=o.name) for o in organs]
    handles.append(Line2D([0], [0], color="0.35", lw=OUTLINE_WIDTH, label="segmentation"))
    if nonzero:
        handles.append(Line2D([0], [0], color="0.35", lw=LEVEL_WIDTH, label=f"SDM levels {', '.join(f'{lv:g}' for lv in nonzero)}"))
    if reference is not None:
        handles.append(Line2D([0], [0], color="0.35", lw=REFERENCE_WIDTH, ls="dashed", label="reference"))
    figure.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), frameon=False, fontsize=11)
    heading = textwrap.fill(_dice_text(organs, dice if reference is not None else None), 150)
    figure.suptitle(f"{title}\n{heading}", fontsize=13)
    figure.savefig(str(path), format="png")
    return _thumbnail(slices, case, organs, levels, dice)


def case_thumbnail(
    case: str,
    image: sitk.Image,
    labels: sitk.Image,
    sdms: Mapping[str, sitk.Image],
    organs: Sequence[Any],
    levels: Sequence[float],
    reference: sitk.Image | None = None,
    dice: Mapping[str, float] | None = None,
    window: tuple[float, float] | None = None,
) -> Thumbnail:
    """The axial thumbnail :func:`case_picture` returns, without the picture (e.g. for a case done earlier)."""
    return _thumbnail(_Slices(image, labels, sdms, reference, window), case, organs, levels, dice)


def _thumbnail(slices: _Slices, case: str, organs: Sequence[Any], levels: Sequence[float], dice: Mapping[str, float] | None) -> Thumbnail:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    thumb = Figure(figsize=(2.6, 2.6), dpi=80)
    canvas = FigureCanvasAgg(thumb)
    axes = thumb.add_axes((0, 0, 1, 1))
    slices.draw(axes, 0, organs, levels, thin=0.7)
    axes.set_axis_off()
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    return Thumbnail(case, pixels, dict(dice or {}))


def overview_picture(path: str | Path, thumbnails: Sequence[Thumbnail], failed: Sequence[str] = (), columns: int = 5) -> None:
    """A grid of the cases' axial thumbnails sorted by worst organ Dice (lowest first; cases without a
    reference last, by name); failed cases are named in the title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def order(item: Thumbnail) -> tuple[int, float, str]:
        worst = item.worst
        return (0, worst[1], item.case) if worst else (1, 0.0, item.case)

    ranked = sorted(thumbnails, key=order)
    columns = max(1, min(columns, len(ranked)))
    rows = max(1, math.ceil(len(ranked) / columns))
    figure = Figure(figsize=(2.9 * columns, 3.3 * rows + 0.9), dpi=90, layout="constrained")
    FigureCanvasAgg(figure)
    for index in range(rows * columns):
        axes = figure.add_subplot(rows, columns, index + 1)
        axes.set_axis_off()
        if index >= len(ranked):
            continue
        item = ranked[index]
        axes.imshow(item.pixels)
        worst = item.worst
        label = f"{item.case}\nworst Dice {worst[1]:.3f}\n{textwrap.shorten(worst[0], 34)}" if worst else f"{item.case}\nno reference\n"
        axes.set_title(label, fontsize=9, color="firebrick" if worst and worst[1] < 0.5 else "black")
    heading = f"{len(ranked)} case{'s' if len(ranked) != 1 else ''}, worst organ Dice first (axial views)"
    if failed:
        heading += "\n" + textwrap.fill(f"failed, not shown: {', '.join(failed)}", 40 * columns)
    figure.suptitle(heading, fontsize=13)
    figure.savefig(str(path), format="png")
