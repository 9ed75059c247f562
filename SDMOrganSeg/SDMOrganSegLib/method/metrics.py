"""Segmentation metrics: Dice, Hausdorff distance (HD), 95th-percentile Hausdorff distance (HD95) and
average surface distance (ASD), with the surface definitions of google-deepmind/surface-distance.

Conventions:

* Masks and label maps are numpy arrays in ``(z, y, x)`` order; ``spacing`` is given in ITK order
  ``(x, y, z)`` in millimetres, as SimpleITK reports it, and is reversed internally.
* ``pred`` is the segmentation being judged, ``ref`` the reference. Every metric here is symmetric, so
  swapping them changes nothing.

Surfaces, as in google-deepmind/surface-distance (``compute_surface_distances``):

* The surface points ("surfels") lie on the voxel *corners*: the grid shifted by half a voxel, one point
  between every 2x2x2 block of voxels (voxels outside the array count as background). A corner is on the
  surface when its 2x2x2 block holds both foreground and background voxels.
* Each surfel carries the area (mm^2) of the marching-cubes surface inside its 2x2x2 block: the polygons
  that cut off the minority corners of the block (the foreground voxels when at most four of the eight are
  foreground, else the background ones), each polygon split into as few flat pieces as possible (a bent
  pentagon becomes a triangle and a trapezoid). This reproduces the package's 256-entry lookup table for
  any spacing; the test suite checks it against the package.
* A surfel's distance is the Euclidean distance in mm to the nearest surfel of the other mask.

Metrics (``A`` = surfels of ``pred``, ``B`` = surfels of ``ref``, ``d`` = distance, ``w`` = area):

* ``dice`` = 2 |pred AND ref| / (|pred| + |ref|), counted in voxels.
* ``hd`` = max(max_A d, max_B d), in mm.
* ``hd95`` = max(P95_A, P95_B), where P95 of one surface is the smallest distance ``t`` such that the
  surfels with distance <= ``t`` hold at least 95 % of that surface's area (the area-weighted percentile of
  ``compute_robust_hausdorff(..., 95)``). When that area fraction lands on 95 % exactly (up to rounding,
  relative 1e-12), the lower distance is taken; surface-distance's own floating-point sums may pick either.
* ``asd`` = (sum_A d w + sum_B d w) / (sum_A w + sum_B w): the area-weighted mean distance over both
  surfaces together. surface-distance's ``compute_average_surface_distance`` returns the two directed means
  instead; this is their mean weighted by each surface's area, so it lies between them.

Empty masks (no NaN, no warnings):

* both empty: ``dice = 1``, ``hd = hd95 = asd = 0`` from :func:`organ_metrics` (the two masks agree);
  :func:`evaluate_label_maps`, which scores organs, reports such an organ as ``absent`` instead (no
  metrics, left out of the mean): an organ in neither map says nothing about the segmentation, and
  counting it as a perfect score would flatter the mean (a wrong organ list made one read 0.99 for 0.83);
* exactly one empty: ``dice = 0``, ``hd = hd95 = asd = inf`` (there is no surface to measure to).
  The CSV writer writes ``inf``; the JSON writer writes the string ``"inf"`` (JSON has no infinity, and
  ``null`` would read as "not computed"); ``float("inf")`` reads both back.

Partial annotations: with ``annotated`` (the organs a reference case was contoured for, as in an
``annotations.json`` of ``{"CASE": ["organ name", ...]}``), an organ not listed is ``unannotated``: its
zero voxels in the reference mean "unknown", not "absent", so it is not scored either.

Speed: both masks are cropped to their union bounding box plus one voxel first, and corner codes come
from three shifted sums on that box. Distances are exact (float64): each surfel first tries the shortest
grid offsets in order of length (most surfels of two similar masks lie on or beside the other surface),
and the rest query a k-d tree of the other surface's mm coordinates. This was measured faster than
``scipy.ndimage.distance_transform_edt`` on the box; the ``edt`` package is about as fast as the k-d tree
but returns float32, off by up to 2e-5 mm at 70 mm (see ``benchmarks/bench_metrics.py``).

Long on purpose (about 630 lines): the surface definitions, the lookup table they reproduce and the
metrics built on them are checked together against surface-distance (Testing/Python/test_metrics.py),
and the few readers and writers at the end share their conventions (``absent``, ``inf``).
"""

