"""Segmenting a volume with a model: preprocessing, network (whole volume or sliding window), and the
mapping of the predicted SDMs back onto the input grid.

The API is what the Slicer panel and the batch script use: :func:`segment_image` takes a progress
callback ``progress(fraction, message)`` and a cancel check (a ``threading.Event`` or any callable that
returns True to stop), and returns a :class:`SegmentationResult` whose images share the input's
geometry exactly.

The network itself is a :class:`.runner.NetworkRunner`, a call from a batch of tiles to their outputs, on PyTorch
(:class:`TorchNetwork`) or on ONNX Runtime (:class:`SDMOrganSegLib.engines.onnxmodel.OnnxNetwork`); everything around
it (resampling, intensity, sliding window, test-time augmentation, labels, post-processing, checks) is the
same code for both. Importing this module does not import PyTorch.

Long on purpose (about 620 lines): the sliding window, its memory plan, the retries after running out of
memory and test-time augmentation are one pipeline around the network call; the network's runtimes and
the device are in :mod:`.runner` and :mod:`.onnxmodel`.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import SimpleITK as sitk

from . import distributed
from .runner import NetworkRunner, device_description, resolve_device
from ..common.errors import CancelCheck, InputMismatchError, ProgressCallback, SDMOrganSegError, check_cancel
from ..common.files import available_memory_bytes, worker_threads
from ..images.imageio import check_volume, image_from_array
from ..method.architecture import split_heads
from ..formats.modelfiles import LoadedModel, ModelCard, Organ
from ..method.plausibility import input_warnings, modality_mismatch, volume_warnings
from ..method.postprocessing import keep_largest_component
from ..method.preprocessing import needs_resampling, normalize_intensity, resample_like, resample_to_spacing, resampled_size
from ..method.sdm import sdms_to_label_map

if TYPE_CHECKING:  # imported where a PyTorch network runs, not for ONNX Runtime
    import torch


@dataclass
class SegmentationResult:
    """Outputs of one run, all on the input image's grid.

    ``sdms`` maps organ name to a float32 image of the predicted normalised SDM (negative inside);
    ``labels`` is the label map with the card's label values (0 background); ``settings`` the options the
    run used that change its result (test-time augmentation, largest component), for ``summary.json``.
    """

    labels: sitk.Image
    sdms: dict[str, sitk.Image]
    organs: list[Organ]
    device: str
    model_name: str
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    runtime: str = "torch"  #: "torch" or "onnxruntime"
    provider: str = ""  #: PyTorch's device type, or ONNX Runtime's execution provider
    #: The card's SDM normalisation, ``{"normalization": ..., "scale_mm": ...}``, where the SDMs are the
    #: model's distances (empty for a Dice-only model's logits): what an iso-contour level means in mm.
    sdm_normalization: dict[str, Any] = field(default_factory=dict)
    #: The SDMs on the model's grid, where the run resampled the image to a coarser one (empty otherwise):
    #: the input grid's SDMs are linear interpolations of these, with no finer detail, and their surfaces
    #: have as many more triangles as the grid has voxels (about 20x for a 0.8 mm CT and a 3.9 mm model),
    #: which every slice step of Slicer's views cuts again. The contours are made from them.
    model_grid_sdms: dict[str, sitk.Image] = field(default_factory=dict)

    def contour_sdm(self, organ: str) -> sitk.Image:
        """The SDM image to contour for ``organ``: on the model's grid where it is coarser, else the output's."""
        return self.model_grid_sdms[organ] if organ in self.model_grid_sdms else self.sdms[organ]

    def organ_volumes_ml(self) -> dict[str, float]:
        voxel_ml = float(np.prod(self.labels.GetSpacing())) / 1000.0
        array = sitk.GetArrayViewFromImage(self.labels)
        counts = np.bincount(array.reshape(-1), minlength=max(o.label for o in self.organs) + 1)
        return {organ.name: float(counts[organ.label]) * voxel_ml for organ in self.organs}


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
    import torch

    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.float16):
            yield
    else:
        yield


#: One tile per network call. Two tiles per call send the small deep-level convolutions of the UNet to
#: oneDNN instead of PyTorch's generic kernel, which paid 1.4-1.8x on a loaded machine but nothing on an
#: idle one, for 0.45 GB more memory (cpu preset, 128^3 window). See benchmarks/RESULTS.md.
#:
#: On the CPU every 3D convolution is sent to oneDNN. PyTorch sends a batch-1 convolution to its generic
#: im2col kernel when channels x depth x height <= 20480 (its heuristic for small 2D images): the UNet's
#: first convolution (1 channel at 128^3: 99 ms) and its deep levels (16^3 and 8^3), 4-5x slower there
#: than in oneDNN. The 1x1x1 head is a plain matrix product (96 ms -> ~10 ms at 128^3, 9 organs). The
#: same float32 arithmetic (max difference 1e-6 to PyTorch's choice); 1.07-1.15x per window. The
#: channels-last layout is not used: PyTorch's channels-last group norm on the CPU sums each group in one
#: sequential float32 pass and loses most digits where activations are nearly constant (CT air), errors up
#: to 0.1 in the SDM (``test_prediction_keeps_float32_accuracy_on_flat_regions``).
ONEDNN_ON_CPU = True


def _onednn_forward(conv: torch.nn.Conv3d) -> Callable[[torch.Tensor], torch.Tensor]:
    import torch

    weight, bias = conv.weight, conv.bias
    if weight.shape[2:] == (1, 1, 1) and conv.stride == (1, 1, 1) and conv.groups == 1:
        matrix = weight.reshape(weight.shape[:2])

        def pointwise(x: torch.Tensor) -> torch.Tensor:
            n, channels = x.shape[:2]
            if n != 1 or not x.is_contiguous():
                y = torch.matmul(matrix, x.reshape(n, channels, -1))
                if bias is not None:
                    y += bias.view(1, -1, 1)
            elif bias is not None:  # one GEMM writing straight into the output (matmul would copy it)
                y = torch.addmm(bias[:, None], matrix, x.view(channels, -1))
            else:
                y = torch.mm(matrix, x.view(channels, -1))
            return y.view((n, weight.shape[0]) + x.shape[2:])

        return pointwise

    def convolution(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, conv.padding, conv.stride, conv.dilation, conv.groups)

    return convolution


@contextlib.contextmanager
def _cpu_convolutions(network: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """For the duration of a CPU run, the network's float32 zero-padded 3D convolutions go to oneDNN;
    the network is given back as it was."""
    import torch

    usable = device.type == "cpu" and ONEDNN_ON_CPU and torch.backends.mkldnn.is_available() and isinstance(network, torch.nn.Module)
    convolutions = [
        m for m in (network.modules() if usable else ())
        if isinstance(m, torch.nn.Conv3d) and m.padding_mode == "zeros" and not isinstance(m.padding, str)
        and m.weight.dtype == torch.float32 and "forward" not in vars(m)
    ]
    try:
        for conv in convolutions:
            conv.forward = _onednn_forward(conv)
        yield
    finally:
        for conv in convolutions:
            vars(conv).pop("forward", None)


class TorchNetwork(NetworkRunner):
    """:class:`NetworkRunner` of a PyTorch network on ``device``: under inference mode, float16 autocast on
    GPUs, and on the CPU with its convolutions sent to oneDNN (:data:`ONEDNN_ON_CPU`)."""

    runtime = "torch"

    def __init__(self, network: torch.nn.Module, device: torch.device) -> None:
        self.network = network
        self.device = device
        self.config = getattr(network, "config", None)
        self.provider = device.type
        self.device_type = device.type
        self.description = device_description(device)

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        import torch

        self.network.to(self.device)
        with torch.inference_mode(), _autocast(self.device), _cpu_convolutions(self.network, self.device):
            yield

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import torch

        tile = torch.from_numpy(batch).to(self.device, non_blocking=True)
        return self.network(tile).float().cpu().numpy()

    def release_memory(self) -> None:
        import torch

        if self.device.type == "cuda":
            self.network.to("cpu")
            torch.cuda.empty_cache()

    def on_cpu(self) -> "TorchNetwork":
        import torch

        return TorchNetwork(self.network, torch.device("cpu"))


def predict_array(
    network: NetworkRunner | torch.nn.Module,
    volume: np.ndarray,
    device: torch.device | None = None,
    window: Sequence[int] | None = None,
    overlap: float = 0.25,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
    mirror_axes: Sequence[int] = (),
) -> np.ndarray:
    """Network output ``(channels, z, y, x)`` float32 for a normalised volume ``(z, y, x)``.

    ``network`` is a :class:`NetworkRunner`, or a PyTorch network run on ``device`` (:class:`TorchNetwork`).
    The channels are the network's outputs (one per organ, or more, e.g. a ``dual`` model's SDMs and logits).

    With ``window`` (``(z, y, x)`` voxels) smaller than the volume, tiles are predicted one at a time and
    blended with Gaussian weights straight into the output, so memory grows with the volume (one float32
    per channel and voxel, plus one for the weights), not with the number of tiles.

    ``mirror_axes`` (volume axes, 0 = z, 1 = y, 2 = x) turns on mirroring test-time augmentation: each
    tile is also predicted mirrored along every non-empty subset of these axes, mirrored back, and the
    outputs averaged (2, 4 or 8 network calls per tile).
    """
    if not isinstance(network, NetworkRunner):
        network = TorchNetwork(network, device)
    if network.runtime == "torch":
        # Blended in place on PyTorch's threads (numpy's are one): the same IEEE float32 products, sums and
        # division as numpy's, so both runtimes blend identically.
        import torch

        as_blendable = torch.from_numpy
    else:
        as_blendable = np.asarray
    shape = volume.shape
    if window is None or all(w >= s for w, s in zip(window, shape)):
        windows = [tuple(slice(0, s) for s in shape)]
    else:
        windows = tiles(shape, window, overlap)
    single = len(windows) == 1
    output = output_sum = weight_sum = weights = None
    with network.session():
        for index, region in enumerate(windows):
            check_cancel(cancel)
            prediction = _mirrored_prediction(network, volume[region], mirror_axes)
            if single:
                output = prediction
            else:
                if output is None:  # the channels are the network's, known from its first output
                    output = np.zeros(prediction.shape[:1] + tuple(shape), np.float32)
                    weight_sum = np.zeros(shape, np.float32)
                    output_sum, weight_total = as_blendable(output), as_blendable(weight_sum)
                if weights is None or weights.shape != prediction.shape[1:]:
                    weights = as_blendable(gaussian_weights(prediction.shape[1:]))
                # In place on the network's output and on views of the sums: no temporary of channels x window.
                prediction = as_blendable(prediction)
                prediction *= weights
                blended = output_sum[(slice(None),) + region]
                blended += prediction
                covered = weight_total[region]
                covered += weights
            if progress:
                progress((index + 1) / len(windows), f"network: tile {index + 1} of {len(windows)}")
        if not single:
            output_sum /= weight_total
    return output


def mirror_subsets(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of ``axes`` (the empty one first): the flips of mirroring test-time augmentation."""
    axes = sorted(set(int(a) for a in axes))
    return [combo for count in range(len(axes) + 1) for combo in itertools.combinations(axes, count)]


