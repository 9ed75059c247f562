"""Post-processing of label maps: keep each organ's largest connected component.

Used by ``segment --largest-component`` (off by default, as in nnU-Net and TotalSegmentator): a network can
put a few voxels of an organ far from the organ itself; an organ known to be one piece keeps only its
largest 26-connected component, and the rest becomes background. Only the label map changes: the SDMs and
their contours stay what the network predicted.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

#: 26-connectivity: voxels touching by a face, an edge or a corner belong to one component.
_FULL = ndimage.generate_binary_structure(3, 3)


def keep_largest_component(labels: np.ndarray, label_values: Sequence[int]) -> dict[int, tuple[int, int]]:
    """Set to 0, in place, every voxel of each label value outside that value's largest connected component.

    Returns ``{label value: (voxels removed, components removed)}`` for the values that lost voxels.
    """
    removed: dict[int, tuple[int, int]] = {}
    # One pass for every organ's bounding box; the components are then found inside each box only.
    boxes = ndimage.find_objects(labels) if labels.size and labels.max() > 0 else []
    for value in label_values:
        box = boxes[value - 1] if 0 < value <= len(boxes) else None
        if box is None:
            continue
        region = labels[box]
        mask = region == value
        components, count = ndimage.label(mask, structure=_FULL)
        if count < 2:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        stray = mask & (components != int(np.argmax(sizes)))
        removed[int(value)] = (int(np.count_nonzero(stray)), count - 1)
        region[stray] = 0
    return removed