from __future__ import annotations

import csv
import functools
import io
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial import cKDTree

from ..common.errors import SDMOrganSegError
from ..common.files import read_json_object, write_text_atomic
from ..images.imageio import geometry_mismatch, label_array

#: Percentile used for ``hd95``.
HD_PERCENTILE = 95.0

_THREADS = 2
# Area fractions this close (relative) to the percentile count as reaching it: an exact tie then gives
# the lower distance whatever the rounding of the sums.
_TIE_TOLERANCE = 1e-12
# Grid offsets tried before the k-d tree, and the number of open surfels below which the tree takes over.
_NEAR_OFFSETS = 64
_TREE_BELOW = 256
# find_objects allocates one entry per label value up to the largest; beyond this use np.unique.
_MAX_FIND_OBJECTS_LABEL = 1 << 16


_COLUMNS = ("dice", "hd", "hd95", "asd")
#: :attr:`OrganMetrics.status` values: scored, in neither map, not contoured in the reference case.
SCORED, ABSENT, UNANNOTATED = "scored", "absent", "unannotated"


@dataclass(frozen=True)
class OrganMetrics:
    """Metrics of one organ. ``dice`` in [0, 1]; ``hd``, ``hd95``, ``asd`` in mm, ``inf`` when exactly
    one of the two masks is empty (see the module docstring). ``status`` is ``scored``, or ``absent`` /
    ``unannotated`` for an organ that was not scored: its metrics are then NaN and it is left out of means."""

    dice: float
    hd: float
    hd95: float
    asd: float
    status: str = SCORED

    @property
    def scored(self) -> bool:
        return self.status == SCORED

    def to_dict(self) -> dict[str, float]:
        """``{"dice": .., "hd": .., "hd95": .., "asd": ..}`` as plain floats (``inf`` kept as ``inf``)."""
        return {name: float(getattr(self, name)) for name in _COLUMNS}


def not_scored(status: str) -> OrganMetrics:
    """The entry of an organ that is not scored (``absent`` or ``unannotated``): NaN metrics."""
    return OrganMetrics(math.nan, math.nan, math.nan, math.nan, status)


# --- surfel areas ------------------------------------------------------------------------------------

# The 8 voxels of a 2x2x2 block as (dz, dy, dx) offsets, in C order; the first is the code's highest bit.
_BLOCK = tuple(itertools.product((0, 1), repeat=3))


def _bit(corner: tuple[int, ...]) -> int:
    return 1 << (7 - (4 * corner[0] + 2 * corner[1] + corner[2]))


def _block_edges() -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    return [(p, q) for i, p in enumerate(_BLOCK) for q in _BLOCK[i + 1 :] if sum(abs(a - b) for a, b in zip(p, q)) == 1]


def _polygons(code: int) -> list[list[tuple[float, ...]]]:
    """Marching-cubes polygons of one 2x2x2 block, as cycles of edge midpoints (unit block)."""
    foreground = {corner for corner in _BLOCK if code & _bit(corner)}
    # The cut separates the minority corners; that settles the faces with two diagonal corners.
    marked = foreground if len(foreground) <= 4 else set(_BLOCK) - foreground
    edges = _block_edges()
    neighbours: dict[tuple, list[tuple]] = {}
    for axis, side in itertools.product(range(3), (0, 1)):
        face_edges = [e for e in edges if e[0][axis] == side and e[1][axis] == side]
        cut = [e for e in face_edges if (e[0] in marked) != (e[1] in marked)]
        if len(cut) == 2:
            links = [tuple(cut)]
        else:  # 0 or 4 cut edges: one link around each marked corner of the face
            corners = {c for e in face_edges for c in e if c in marked}
            links = [tuple(e for e in cut if c in e) for c in corners] if cut else []
        for first, second in links:
            neighbours.setdefault(first, []).append(second)
            neighbours.setdefault(second, []).append(first)
    cycles, seen = [], set()
    for start in neighbours:
        if start in seen:
            continue
        cycle, previous, current = [start], None, start
        seen.add(start)
        while True:
            following = next(e for e in neighbours[current] if e != previous)
            if following == start or following in seen:
                break
            cycle.append(following)
            seen.add(following)
            previous, current = current, following
        cycles.append([tuple((a + b) / 2 for a, b in zip(*edge)) for edge in cycle])
    return cycles