def _mirrored_prediction(network: NetworkRunner, tile: np.ndarray, mirror_axes: Sequence[int]) -> np.ndarray:
    """The network's output ``(channels, z, y, x)`` for ``tile`` ``(z, y, x)``, float32 and contiguous,
    averaged over the mirrorings of ``mirror_axes``."""
    subsets = mirror_subsets(mirror_axes)
    total = None
    for flip in subsets:
        flipped = np.flip(tile, flip) if flip else tile
        output = network(np.ascontiguousarray(flipped, dtype=np.float32)[None, None])[0]
        if flip:
            output = np.flip(output, [axis + 1 for axis in flip])  # (channel, z, y, x)
        if total is None:
            total = np.ascontiguousarray(output, dtype=np.float32)
        else:
            total += output
    if len(subsets) > 1:
        total /= np.float32(len(subsets))
    return total


def tta_axes(card: ModelCard) -> tuple[int, ...]:
    """Volume axes (0 = z, 1 = y, 2 = x) that test-time augmentation mirrors: those the model saw mirrored in
    training. ``train`` flips patches left-right (the x axis) unless ``--no-flip``, which the card records as
    ``training.config.flip``; a card without it (trained elsewhere) is taken to have flipped."""
    config = card.training.get("config") or {}
    return (2,) if config.get("flip", True) else ()


