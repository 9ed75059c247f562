"""Ground-truth signed distance maps (SDMs) and the smooth Heaviside that turns an SDM back into a mask.

Conventions (used everywhere in SDMOrganSeg):

* Arrays are in numpy order ``(z, y, x)``; ``spacing`` is given in ITK order ``(x, y, z)`` in millimetres,
  as SimpleITK reports it, and is reversed internally.
* A voxel is *inside* the organ when its label equals the organ's label value. Every voxel centre gets the
  Euclidean distance, in mm, to the nearest voxel centre of the other class: inside voxels to the nearest
  outside voxel, outside voxels to the nearest inside voxel. Inside distances are negated. No voxel is 0.
* Zero level: the organ surface is taken to lie between the two classes; with linear interpolation (as
  marching cubes / flying edges do) the 0 iso-surface passes through the midpoints between each inside
  voxel centre and its outside neighbours, so it encloses exactly the inside voxels. ``|sdm|`` at a voxel
  therefore exceeds its distance to that surface by at most half the step to its neighbour.
* Normalisation (paper, "SDM Learning"): inside values are divided by the largest inside distance and
  outside values by the largest outside distance, giving values in [-1, 0) inside and (0, 1] outside.
* Degenerate organs: an organ absent from the image gives +1 everywhere (all outside, as far as can be);
  an organ filling the whole image gives -1 everywhere. Neither produces NaN.

Because no voxel has the value 0, ``heaviside(sdm)`` with k = 1500 gives back the label map exactly
wherever the nearest opposite voxel is closer than about 1/(1500/ln(1e4)) of the normalising maximum,
i.e. always in practice (the paper reports about 99.9 % overlap with Danielsson's approximate SDM).

The distance transform is the ``edt`` package (exact, anisotropic; on one thread, see ``_THREADS``),
picked over ``scipy.ndimage.distance_transform_edt`` (exact, about 10x slower) and SimpleITK's
``SignedMaurerDistanceMap`` by measurement: see ``benchmarks/bench_sdm.py`` and ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np

from ..common.files import worker_threads

#: Steepness of the smooth Heaviside for normalised SDMs (paper, Eq. 3, with its sign corrected).
HEAVISIDE_K = 1500.0

#: Threads of the edt package. Its parallel=2 took 3.2 s where 1 thread takes 1.7 s (512x512x200 organ,
#: 2-core machine, benchmarks/bench_sdm.py): its threads meet once per row pass, and the one-core run
#: wins on the machines measured.
_THREADS = 1
#: Voxels per slab in :func:`sdms_to_label_map` (a few MB of float32, cache-sized).
_LABEL_CHUNK_VOXELS = 1 << 20


def _organ_bounding_box(mask: np.ndarray, margin: int | Sequence[int]) -> tuple[slice, ...] | None:
    """Slices of the smallest box holding every True voxel, grown by ``margin`` (voxels, one for every axis or
    one per axis) and clipped to the array."""
    margins = [margin] * mask.ndim if isinstance(margin, int) else list(margin)
    box = []
    for axis in range(mask.ndim):
        other_axes = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(mask.any(axis=other_axes))
        if present.size == 0:
            return None
        box.append(slice(max(int(present[0]) - margins[axis], 0), min(int(present[-1]) + 1 + margins[axis], mask.shape[axis])))
    return tuple(box)


def _distances(mask: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, tuple[slice, ...], np.ndarray]:
    """Unsigned distances in mm: of every outside voxel to the organ (0 inside), float32 over the whole
    volume, and of every inside voxel to the outside (0 outside) within the organ's box, with that box."""
    import edt  # here, not at module level: model cards are read where edt isn't installed yet

    mask = np.ascontiguousarray(mask, dtype=bool)
    anisotropy = tuple(float(s) for s in reversed(tuple(spacing)))
    # Outside distances need the whole volume; the inside ones only the organ's box plus one voxel
    # of background (any outside voxel beyond the box is farther than its projection onto that layer).
    distance = edt.edt(~mask, anisotropy=anisotropy, black_border=False, parallel=_THREADS).astype(np.float32, copy=False)
    box = _organ_bounding_box(mask, margin=1)
    assert box is not None
    inside = edt.edt(mask[box], anisotropy=anisotropy, black_border=False, parallel=_THREADS).astype(np.float32, copy=False)
    return distance, box, inside