def _triangulations(indices: tuple[int, ...]):
    """Every triangulation of a polygon given by its vertex indices in cyclic order."""
    if len(indices) < 3:
        yield []
        return
    first, last = indices[0], indices[-1]
    for apex in range(1, len(indices) - 1):
        for left in _triangulations(indices[: apex + 1]):
            for right in _triangulations(indices[apex:]):
                yield left + right + [(first, indices[apex], last)]


def _area_vector(p: np.ndarray, q: np.ndarray, r: np.ndarray) -> np.ndarray:
    return np.cross(q - p, r - p) / 2


def _plane_count(points: np.ndarray, triangles: list[tuple[int, int, int]]) -> int:
    planes = set()
    for triangle in triangles:
        p, q, r = points[list(triangle)]
        normal = _area_vector(p, q, r)
        normal = normal / np.linalg.norm(normal)
        normal = normal if normal[np.argmax(np.abs(normal))] > 0 else -normal
        planes.add(tuple(np.round(np.append(normal, normal @ p), 9)))
    return len(planes)


def _code_area_vectors(code: int) -> list[np.ndarray]:
    """Area vectors of the surface triangles in a unit 2x2x2 block with the given code."""
    vectors = []
    for polygon in _polygons(code):
        points = np.array(polygon)
        # Triangles and quads here are flat; only bent pentagons and hexagons need a choice. Affine
        # scaling keeps flat pieces flat, so the split chosen here holds for every spacing.
        corners = tuple(range(len(points)))
        splits = _triangulations(corners) if len(points) > 4 else [[(0, i, i + 1) for i in corners[1:-1]]]
        best = min(splits, key=lambda t: _plane_count(points, t))
        vectors += [_area_vector(*points[list(t)]) for t in best]
    return vectors


@functools.lru_cache(maxsize=1)
def _unit_area_vectors() -> np.ndarray:
    """(256, T, 3): area vectors of the surface triangles of each block code in a unit block, zero-padded."""
    minority = {code: _code_area_vectors(code) for code in range(256) if bin(code).count("1") <= 4}
    # A block and its complement have the same surface (the cut is around the minority corners).
    per_code = [minority[code] if code in minority else minority[255 - code] for code in range(256)]
    table = np.zeros((256, max(len(v) for v in per_code), 3))
    for code, vectors in enumerate(per_code):
        if vectors:
            table[code, : len(vectors)] = vectors
    return table


@functools.lru_cache(maxsize=16)
def _surfel_area_table(spacing_zyx: tuple[float, float, float]) -> np.ndarray:
    """Area in mm^2 of the surface in a 2x2x2 block, indexed by the block code (256 entries)."""
    sz, sy, sx = spacing_zyx
    # An area vector's component along an axis scales with the product of the two other spacings.
    scale = np.array([sy * sx, sz * sx, sz * sy])
    table = np.linalg.norm(_unit_area_vectors() * scale, axis=2).sum(axis=1)
    table.flags.writeable = False
    return table


# --- geometry ---------------------------------------------------------------------------------------


def _check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    """ITK-order spacing -> numpy-order floats, refusing anything but three positive finite values."""
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise SDMOrganSegError(f"spacing {spacing!r} is not a list of numbers; give (x, y, z) voxel sizes in mm") from None
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise SDMOrganSegError(f"spacing {spacing!r} must be three positive voxel sizes (x, y, z) in mm")
    return values[2], values[1], values[0]