def minimum_window(network: torch.nn.Module) -> int:
    """The smallest useful window side: the network pads its input to a multiple of this (``2 ** depth``),
    so a smaller window is padded up to it anyway."""
    return _size_multiple(network)


def _window_zyx(window_xyz: Sequence[int] | None) -> tuple[int, int, int] | None:
    return tuple(int(w) for w in reversed(tuple(window_xyz))) if window_xyz else None


#: Peak float32 activations per voxel of the network input, per channel of its first level: measured on
#: the CPU at 11x (``cpu`` preset) to 21x (``paper`` preset) ``base_channels``; 22 keeps the estimate above both.
ACTIVATION_FACTOR = 22
#: What the first run in a process allocates once, whatever the volume (oneDNN kernels, thread pools, the
#: pages of the libraries it touches): measured 0.15-0.31 GB (test_memory_estimate_covers_what_segment_image_uses).
FIRST_RUN_BYTES = 0.35e9
#: Environment variable overriding the memory budget, in GB (10^9 bytes).
MEMORY_ENV = "SDMORGANSEG_MEMORY_GB"
#: Share of the available RAM used as the default budget.
MEMORY_SHARE = 0.8
_SMALLEST_WINDOW = 32
_FIRST_TILE = 128


def memory_budget_bytes(memory_gb: float | None = None) -> float | None:
    """The budget :func:`segment_image` plans for: ``memory_gb``, else ``$SDMORGANSEG_MEMORY_GB``, else 80 %
    of the available RAM; None when none of them is known. Under torchrun the budget is per process: a
    given one applies to each, the default is 80 % of the available RAM over the processes of this machine."""
    if memory_gb is None:
        text = os.environ.get(MEMORY_ENV, "").strip()
        if text:
            try:
                memory_gb = float(text)
            except ValueError:
                raise SDMOrganSegError(f"{MEMORY_ENV}={text!r} is not a number; set it to the memory budget in GB, e.g. 8") from None
    if memory_gb is not None:
        if not 0 < memory_gb < float("inf"):
            raise SDMOrganSegError(f"the memory budget must be a positive number of GB, not {memory_gb}")
        return float(memory_gb) * 1e9
    available = available_memory_bytes()
    return MEMORY_SHARE * available / distributed.processes_on_this_machine() if available else None


