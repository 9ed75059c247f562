"""Segmenting a volume with a model: preprocessing, network (whole volume or sliding window), and the
mapping of the predicted SDMs back onto the input grid.

The API is what the Slicer panel and the batch script use: :func:`segment_image` takes a progress
callback ``progress(fraction, message)`` and a cancel check (a ``threading.Event`` or any callable that
returns True to stop), and returns a :class:`SegmentationResult` whose images share the input's
geometry exactly.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from .errors import CancelledError, SDMOrganSegError
from .imageio import check_volume, image_from_array
from .modelfiles import LoadedModel, Organ
from .preprocessing import needs_resampling, normalize_intensity, resample_like, resample_to_spacing
from .sdm import sdms_to_label_map

ProgressCallback = Callable[[float, str], None]
CancelCheck = Callable[[], bool] | threading.Event


@dataclass
class SegmentationResult:
    """Outputs of one run, all on the input image's grid.

    ``sdms`` maps organ name to a float32 image of the predicted normalised SDM (negative inside);
    ``labels`` is the label map with the card's label values (0 background).
    """

    labels: sitk.Image
    sdms: dict[str, sitk.Image]
    organs: list[Organ]
    device: str
    model_name: str
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def organ_volumes_ml(self) -> dict[str, float]:
        voxel_ml = float(np.prod(self.labels.GetSpacing())) / 1000.0
        array = sitk.GetArrayViewFromImage(self.labels)
        counts = np.bincount(array.reshape(-1), minlength=max(o.label for o in self.organs) + 1)
        return {organ.name: float(counts[organ.label]) * voxel_ml for organ in self.organs}


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; asking for ``cuda`` without one is an error."""
    if device in ("auto", "", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") or device == "gpu":
        if not torch.cuda.is_available():
            raise SDMOrganSegError("--device cuda was asked for but no CUDA GPU is available to PyTorch; use --device cpu or auto")
        return torch.device("cuda" if device == "gpu" else device)
    if device == "cpu":
        return torch.device("cpu")
    raise SDMOrganSegError(f"unknown device {device!r}; use auto, cpu or cuda")


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def _should_stop(cancel: CancelCheck | None) -> bool:
    if cancel is None:
        return False
    return cancel.is_set() if isinstance(cancel, threading.Event) else bool(cancel())


def _tile_starts(size: int, window: int, step: int) -> list[int]:
    """Start indices of windows covering ``[0, size)``; the last is shifted back so every tile is full."""
    if size <= window:
        return [0]
    starts = list(range(0, size - window, step)) + [size - window]
    return sorted(set(starts))


def gaussian_weights(window: Sequence[int], sigma_fraction: float = 0.125) -> np.ndarray:
    """Blending weights peaking at the window centre (sigma = 1/8 of the window, as nnU-Net and MONAI)."""
    axes = []
    for size in window:
        coordinates = np.arange(size, dtype=np.float32) - (size - 1) / 2
        axes.append(np.exp(-0.5 * (coordinates / max(size * sigma_fraction, 1e-3)) ** 2))
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    weights /= weights.max()
    return np.maximum(weights, 1e-3).astype(np.float32)  # never 0, so every voxel gets a defined blend


def tiles(shape: Sequence[int], window: Sequence[int], overlap: float) -> list[tuple[slice, ...]]:
    """Windows (as slice tuples) covering ``shape`` with the given fractional overlap."""
    per_axis = []
    for size, win in zip(shape, window):
        win = min(win, size)
        step = max(1, int(round(win * (1 - overlap))))
        per_axis.append([slice(s, s + win) for s in _tile_starts(size, win, step)])
    return [tuple(t) for t in itertools.product(*per_axis)]


@contextlib.contextmanager
def _autocast(device: torch.device) -> Iterator[None]:
    # float16 on the GPU halves memory traffic; the CPU stays in float32 (bf16 autocast is slower there).
    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.float16):
            yield
    else:
        yield