def _bounds(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """First and last index of the True voxels along each axis, or None when there are none."""
    z = np.flatnonzero(mask.any(axis=(1, 2)))
    if z.size == 0:
        return None
    slab = mask[z[0] : z[-1] + 1]  # y and x only need the slices that hold the organ
    y = np.flatnonzero(slab.any(axis=(0, 2)))
    x = np.flatnonzero(slab.any(axis=(0, 1)))
    return np.array([z[0], y[0], x[0]]), np.array([z[-1], y[-1], x[-1]])


def _padded_crop(mask: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """``mask[low:high+1]`` as uint8 with one voxel of background added on every side."""
    out = np.zeros(tuple(high - low + 3), np.uint8)
    out[1:-1, 1:-1, 1:-1] = mask[low[0] : high[0] + 1, low[1] : high[1] + 1, low[2] : high[2] + 1]
    return out


def _block_codes(voxels: np.ndarray) -> np.ndarray:
    """Code of every 2x2x2 block of a 0/1 uint8 array (shape minus one along each axis).

    Bit ``7 - (4 dz + 2 dy + dx)`` holds voxel ``(dz, dy, dx)`` of the block, the ordering of
    surface-distance's neighbourhood kernel; built one axis at a time (three passes, not eight).
    """
    pairs = (voxels[:, :, :-1] << 1) | voxels[:, :, 1:]
    quads = (pairs[:, :-1] << 2) | pairs[:, 1:]
    return (quads[:-1] << 4) | quads[1:]


def _surfels(voxels: np.ndarray, areas: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, ...], np.ndarray]:
    """Surface mask on the corner grid, surfel indices and surfel areas of a padded 0/1 array."""
    codes = _block_codes(voxels)
    # code - 1 wraps 0 to 255, so one comparison drops both all-background (0) and all-foreground (255).
    codes -= np.uint8(1)
    surface = codes < 254
    indices = np.nonzero(surface)
    return surface, indices, np.roll(areas, -1)[codes[indices]]


@functools.lru_cache(maxsize=16)
def _near_offsets(spacing_zyx: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """The shortest corner-grid offsets, (0, 0, 0) first, sorted by length in mm: (K, 3) ints, (K,) mm.

    Taken from the full ball of radius twice the largest spacing, so the list is exactly the K shortest.
    """
    step = np.array(spacing_zyx)
    radius = 2.0 * step.max()
    reach = np.floor(radius / step).astype(int)
    grid = np.stack(np.meshgrid(*(np.arange(-r, r + 1) for r in reach), indexing="ij"), axis=-1).reshape(-1, 3)
    lengths = np.sqrt(((grid * step) ** 2).sum(axis=1))
    order = np.argsort(lengths, kind="stable")[:_NEAR_OFFSETS]
    order = order[lengths[order] <= radius]
    return grid[order], lengths[order]


def _distances_to(
    indices: tuple[np.ndarray, ...], other_surface: np.ndarray, other_indices: tuple[np.ndarray, ...], spacing_zyx: tuple[float, float, float]
) -> np.ndarray:
    """Distance in mm from each surfel at ``indices`` to the nearest surfel of the other surface.

    Most surfels of two similar masks lie on or next to the other surface: trying the shortest grid
    offsets in order of length settles those exactly (the first offset that lands on the other surface
    is the nearest). The rest go to a k-d tree over the other surface's mm coordinates.
    """
    count = indices[0].size
    distances = np.empty(count)
    offsets, lengths = _near_offsets(spacing_zyx)
    reach = np.abs(offsets).max(axis=0)
    padded = np.pad(other_surface, [(int(r), int(r)) for r in reach])
    flat = padded.ravel()
    jumps = offsets @ (np.array(padded.strides) // padded.itemsize)
    open_ = np.arange(count)
    where = np.ravel_multi_index(tuple(i + r for i, r in zip(indices, reach)), padded.shape)
    for jump, length in zip(jumps, lengths):
        if open_.size <= _TREE_BELOW:
            break
        hit = flat[where + jump]
        if hit.any():
            distances[open_[hit]] = length
            miss = ~hit
            open_, where = open_[miss], where[miss]
    if open_.size:
        step = np.array(spacing_zyx)
        tree = cKDTree(np.column_stack(other_indices) * step, balanced_tree=False, compact_nodes=False)
        points = np.column_stack([i[open_] for i in indices]) * step
        distances[open_] = tree.query(points, k=1, workers=_THREADS)[0]
    return distances


def _weighted_percentile(values: np.ndarray, weights: np.ndarray, percent: float) -> float:
    """Smallest value ``t`` with ``sum(weights[values <= t]) >= percent / 100 * sum(weights)``.

    Only the upper tail is sorted: the values above the answer weigh at most ``(1 - percent/100)`` of
    the total, so there are at most that weight divided by the smallest weight of them.
    """
    fraction = percent / 100.0
    total = float(weights.sum())
    target = fraction * total * (1.0 - _TIE_TOLERANCE)
    smallest = float(weights.min())
    tail = int(((1.0 - fraction) + 1e-9) * total / smallest) + 2 if smallest > 0 else values.size
    if tail < values.size:
        cut = np.partition(values, values.size - tail)[values.size - tail]
        keep = values >= cut
        values, weights = values[keep], weights[keep]
        below = total - float(weights.sum())
    else:
        below = 0.0
    order = np.argsort(values)
    reached = np.searchsorted(below + np.cumsum(weights[order]), target, side="left")
    return float(values[order[min(int(reached), values.size - 1)]])


# --- metrics ----------------------------------------------------------------------------------------


def organ_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> OrganMetrics:
    """Dice, HD, HD95 and ASD of two masks (definitions and empty-mask results: module docstring).

    Args:
        pred: predicted mask ``(z, y, x)``; boolean, or numbers where nonzero means foreground.
        ref: reference mask, same shape.
        spacing: voxel size ``(x, y, z)`` in mm (ITK order).

    Returns:
        The metrics; distances in mm.
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.ndim != 3 or pred.shape != ref.shape:
        raise SDMOrganSegError(
            f"masks of shape {pred.shape} and {ref.shape} cannot be compared; both must be 3D arrays of the same shape"
        )
    spacing_zyx = _check_spacing(spacing)
    pred = pred if pred.dtype == bool else pred != 0
    ref = ref if ref.dtype == bool else ref != 0

    pred_bounds, ref_bounds = _bounds(pred), _bounds(ref)
    if pred_bounds is None or ref_bounds is None:
        if pred_bounds is None and ref_bounds is None:
            return OrganMetrics(dice=1.0, hd=0.0, hd95=0.0, asd=0.0)
        return OrganMetrics(dice=0.0, hd=math.inf, hd95=math.inf, asd=math.inf)
    low = np.minimum(pred_bounds[0], ref_bounds[0])
    high = np.maximum(pred_bounds[1], ref_bounds[1])
    pred_voxels = _padded_crop(pred, low, high)
    ref_voxels = _padded_crop(ref, low, high)

    pred_count = int(np.count_nonzero(pred_voxels))
    ref_count = int(np.count_nonzero(ref_voxels))
    overlap = int(np.count_nonzero(pred_voxels & ref_voxels))
    dice = 2.0 * overlap / (pred_count + ref_count)

    areas = _surfel_area_table(spacing_zyx)
    pred_surface, pred_indices, pred_areas = _surfels(pred_voxels, areas)
    ref_surface, ref_indices, ref_areas = _surfels(ref_voxels, areas)
    pred_to_ref = _distances_to(pred_indices, ref_surface, ref_indices, spacing_zyx)
    ref_to_pred = _distances_to(ref_indices, pred_surface, pred_indices, spacing_zyx)

    hd = max(float(pred_to_ref.max()), float(ref_to_pred.max()))
    hd95 = max(
        _weighted_percentile(pred_to_ref, pred_areas, HD_PERCENTILE),
        _weighted_percentile(ref_to_pred, ref_areas, HD_PERCENTILE),
    )
    asd = (float(pred_to_ref @ pred_areas) + float(ref_to_pred @ ref_areas)) / (float(pred_areas.sum()) + float(ref_areas.sum()))
    return OrganMetrics(dice=dice, hd=hd, hd95=hd95, asd=asd)


def _label_boxes(labels: np.ndarray) -> dict[int, tuple[slice, ...]] | None:
    """Bounding box of every positive label value, in one pass; None when find_objects does not apply."""
    if labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        return None
    lowest, highest = int(labels.min()), int(labels.max())
    if lowest < 0 or highest > _MAX_FIND_OBJECTS_LABEL:
        return None
    if highest == 0:
        return {}
    found = ndimage.find_objects(labels if labels.dtype != np.uint64 else labels.astype(np.int64))
    return {value + 1: box for value, box in enumerate(found) if box is not None}


def evaluate_label_maps(
    pred_labels: np.ndarray,
    ref_labels: np.ndarray,
    spacing: Sequence[float],
    organs: Mapping[int, str] | None = None,
    *,
    annotated: Collection[str] | None = None,
) -> dict[str, OrganMetrics]:
    """Metrics of every organ of two label maps.

    Args:
        pred_labels: predicted label map ``(z, y, x)``, integer values, 0 = background.
        ref_labels: reference label map, same shape.
        spacing: voxel size ``(x, y, z)`` in mm (ITK order).
        organs: label value -> organ name. None: every nonzero value present in either map, named by
            the value (``"1"``, ``"2"``...). An organ absent from both maps is reported ``absent``, unscored.
        annotated: names of the organs the reference was contoured for; the others are ``unannotated``,
            unscored. None: every organ was contoured. A name that is not among the organs is refused.

    Returns:
        Organ name -> metrics, in the order of ``organs`` (None: increasing label value).
    """
    pred_labels, ref_labels = np.asarray(pred_labels), np.asarray(ref_labels)
    if pred_labels.shape != ref_labels.shape:
        raise SDMOrganSegError(
            f"prediction shape {pred_labels.shape} differs from reference shape {ref_labels.shape} (z, y, x); "
            "resample the prediction onto the reference grid before evaluating"
        )
    if pred_labels.ndim != 3:
        raise SDMOrganSegError(f"label maps are {pred_labels.ndim}D; give 3D label maps (z, y, x)")
    _check_spacing(spacing)

    pred_boxes, ref_boxes = _label_boxes(pred_labels), _label_boxes(ref_labels)
    if organs is None:
        if pred_boxes is not None and ref_boxes is not None:
            values = sorted(set(pred_boxes) | set(ref_boxes))
        else:
            values = sorted(int(v) for v in np.union1d(np.unique(pred_labels), np.unique(ref_labels)) if v != 0)
        organs = {value: str(value) for value in values}
    if annotated is not None:
        unknown = sorted(set(annotated) - {str(name) for name in organs.values()})
        if unknown:
            raise SDMOrganSegError(
                f"the annotations name {', '.join(map(repr, unknown))}, not among the organs evaluated "
                f"({', '.join(map(str, organs.values()))}); name the organs with --model or --labels"
            )

    results: dict[str, OrganMetrics] = {}
    for key, name in organs.items():
        try:
            value = int(key)
        except (TypeError, ValueError):
            raise SDMOrganSegError(f"organ {name!r} has label {key!r}; label values must be integers") from None
        if name in results:
            raise SDMOrganSegError(f"organ name {name!r} is given to two label values; give every organ its own name")
        if annotated is not None and name not in annotated:
            results[name] = not_scored(UNANNOTATED)
            continue
        region: tuple[slice, ...] = tuple(slice(None) for _ in range(3))
        if pred_boxes is not None and ref_boxes is not None and value > 0:
            # Compare only inside the union of the two boxes: distances and Dice do not change.
            boxes = [b for b in (pred_boxes.get(value), ref_boxes.get(value)) if b is not None]
            if not boxes:
                results[name] = not_scored(ABSENT)
                continue
            region = tuple(slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(3))
        elif not (np.any(pred_labels == value) or np.any(ref_labels == value)):
            results[name] = not_scored(ABSENT)
            continue
        results[name] = organ_metrics(pred_labels[region] == value, ref_labels[region] == value, spacing)
    return results


def evaluate_images(
    pred: sitk.Image, ref: sitk.Image, organs: Mapping[int, str] | None = None, *, annotated: Collection[str] | None = None
) -> dict[str, OrganMetrics]:
    """:func:`evaluate_label_maps` of two SimpleITK label maps on the same grid.

    Size, spacing, origin and direction must agree (within 1e-4, relative to the values' size when that
    exceeds 1); values must be whole numbers >= 0 (float images holding whole numbers are accepted).
    """
    for image, what in ((pred, "prediction"), (ref, "reference")):
        if not isinstance(image, sitk.Image):
            raise SDMOrganSegError(f"the {what} is a {type(image).__name__}, not a SimpleITK image; read it with SimpleITK first")
    mismatch = geometry_mismatch(pred, ref)
    if mismatch is not None:
        raise SDMOrganSegError(
            f"prediction and reference differ in {mismatch}; resample the prediction onto the reference grid before evaluating"
        )
    return evaluate_label_maps(
        label_array(pred, "(prediction)"), label_array(ref, "(reference)"), pred.GetSpacing(), organs, annotated=annotated
    )


def annotated_organs(path: str | Path, case: str) -> list[str]:
    """The organs contoured in ``case`` according to an annotations file, ``{"CASE": ["organ name", ...]}``
    (the format of partially annotated data sets such as OpenKBP's)."""
    path = Path(path)
    document = read_json_object(path, f"the annotations {path}", 'it must be JSON like {"CASE": ["organ", ...]}')
    if not all(isinstance(v, list) and all(isinstance(n, str) for n in v) for v in document.values()):
        raise SDMOrganSegError(f"the annotations {path} must map case names to lists of organ names, like {{\"CASE\": [\"organ\", ...]}}")
    if case not in document:
        raise SDMOrganSegError(f"the annotations {path} have no entry for case {case!r} (the reference's file name); add it or leave out --ignore-unannotated")
    return list(document[case])


# --- output -----------------------------------------------------------------------------------------


#: How the table and the CSV show an organ that was not scored.
_NOT_SCORED_TEXT = {ABSENT: "absent from prediction and reference: not scored", UNANNOTATED: "not annotated in the reference: not scored"}
#: Key of the mean entry in the JSON document and the organ column of the mean row.
MEAN = "mean"


def mean_metrics(results: Mapping[str, OrganMetrics]) -> tuple[OrganMetrics, int]:
    """Metric-wise mean over the scored organs and their number; ``inf`` when any has ``inf``, NaN when none."""
    rows = np.array([[getattr(m, c) for c in _COLUMNS] for m in results.values() if m.scored], dtype=float).reshape(-1, len(_COLUMNS))
    if not len(rows):
        return not_scored(SCORED), 0
    return OrganMetrics(*(float(v) for v in rows.mean(axis=0))), len(rows)


def _refuse_mean_organ(results: Mapping[str, OrganMetrics]) -> None:
    if MEAN in results:
        raise SDMOrganSegError(f"an organ is named {MEAN!r}, the name of the mean row; rename it in the model card or labels file")


def format_metrics_table(results: Mapping[str, OrganMetrics]) -> str:
    """An aligned text table: organ, Dice, HD, HD95, ASD (mm), an organ not scored said so in its row, and a
    ``mean`` row over the scored organs."""
    header = ("Organ", "Dice", "HD (mm)", "HD95 (mm)", "ASD (mm)")
    rows: list[tuple[str, ...]] = [
        (name, f"{m.dice:.4f}", f"{m.hd:.2f}", f"{m.hd95:.2f}", f"{m.asd:.2f}") if m.scored else (name, f"({_NOT_SCORED_TEXT[m.status]})")
        for name, m in results.items()
    ]
    mean, count = mean_metrics(results)
    rows.append(
        (f"{MEAN} of {count} organ{'' if count == 1 else 's'}", f"{mean.dice:.4f}", f"{mean.hd:.2f}", f"{mean.hd95:.2f}", f"{mean.asd:.2f}")
        if count else (MEAN, "(no organ scored)")
    )
    widths = [max(len(row[i]) for row in [header, *rows] if len(row) == len(header)) for i in range(len(header))]
    widths[0] = max(len(row[0]) for row in [header, *rows])

    def line(row: Sequence[str]) -> str:
        if len(row) < len(header):  # an explanation instead of numbers
            return "  ".join([row[0].ljust(widths[0]), *row[1:]])
        return "  ".join([row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])])

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)]) + "\n"