def _padded(shape: Sequence[int], multiple: int) -> int:
    return int(np.prod([int(math.ceil(s / multiple)) * multiple for s in shape], dtype=np.float64))


def estimate_memory_bytes(
    input_size: Sequence[int], model_shape: Sequence[int], organs: int, base_channels: int,
    window: Sequence[int] | None = None, multiple: int = 1,
) -> float:
    """Peak memory of :func:`segment_image`, in bytes, roughly ``voxels x (organs + activations) x 4``.

    ``input_size``: the image's voxels per axis; ``model_shape``: the volume at the model's spacing
    (``z, y, x``); ``window``: sliding-window size (``z, y, x``), None for the whole volume at once;
    ``multiple``: the network pads its input to a multiple of this. Counted in float32 values: the input
    copies, the network output and blending weights, the activations of one network call (the whole volume
    or one window, ``ACTIVATION_FACTOR x base_channels`` per voxel), and the SDMs and label map mapped back
    onto the input grid; plus :data:`FIRST_RUN_BYTES`.
    """
    input_voxels = float(np.prod(input_size, dtype=np.float64))
    model_voxels = float(np.prod(model_shape, dtype=np.float64))
    activations = ACTIVATION_FACTOR * base_channels
    fixed = 4 * input_voxels + 8 * model_voxels
    whole = window is None or all(w >= s for w, s in zip(window, model_shape))
    if whole:
        network = fixed + 4 * model_voxels * organs + 4 * _padded(model_shape, multiple) * (organs + activations)
    else:
        tile = [min(w, s) for w, s in zip(window, model_shape)]
        network = fixed + 4 * model_voxels * (organs + 1) + 4 * _padded(tile, multiple) * (organs + 1 + activations)
    # Mapping back: the network output, a model-grid copy per resampling thread, the SDMs on the input
    # grid (one float32 per organ and voxel; they are not stacked) and the label map with its image copy
    # (2 bytes per input voxel). Measured on the CT benchmark (9 organs, 512x512x200 resampled from
    # 410x410x200, a first run): 3.63 GB above the process's baseline for an estimate of 4.3 GB
    # (benchmarks/bench_segment.py).
    mapping_back = fixed + 4 * model_voxels * (organs + worker_threads()) + input_voxels * (4 * organs + 2)
    return FIRST_RUN_BYTES + max(network, mapping_back)