def predict_array(
    network: torch.nn.Module,
    volume: np.ndarray,
    device: torch.device,
    window: Sequence[int] | None = None,
    overlap: float = 0.25,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
) -> np.ndarray:
    """Network output ``(organs, z, y, x)`` float32 for a normalised volume ``(z, y, x)``.

    With ``window`` (``(z, y, x)`` voxels) smaller than the volume, tiles are predicted one at a time and
    blended with Gaussian weights straight into the output, so memory grows with the volume (one float32
    per organ and voxel, plus one for the weights), not with the number of tiles.
    """
    network = network.to(device)
    organs = network.config.out_channels if hasattr(network, "config") else None
    shape = volume.shape
    if window is None or all(w >= s for w, s in zip(window, shape)):
        windows = [tuple(slice(0, s) for s in shape)]
    else:
        windows = tiles(shape, window, overlap)
    single = len(windows) == 1
    output = None if single else np.zeros((organs,) + tuple(shape), np.float32)
    weight_sum = None if single else np.zeros(shape, np.float32)
    weights = None
    with torch.inference_mode(), _autocast(device):
        for index, region in enumerate(windows):
            if _should_stop(cancel):
                raise CancelledError()
            tile = torch.from_numpy(np.ascontiguousarray(volume[region]))[None, None].to(device, non_blocking=True)
            prediction = network(tile)[0].float().cpu().numpy()
            if single:
                output = prediction
            else:
                if weights is None or weights.shape != prediction.shape[1:]:
                    weights = gaussian_weights(prediction.shape[1:])
                output[(slice(None),) + region] += prediction * weights
                weight_sum[region] += weights
            if progress:
                progress((index + 1) / len(windows), f"network: tile {index + 1} of {len(windows)}")
    if not single:
        output /= weight_sum
    return output


def _window_zyx(window_xyz: Sequence[int] | None) -> tuple[int, int, int] | None:
    return tuple(int(w) for w in reversed(tuple(window_xyz))) if window_xyz else None


def segment_image(
    image: sitk.Image,
    model: LoadedModel,
    device: str = "auto",
    window: Sequence[int] | None = None,
    overlap: float = 0.25,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
) -> SegmentationResult:
    """Segment ``image`` with ``model``.

    Args:
        image: scalar 3D SimpleITK image, any orientation (oblique included) and spacing.
        model: from :func:`SDMOrganSegLib.modelfiles.load_model`.
        device: ``auto``, ``cpu`` or ``cuda``. On CUDA out-of-memory the run retries with half the window,
            then on the CPU, and says so in ``result.notes``.
        window: sliding-window size ``(x, y, z)`` voxels at the model's spacing; default the card's, and the
            whole volume when the card has none.
        progress: called with (fraction in [0, 1], message).
        cancel: stops the run with :class:`CancelledError` at the next tile.

    Returns:
        a :class:`SegmentationResult` on the input's exact grid.
    """
    check_volume(image)
    card = model.card
    timings: dict[str, float] = {}
    notes: list[str] = []
    report = progress or (lambda fraction, message: None)
    started = time.perf_counter()

    report(0.0, "preparing the volume")
    working = sitk.Cast(image, sitk.sitkFloat32)
    resampled = needs_resampling(working, card.spacing)
    if resampled:
        working = resample_to_spacing(working, card.spacing)
    volume = normalize_intensity(sitk.GetArrayViewFromImage(working), card.intensity)
    timings["preprocess_s"] = time.perf_counter() - started
    if _should_stop(cancel):
        raise CancelledError()

    chosen = resolve_device(device)
    window_zyx = _window_zyx(window or card.window)
    tick = time.perf_counter()

    def network_progress(fraction: float, message: str) -> None:
        report(0.05 + 0.85 * fraction, message)

    while True:
        try:
            output = predict_array(model.network, volume, chosen, window_zyx, overlap, network_progress, cancel)
            break
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            current = window_zyx or volume.shape
            if min(current) > 32:
                window_zyx = tuple(max(32, int(math.ceil(w / 2))) for w in current)
                notes.append(f"GPU out of memory: retrying with a {window_zyx[::-1]} window")
            else:
                chosen = torch.device("cpu")
                notes.append("GPU out of memory even with a small window: continuing on the CPU")
            report(0.05, notes[-1])
    model.network.to("cpu")
    timings["network_s"] = time.perf_counter() - tick

    tick = time.perf_counter()
    report(0.9, "mapping the SDMs back to the input grid")
    sdm_images: dict[str, sitk.Image] = {}
    sdm_arrays = []
    for organ, channel in zip(card.organs, output):
        if _should_stop(cancel):
            raise CancelledError()
        sdm = image_from_array(channel, working)
        if resampled:
            # Outside the model grid's extent the organ is absent: +1, the farthest outside value.
            sdm = resample_like(sdm, image, sitk.sitkLinear, default=1.0)
        sdm_images[organ.name] = sdm
        sdm_arrays.append(sitk.GetArrayViewFromImage(sdm))
    labels = image_from_array(sdms_to_label_map(np.stack(sdm_arrays), card.label_values), image)
    timings["postprocess_s"] = time.perf_counter() - tick
    timings["total_s"] = time.perf_counter() - started
    report(1.0, "done")
    return SegmentationResult(
        labels=labels, sdms=sdm_images, organs=list(card.organs), device=device_description(chosen),
        model_name=card.name, timings=timings, notes=notes,
    )