def write_metrics_csv(results: Mapping[str, OrganMetrics], path: str | Path, overwrite: bool = False) -> None:
    """CSV with columns ``organ,dice,hd_mm,hd95_mm,asd_mm,status``, one row per organ, full precision,
    ``inf`` written as ``inf``, empty cells for an organ not scored (status ``absent`` or ``unannotated``),
    then a ``mean`` row over the scored organs (status ``mean of N organs``). Refuses to replace an
    existing file unless ``overwrite``."""
    _refuse_mean_organ(results)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["organ", "dice", "hd_mm", "hd95_mm", "asd_mm", "status"])
    for name, metrics in results.items():
        cells = [repr(float(getattr(metrics, c))) if metrics.scored else "" for c in _COLUMNS]
        writer.writerow([name, *cells, metrics.status])
    mean, count = mean_metrics(results)
    writer.writerow([MEAN, *(repr(float(getattr(mean, c))) if count else "" for c in _COLUMNS), f"mean of {count} organs"])
    write_text_atomic(Path(path), buffer.getvalue(), overwrite=overwrite)


def read_metrics_csv(path: str | Path) -> dict[str, OrganMetrics]:
    """The per-organ metrics of a :func:`write_metrics_csv` file (its mean row left out), values as written."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            return {
                row["organ"]: OrganMetrics(*(float(row[c]) if row[c] else math.nan for c in ("dice", "hd_mm", "hd95_mm", "asd_mm")), row["status"])
                for row in csv.DictReader(handle)
                if row["organ"] != MEAN
            }
    except (OSError, UnicodeDecodeError, KeyError, TypeError, ValueError) as error:
        raise SDMOrganSegError(f"{path} is not a metrics table SDMOrganSeg wrote ({type(error).__name__}: {error})") from None


def write_metrics_json(results: Mapping[str, OrganMetrics], path: str | Path, overwrite: bool = False) -> None:
    """JSON object: organ name -> ``{"dice", "hd", "hd95", "asd"}`` (mm), or ``{"status": "absent"}`` /
    ``{"status": "unannotated"}`` for an organ not scored; and ``"mean"`` -> ``{"dice", "hd", "hd95",
    "asd", "organs": N}`` over the N scored organs (metrics null when N is 0). ``inf`` is written as the
    string ``"inf"`` so the file stays valid JSON. Refuses to replace an existing file unless ``overwrite``."""
    _refuse_mean_organ(results)

    def value(number: float) -> float | str | None:
        return "inf" if math.isinf(number) else None if math.isnan(number) else number

    document: dict[str, dict[str, object]] = {
        name: {c: value(v) for c, v in metrics.to_dict().items()} if metrics.scored else {"status": metrics.status}
        for name, metrics in results.items()
    }
    mean, count = mean_metrics(results)
    document[MEAN] = {**{c: value(v) for c, v in mean.to_dict().items()}, "organs": count}
    write_text_atomic(Path(path), json.dumps(document, indent=2, allow_nan=False) + "\n", overwrite=overwrite)