def _size_multiple(network: torch.nn.Module) -> int:
    """What the network pads its input to: ``2 ** config.depth`` (``UNet3D.size_multiple``); 1 without a config."""
    return int(2 ** getattr(getattr(network, "config", None), "depth", 0))


def _gb(count: float) -> str:
    return f"{count / 1e9:.3g} GB"


def _smallest_window(shape: Sequence[int], multiple: int) -> tuple[int, ...]:
    return tuple(min(s, max(_SMALLEST_WINDOW, multiple)) for s in shape)


def _plan_window(
    image: sitk.Image, model_shape: Sequence[int], card_organs: int, network: torch.nn.Module,
    window: tuple[int, ...] | None, budget: float | None, notes: list[str],
) -> tuple[int, ...] | None:
    """The window to run with: ``window`` if the run fits ``budget``, else the largest halving of it
    (or of 128 voxels a side) that fits; refuses with the memory needed when even the smallest does not."""
    base = int(getattr(getattr(network, "config", None), "base_channels", 32))
    multiple = _size_multiple(network)
    size = image.GetSize()

    def need(candidate: tuple[int, ...] | None) -> float:
        return estimate_memory_bytes(size, model_shape, card_organs, base, candidate, multiple)

    if budget is None or need(window) <= budget:
        return window
    smallest = _smallest_window(model_shape, multiple)
    start = window or tuple(min(s, _FIRST_TILE) for s in model_shape)
    candidate = tuple(max(m, min(w, s)) for w, s, m in zip(start, model_shape, smallest))
    while need(candidate) > budget:
        if candidate == smallest:
            tiled = "" if all(c >= s for c, s in zip(candidate, model_shape)) else f" even in {'x'.join(map(str, candidate[::-1]))}-voxel tiles"
            raise SDMOrganSegError(
                f"segmenting this {'x'.join(map(str, size))} image needs about {_gb(need(candidate))}{tiled}, more than the "
                f"memory budget of {_gb(budget)}; free memory, raise the budget ({MEMORY_ENV} or --memory-gb) or crop the image"
            )
        candidate = tuple(max(m, int(math.ceil(c / 2))) for c, m in zip(candidate, smallest))
    notes.append(
        f"the whole volume would need about {_gb(need(window))}, more than the memory budget of {_gb(budget)}: "
        f"processed in {'x'.join(map(str, candidate[::-1]))}-voxel tiles (about {_gb(need(candidate))})"
    )
    return candidate


def _is_out_of_memory(error: BaseException) -> bool:
    torch = sys.modules.get("torch")  # a PyTorch error only where PyTorch runs
    if isinstance(error, MemoryError) or (torch is not None and isinstance(error, torch.cuda.OutOfMemoryError)):
        return True
    text = str(error).lower()
    return "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text


def network_runner(model: LoadedModel, device: str = "auto") -> NetworkRunner:
    """``model``'s network on ``device`` (``auto``, ``cpu``, ``cuda``) with the runtime :func:`load_model`
    chose; kept on the model, so a batch builds it once."""
    key = str(device or "auto")
    if key not in model.runners:
        if model.runtime == "onnxruntime":
            from .onnxmodel import OnnxNetwork

            model.runners[key] = OnnxNetwork(model.onnx, key, model.card.architecture)
        else:
            model.runners[key] = TorchNetwork(model.network, resolve_device(key))
    return model.runners[key]