def signed_distance_mm(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Signed Euclidean distance in mm, negative inside ``mask`` (see the module docstring).

    Args:
        mask: boolean array ``(z, y, x)`` with at least one True and one False voxel.
        spacing: voxel size ``(x, y, z)`` in mm.

    Returns:
        float32 array of the mask's shape; never 0.
    """
    mask = np.ascontiguousarray(mask, dtype=bool)
    distance, box, inside = _distances(mask, spacing)
    region = distance[box]
    np.subtract(region, inside, out=region, where=mask[box])
    return distance


def normalized_sdm(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """The paper's normalised SDM of one organ: [-1, 0) inside, (0, 1] outside, float32 ``(z, y, x)``.

    Absent organ: +1 everywhere; organ filling the image: -1 everywhere.
    """
    mask = np.ascontiguousarray(mask, dtype=bool)
    if not mask.any():
        return np.ones(mask.shape, np.float32)
    if mask.all():
        return np.full(mask.shape, -1.0, np.float32)
    distance, box, inside = _distances(mask, spacing)
    # The same float32 divisions as normalising the signed map (x / -m == -x / m exactly), without its
    # extra passes over the volume: the maxima come from the two distance maps, the inside is only the box.
    largest_outside = float(distance.max())
    largest_inside = float(inside.max())
    np.divide(distance, largest_outside, out=distance)
    np.divide(inside, -largest_inside, out=distance[box], where=mask[box])
    return distance


#: Ground-truth SDM normalisations (training option ``--sdm-normalization``):
#:
#: * ``paper``: the paper's, per side by the largest distance (:func:`normalized_sdm`). Asymmetric next to
#:   the surface: the outside values there are tiny (1 mm / the largest outside distance), the inside ones
#:   large (1 mm / the organ's half-thickness).
#: * ``clip``: the signed distance in mm divided by ``scale_mm`` and clipped to [-1, 1]: the same slope on
#:   both sides of the surface, in every case (:func:`scaled_sdm`).
#: * ``tanh``: ``tanh(distance / scale_mm)``: the same near the surface, smooth instead of clipped far away.
SDM_NORMALIZATIONS = ("paper", "clip", "tanh")
#: The normalisations that are a function of the distance in mm alone (``scale_mm``), the same on both sides.
SCALED_NORMALIZATIONS = ("clip", "tanh")


def level_distance_mm(level: float, normalization: str, scale_mm: float) -> float | None:
    """The signed distance in mm from the surface at which a symmetric normalised SDM equals ``level``
    (``clip``: ``level * scale_mm``; ``tanh``: ``scale_mm * atanh(level)``), or None for the paper's
    normalisation, whose levels are fractions of each organ's own largest distance."""
    if normalization == "clip":
        return float(level) * scale_mm
    if normalization == "tanh":
        return float(scale_mm * np.arctanh(np.clip(level, -0.999999, 0.999999)))
    return None


def scaled_sdm(mask: np.ndarray, spacing: Sequence[float], scale_mm: float, method: str = "clip") -> np.ndarray:
    """Symmetric normalised SDM: ``clip(d / scale_mm, -1, 1)`` or ``tanh(d / scale_mm)``, float32 ``(z, y, x)``.

    ``d`` is :func:`signed_distance_mm` (negative inside). Absent organ: +1 everywhere; organ filling the
    image: -1 everywhere, as for :func:`normalized_sdm`.
    """
    if method not in SCALED_NORMALIZATIONS:
        raise ValueError(f"unknown symmetric SDM normalisation {method!r}; use 'clip' or 'tanh'")
    if not scale_mm > 0:
        raise ValueError(f"the SDM scale must be a positive distance in mm, got {scale_mm}")
    mask = np.ascontiguousarray(mask, dtype=bool)
    if not mask.any():
        return np.ones(mask.shape, np.float32)
    if mask.all():
        return np.full(mask.shape, -1.0, np.float32)
    sdm = signed_distance_mm(mask, spacing)
    sdm *= np.float32(1.0 / scale_mm)
    if method == "clip":
        np.clip(sdm, -1.0, 1.0, out=sdm)
    else:
        np.tanh(sdm, out=sdm)
    return sdm


def label_map_to_sdms(
    labels: np.ndarray, label_values: Sequence[int], spacing: Sequence[float], normalization: str = "paper", scale_mm: float = 5.0
) -> np.ndarray:
    """Normalised SDMs of several organs, one channel each: float32 ``(organs, z, y, x)``.

    ``normalization`` is one of :data:`SDM_NORMALIZATIONS`; ``scale_mm`` applies to ``clip`` and ``tanh``.
    """
    if normalization not in SDM_NORMALIZATIONS:
        raise ValueError(f"unknown SDM normalisation {normalization!r}; choose one of {', '.join(SDM_NORMALIZATIONS)}")
    out = np.empty((len(label_values),) + labels.shape, np.float32)
    for channel, value in enumerate(label_values):
        mask = labels == value
        out[channel] = normalized_sdm(mask, spacing) if normalization == "paper" else scaled_sdm(mask, spacing, scale_mm, normalization)
    return out


def heaviside(sdm: np.ndarray, k: float = HEAVISIDE_K) -> np.ndarray:
    """Smooth Heaviside of an SDM: ``1 / (1 + exp(k * sdm))``, near 1 inside (sdm < 0), near 0 outside.

    This is the working form of the paper's Eq. 3 (printed there with the sign and k inverted).
    """
    from scipy.special import expit

    return expit(-k * np.asarray(sdm, dtype=np.float32))


def sdms_to_label_map(sdms: np.ndarray, label_values: Sequence[int]) -> np.ndarray:
    """Label map from per-organ SDMs ``(organs, z, y, x)`` (an array, or a sequence of ``(z, y, x)`` arrays).

    A voxel belongs to an organ where that organ's SDM is negative; where several are negative the one
    with the most negative value (the voxel deepest inside it, relative to its size) wins, the first organ
    on a tie. Background is 0, and so is any voxel where an SDM is NaN.
    """
    if len(label_values) != len(sdms):
        raise ValueError(f"{len(sdms)} SDM channels but {len(label_values)} label values")
    if not len(sdms):
        raise ValueError("no SDM channels")
    dtype = np.uint8 if max(label_values, default=0) < 256 else np.uint16
    lookup = np.asarray(list(label_values), dtype=dtype)
    shape = np.shape(sdms[0])
    values_dtype = np.result_type(*(np.asarray(channel).dtype for channel in sdms))
    labels = np.empty(shape, dtype)
    # A running minimum over the organs, slab by slab so that it stays in the cache: the same result as
    # argmin over the organ axis (first minimum wins; NaN propagates through np.minimum, and NaN < 0 is
    # False, so such voxels end as background), without its int64 index array and in a third of the time.
    # The slabs are independent and numpy releases the GIL on them: they run on a few threads.
    step = max(1, _LABEL_CHUNK_VOXELS // max(int(np.prod(shape[1:], dtype=np.int64)), 1))

    def slab(start: int) -> None:
        part = slice(start, start + step)
        best = np.array(sdms[0][part], dtype=values_dtype, copy=True)
        out = labels[part]
        out.fill(lookup[0])
        lower = np.empty(out.shape, bool)
        change = np.empty_like(out)
        for channel in range(1, len(sdms)):
            values = sdms[channel][part]
            np.less(values, best, out=lower)
            # out = lower ? label : out, as out + lower * (label - out) in the labels' unsigned (wrapping)
            # arithmetic: no branches, 3-6x faster than a masked copy (benchmarks/bench_sdm.py).
            np.subtract(lookup[channel], out, out=change)
            change *= lower
            out += change
            np.minimum(best, values, out=best)
        np.less(best, 0, out=lower)
        out *= lower

    starts = range(0, shape[0], step)
    threads = worker_threads()
    if len(starts) > 1 and threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(slab, starts))
    else:
        for start in starts:
            slab(start)
    return labels