def segment_image(
    image: sitk.Image,
    model: LoadedModel,
    device: str = "auto",
    window: Sequence[int] | None = None,
    overlap: float = 0.25,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
    *,
    memory_gb: float | None = None,
    tta: bool | None = None,
    largest_component: bool = False,
    force: bool = False,
) -> SegmentationResult:
    """Segment ``image`` with ``model``.

    Args:
        image: scalar 3D SimpleITK image, any orientation (oblique included) and spacing.
        model: from :func:`SDMOrganSegLib.formats.modelfiles.load_model`, which chose the runtime (PyTorch or ONNX Runtime).
        device: ``auto``, ``cpu`` or ``cuda``. On out-of-memory the run retries with half the window (down to
            32 voxels a side), then, from a GPU, on the CPU, and says so in ``result.notes``; out of memory on
            the CPU with the smallest window is an :class:`SDMOrganSegError`.
        window: sliding-window size ``(x, y, z)`` voxels at the model's spacing; default the card's, and the
            whole volume when the card has none.
        progress: called with (fraction in [0, 1], message).
        cancel: stops the run with :class:`CancelledError` at the next tile.
        memory_gb: memory budget in GB (default ``$SDMORGANSEG_MEMORY_GB``, else 80 % of the available RAM).
            When the whole volume at once would need more (:func:`estimate_memory_bytes`), the run switches to
            sliding-window tiles, saying so in ``result.notes``; when even the smallest tiles would not fit, it
            is refused with the memory needed.
        tta: mirroring test-time augmentation over :func:`tta_axes` (twice the network time when the model was
            trained with flips); None: the card's ``inference["tta"]`` (off when the card does not say).
        largest_component: keep only each organ's largest connected component in the label map
            (:func:`SDMOrganSegLib.method.postprocessing.keep_largest_component`); the SDMs stay as predicted.
        force: segment an image of another modality than the card's anyway (a warning in the notes);
            without it such an image is refused with :class:`InputMismatchError` before any work.

    Returns:
        a :class:`SegmentationResult` on the input's exact grid.
    """
    check_volume(image)
    card = model.card
    timings: dict[str, float] = {}
    notes: list[str] = []
    started = time.perf_counter()
    report = progress or (lambda fraction, message: None)

    mismatch = modality_mismatch(image, card.modality, card.field_of_view)
    if mismatch and not force:  # before the device, the memory plan and minutes of network time
        raise InputMismatchError(f"{mismatch}; or segment it anyway with --force", reason=mismatch)
    network = network_runner(model, device)
    notes.extend(model.notes)
    notes.extend(input_warnings(image, card.modality, card.field_of_view, card.input_extent_mm))
    if card.architecture.output_activation == "none" and card.architecture.heads != "dual":
        notes.append(
            "this model was trained with Dice only: its 'SDM' outputs are logits (negative inside, 0 on the boundary), "
            "not normalised distances, so only the 0 iso-contour is meaningful"
        )
    if card.architecture.heads == "dual" and card.labels_from == "sdm":
        notes.append("dual-head model: the label map is its SDM head's zero level (the paper's Heaviside), so the 0 iso-contour is its boundary")
    elif card.architecture.heads == "dual":
        notes.append("dual-head model: the label map comes from its segmentation head, the SDMs and their iso-contours from its SDM head")
    smallest_side = minimum_window(network)
    if window is not None and min(window) < smallest_side:
        raise SDMOrganSegError(
            f"window {'x'.join(str(int(w)) for w in window)} is smaller than this network's minimum of {smallest_side} voxels a side "
            f"(it pads its input to multiples of {smallest_side}); use a window of at least {smallest_side},{smallest_side},{smallest_side}"
        )
    if tta is None:
        tta = bool(card.inference.get("tta", False))
    mirror_axes = tta_axes(card) if tta else ()
    settings = {"tta": bool(tta), "tta_mirror_axes": list(mirror_axes), "largest_component": bool(largest_component)}
    if tta and not mirror_axes:
        notes.append("test-time augmentation: the model was trained without flips, so there is nothing to mirror")
    # Plan the memory before allocating anything large.
    window_zyx = _window_zyx(window or card.window)
    grid = resampled_size(image, card.spacing) if needs_resampling(image, card.spacing) else image.GetSize()
    model_shape = tuple(int(s) for s in reversed(grid))
    window_zyx = _plan_window(image, model_shape, card.architecture.output_channels, network, window_zyx, memory_budget_bytes(memory_gb), notes)

    report(0.0, "preparing the volume")
    working = sitk.Cast(image, sitk.sitkFloat32)
    resampled = needs_resampling(working, card.spacing)
    if resampled:
        working = resample_to_spacing(working, card.spacing)
    volume = normalize_intensity(sitk.GetArrayViewFromImage(working), card.intensity)
    timings["preprocess_s"] = time.perf_counter() - started
    check_cancel(cancel)

    tick = time.perf_counter()

    def network_progress(fraction: float, message: str) -> None:
        report(0.05 + 0.85 * fraction, message)

    planned = window_zyx
    smallest = _smallest_window(volume.shape, _size_multiple(network))
    while True:
        try:
            output = predict_array(network, volume, None, window_zyx, overlap, network_progress, cancel, mirror_axes)
            break
        except (RuntimeError, MemoryError) as error:
            if not _is_out_of_memory(error):
                raise
            network.release_memory()
            where = "CPU" if network.device_type == "cpu" else "GPU"
            current = tuple(min(w, s) for w, s in zip(window_zyx or volume.shape, volume.shape))
            if any(c > m for c, m in zip(current, smallest)):
                window_zyx = tuple(max(m, int(math.ceil(c / 2))) for c, m in zip(current, smallest))
                notes.append(f"{where} out of memory: retrying with a {'x'.join(map(str, window_zyx[::-1]))} window")
            elif network.device_type != "cpu":
                network, window_zyx = network.on_cpu(), planned
                notes.append("GPU out of memory even with the smallest window: continuing on the CPU")
            else:
                raise SDMOrganSegError(
                    f"out of memory on the CPU even with a {'x'.join(map(str, current[::-1]))} window; "
                    "close other programs, or use a machine with more memory"
                ) from None
            report(0.05, notes[-1])
    network.release_memory()
    timings["network_s"] = time.perf_counter() - tick

    tick = time.perf_counter()
    report(0.9, "mapping the SDMs back to the input grid")

    def to_input_grid(channel: np.ndarray | sitk.Image) -> sitk.Image:
        check_cancel(cancel)
        sdm = channel if isinstance(channel, sitk.Image) else image_from_array(channel, working)
        # Outside the model grid's extent the organ is absent: +1, the farthest outside value.
        return resample_like(sdm, image, sitk.sitkLinear, default=1.0) if resampled else sdm

    # Organs side by side: ITK's resampling and the copies release the GIL (2.7 s instead of 3.0 s for 9 CT
    # organs on 2 cores, benchmarks/bench_segment.py).
    sdm_output, label_output = split_heads(output, card.architecture, card.labels_from)
    coarser = resampled and np.prod(volume.shape) < np.prod(image.GetSize())
    # Kept where the model's grid is the coarser one (the contours' source), and resampled from, not rebuilt.
    model_grid_sdms = {organ.name: image_from_array(channel, working) for organ, channel in zip(card.organs, sdm_output)} if coarser else {}
    with ThreadPoolExecutor(worker_threads()) as pool:
        sources = list(model_grid_sdms.values()) if coarser else sdm_output
        sdm_images = dict(zip((organ.name for organ in card.organs), pool.map(to_input_grid, sources)))
        # A dual-head model's label map comes from its segmentation head (unless its card says the SDM head), resampled the same way.
        label_images = sdm_images.values() if label_output is sdm_output else list(pool.map(to_input_grid, label_output))
    sdm_arrays = [sitk.GetArrayViewFromImage(sdm) for sdm in label_images]
    # The per-organ arrays as they are: stacking them would copy every SDM once more (1.9 GB for 9 CT organs).
    label_map = sdms_to_label_map(sdm_arrays, card.label_values)
    if largest_component:
        removed = keep_largest_component(label_map, card.label_values)
        voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
        for organ in card.organs:
            if organ.label in removed:
                voxels, pieces = removed[organ.label]
                notes.append(
                    f"largest component: {organ.name} lost {pieces} smaller component{'s' if pieces > 1 else ''} "
                    f"({voxels} voxels, {voxels * voxel_ml:.3g} ml) in the label map"
                )
    labels = image_from_array(label_map, image)
    timings["postprocess_s"] = time.perf_counter() - tick
    timings["total_s"] = time.perf_counter() - started
    report(1.0, "done")
    result = SegmentationResult(
        labels=labels, sdms=sdm_images, organs=list(card.organs), device=network.description,
        model_name=card.name, timings=timings, notes=notes, settings=settings, runtime=network.runtime, provider=network.provider,
        sdm_normalization=dict(card.training.get("sdm") or {}) if card.architecture.output_activation == "tanh" else {},
        model_grid_sdms=model_grid_sdms,
    )
    notes.extend(volume_warnings(result.organ_volumes_ml(), {organ.name: organ.volume_ml for organ in card.organs}))
    return result
