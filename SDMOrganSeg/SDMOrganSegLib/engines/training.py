"""Headless trainer: the paper's schedule on a folder of images and label maps.

One epoch is one pass over the training cases in random order, in batches of random patches. All
randomness of epoch ``e`` comes from generators seeded with ``(seed, e)``, and a checkpoint (weights,
optimiser, scheduler, log) is written atomically after every epoch, so a run that is killed and resumed
reproduces the uninterrupted run exactly (same thread count, same device).

Outputs in the run folder: ``split.json``, ``log.csv``, ``curves.png``, ``checkpoint.pt`` (resume state,
tensors only, loaded with ``weights_only=True``), ``cache/`` (preprocessed cases and ground-truth SDMs),
``best/`` (model folder of the best validation epoch: safetensors + card) and ``last/``.

Long on purpose (about 1000 lines): the :class:`Trainer`'s epoch loop, its checkpoint and resume state and
its steps on several processes carry one promise together, that a killed and resumed run (or a run on
several processes) reproduces the uninterrupted single-process run exactly; every random draw and every
file of a run is therefore decided in this one module. What stands alone lives elsewhere: the losses and
augmentation in ``method``, the cases in ``formats.dataset``, the processes in :mod:`.distributed`.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from .. import __version__
from . import distributed
from ..formats.dataset import PreparedCase, check_case_headers, find_cases, load_cases, make_split, read_annotations, read_label_names, read_split
from ..formats.datapack import is_pack, read_pack, read_split_record
from ..common.errors import SDMOrganSegError
from ..formats.finetuning import base_model_record, kept_settings, organs_for_data, refuse_contradictions, sdm_head_rescalable, sdm_head_rescale
from ..common.files import atomic_path, write_text_atomic
from .inference import predict_array, resolve_device, tta_axes
from ..method.architecture import heads_for, split_heads
from ..method.augmentation import AUGMENTATIONS, augment_batch
from ..method.losses import CE_BALANCES, DICE_REDUCTIONS, EIKONAL_BANDS, EIKONAL_MODES, MODES, SDM_BALANCES, SDMSegmentationLoss, output_activation_for
from ..formats.modelfiles import ModelCard, Organ, organs_from_labels, read_card, save_model, shipped_models
from ..method.network import UNet3D, preset
from ..method.preprocessing import DEFAULT_INTENSITY
from ..method.sdm import HEAVISIDE_K, SCALED_NORMALIZATIONS, SDM_NORMALIZATIONS, sdms_to_label_map


@dataclass
class TrainingConfig:
    """Settings of one training run (all stored in the model card)."""

    data_dir: str
    out_dir: str
    preset: str = "cpu"
    mode: str = "sdm+dice"
    epochs: int = 200
    batch_size: int = 2
    patch_size: tuple[int, int, int] | None = (32, 48, 32)  #: (x, y, z) voxels; None: whole volumes (the largest case)
    learning_rate: float = 5e-4
    lr_decay: float = 0.8  #: multiplied into the learning rate every ``lr_step`` epochs
    lr_step: int = 25
    lr_schedule: str = "step"  #: "step" (lr_decay every lr_step epochs) or "poly" (nnU-Net's (1 - epoch/epochs)^0.9)
    optimizer: str = "adam"  #: "adam", or "sgd" (Nesterov momentum 0.99, weight decay 3e-5: nnU-Net's)
    precision: str = "auto"  #: autocast of the network: "bf16", "fp16" (CUDA), "fp32", or "auto" (see resolve_precision)
    augment: str = "basic"  #: "basic" (flips, intensity scale/shift) or "strong" (see method/augmentation.py)
    time_budget_min: float | None = None  #: fix the epochs from the measured speed so training ends in this wall time
    sdm_weight: float = 10.0  #: lambda of Eq. 5
    heaviside_k: float = HEAVISIDE_K
    output_bias: str = "zero"  #: initial bias of the output layer: "zero" (PyTorch's default init) or "prior"; see prior_output_bias
    ce_weight: float = 0.0  #: weight of a binary cross-entropy term on the organ probability (0: the paper's losses)
    ce_balance: str = "voxel"  #: "voxel" (all voxels alike) or "organ" (an organ's voxels weigh half, whatever its size)
    sdm_balance: str = "voxel"  #: how the SDM terms average a patch: "voxel", "band" or "sides" (losses.sdm_regions)
    #: Weight of the Eikonal term (|grad d| - 1)^2 on the SDM head near each organ (losses.eikonal_loss); 0: none.
    eikonal_weight: float = 0.0
    dice_reduction: str = "case"  #: "case" (Eq. 1 per patch, the paper's) or "batch" (one Dice per organ over the batch)
    sdm_normalization: str = "paper"  #: ground-truth SDM normalisation, one of sdm.SDM_NORMALIZATIONS
    sdm_scale_mm: float = 5.0  #: distance that maps to 1 for the "clip" and "tanh" normalisations
    depth: int | None = None  #: architecture overrides of the preset (None: the preset's)
    base_channels: int | None = None
    max_channels: int | None = None
    foreground_fraction: float = 0.0  #: share of patches centred on a voxel of a random annotated organ
    sliding_window: bool = False  #: validate (and let the model infer) in windows of the patch size
    modality: str | None = None  #: "CT" or "MR", recorded in the card and checked on inputs
    field_of_view: str = ""  #: what the training images show, in words, for the card and the input check
    validate_every: int = 5
    seed: int = 0
    split_file: str | None = None
    validation_fraction: float = 0.2
    spacing: tuple[float, float, float] | None = None  #: resample to this (x, y, z) mm; None keeps the data's
    intensity: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_INTENSITY))
    flip: bool = True  #: random left-right flips
    device: str = "auto"
    max_cases: int | None = None  #: use only the first N training cases (tests, quick looks)
    model_name: str = "model"
    threads: int | None = None
    command: str = ""
    #: Model folder or shipped model name whose weights training starts from (fine-tuning): its organs,
    #: network and preprocessing are kept (see :mod:`.finetuning`, whose fine_tuning_settings fills them in).
    init_model: str | None = None
    #: With ``init_model`` of a dual model: start its SDM head afresh (the segmentation head and the network
    #: are kept), so that the SDM normalisation may change; for a head whose tanh saturated (docs/headneck.md).
    reset_sdm_head: bool = False
    #: The Eikonal term also for organs not contoured in a case, around their predicted surface (losses.eikonal_loss).
    eikonal_unannotated: bool = False
    #: Where the Eikonal term looks (losses.EIKONAL_BANDS): ``agreed`` (target and prediction in their bands)
    #: or ``target`` (the true band, so that a saturated prediction cannot escape it).
    eikonal_band: str = "agreed"
    #: Weight of the L1 term between the SDM head and the distance to its own zero level (losses.own_distance_loss); 0: none.
    own_distance_weight: float = 0.0
    #: Channels of an SDM branch (``UNetConfig.sdm_branch``; 0: none). Fine-tuning: None keeps the model's, and
    #: a model without one may be given one (zero at the start, so the model's outputs are kept).
    sdm_branch: int | None = None
    #: With ``init_model``: start from the base widened to twice its channels, computing the same outputs
    #: (method/widening.py), so that training adds capacity without losing what the base learnt.
    widen: bool = False


#: Initial biases of the output layer (``--output-bias``).
OUTPUT_BIASES = ("zero", "prior", "soft-prior")
#: ``soft-prior``: the smallest organ fraction and the largest |mean SDM| the initial bias may encode.
SOFT_PRIOR_FRACTION, SOFT_PRIOR_SDM = 0.05, 0.5
OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("step", "poly")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bfloat16 arithmetic (AVX-512 BF16 or AMX), where bf16 autocast pays."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """The autocast precision a run uses: ``auto`` is bf16 on a GPU that has it (fp16 on older ones) and on a
    CPU with native bf16 (measured about 1.7-2x faster than float32 there, benchmarks/bench_training.py), and
    float32 on other CPUs, where PyTorch emulates bf16 and it is slower. fp16 runs on CUDA only."""
    if precision not in PRECISIONS:
        raise SDMOrganSegError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if device.type == "cuda":
        if precision == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return precision
    if precision == "fp16":
        raise SDMOrganSegError("--precision fp16 needs a CUDA GPU; on the CPU use bf16 or fp32")
    if precision == "auto":
        return "bf16" if cpu_has_bf16() else "fp32"
    return precision


def prior_output_bias(cases: Sequence[PreparedCase], mode: str) -> np.ndarray:
    """Output-layer bias per organ that makes the untrained network predict each organ's average target.

    With a zero bias the first prediction is 0 everywhere: organ probability 0.5, or an SDM of 0, on volumes
    where an organ fills 0.01-2 % of the voxels (CT). Adam moves each weight by about the learning rate per
    step, so thousands of steps go into learning "background" before any organ is learnt. As with the prior
    initialisation of RetinaNet (Lin et al., ICCV 2017), the bias starts at the answer for the average voxel:
    for Dice-only models (logit ``z``, probability ``sigmoid(-z)``) ``z = log((1 - f) / f)`` with ``f`` the
    organ's mean voxel fraction; for SDM models (tanh output) ``atanh`` of the mean target SDM, clipped to
    [-0.95, 0.95]. Only cases where the organ is annotated count.
    """
    organs = cases[0].sdms.shape[0]
    fractions, means = np.zeros(organs), np.zeros(organs)
    for organ in range(organs):
        used = [c for c in cases if c.annotated is None or c.annotated[organ]]
        voxels = sum(c.sdms[organ].size for c in used) or 1
        fractions[organ] = sum(int(np.count_nonzero(c.sdms[organ] < 0)) for c in used) / voxels
        means[organ] = sum(float(c.sdms[organ].sum(dtype=np.float64)) for c in used) / voxels
    if mode == "dice":
        fractions = np.clip(fractions, 1e-4, 0.5)
        return np.log((1 - fractions) / fractions)
    return np.arctanh(np.clip(means, -0.95, 0.95))


def initial_output_biases(cases: Sequence[PreparedCase], mode: str, kind: str) -> dict[str, np.ndarray]:
    """Initial biases per output layer (``head``, and ``segmentation_head`` of dual models) for ``--output-bias``
    ``prior`` or ``soft-prior``.

    ``prior`` (:func:`prior_output_bias`) starts a 0.02 % organ at a probability of 0.0002, where the sigmoid's
    slope is 0.0002: the Dice gradient reaching the logit is scaled by it, and the smallest CT organs
    (esophagus, larynx) were never learnt. ``soft-prior`` floors the fraction at :data:`SOFT_PRIOR_FRACTION`
    (slope 0.0475) and bounds the SDM head's start at tanh's slope 0.75 (|mean SDM| <= :data:`SOFT_PRIOR_SDM`):
    the network still starts near "background", with gradients a rare organ can use.
    """
    soft = kind == "soft-prior"
    biases = {}
    if mode in ("dice", "dual"):
        logit = prior_output_bias(cases, "dice")
        if soft:
            logit = np.minimum(logit, np.log((1 - SOFT_PRIOR_FRACTION) / SOFT_PRIOR_FRACTION))
        biases["segmentation_head" if mode == "dual" else "head"] = logit
    if mode != "dice":
        sdm = prior_output_bias(cases, mode)
        biases["head"] = np.clip(sdm, -np.arctanh(SOFT_PRIOR_SDM), np.arctanh(SOFT_PRIOR_SDM)) if soft else sdm
    return biases


def _patch_starts(
    shape: Sequence[int], patch_zyx: Sequence[int], rng: np.random.Generator, centre: Sequence[int] | None = None
) -> list[int]:
    """Corner ``(z, y, x)`` of a patch of a case of ``shape``: random, or around ``centre`` (clipped to the case)."""
    if centre is None:
        return [int(rng.integers(0, max(s - p, 0) + 1)) for s, p in zip(shape, patch_zyx)]
    return [min(max(int(c) - p // 2, 0), max(s - p, 0)) for c, s, p in zip(centre, shape, patch_zyx)]


def _crop_or_pad(
    arrays: Sequence[np.ndarray], patch_zyx: Sequence[int], starts: Sequence[int], pad_values: Sequence[float]
) -> list[np.ndarray]:
    """The same patch of several arrays ``(..., z, y, x)`` from ``starts``; edges padded where the case is smaller."""
    out = []
    for array, pad_value in zip(arrays, pad_values):
        region = array[(..., *(slice(b, b + p) for b, p in zip(starts, patch_zyx)))]
        missing = [p - r for p, r in zip(patch_zyx, region.shape[-3:])]
        if any(missing):
            widths = [(0, 0)] * (region.ndim - 3) + [(m // 2, m - m // 2) for m in missing]
            region = np.pad(region, widths, constant_values=pad_value)
        out.append(region)
    return out


class PatchSampler:
    """Batches of random patches with labels and SDMs cropped and flipped together, so they stay consistent.

    Each batch is ``(images, target SDMs, target masks, annotated)``: ``(B, 1, z, y, x)``,
    ``(B, organs, z, y, x)`` twice, and ``(B, organs)`` 0/1 flags of the organs contoured in each case.
    With ``foreground_fraction`` f, a share f of the patches is centred on a voxel of an annotated organ
    present in the case (organ and voxel drawn at random), so that small organs are seen often enough.
    """

    def __init__(
        self, cases: Sequence[PreparedCase], label_values: Sequence[int], patch_xyz: Sequence[int], flip: bool,
        foreground_fraction: float = 0.0,
    ) -> None:
        self.cases = list(cases)
        self.label_values = np.asarray(label_values)[:, None, None, None]
        self.patch_zyx = tuple(int(p) for p in reversed(tuple(patch_xyz)))
        self.flip = flip
        self.foreground_fraction = foreground_fraction
        self._foreground: dict[int, list[np.ndarray]] = {}

    def _organ_voxels(self, index: int) -> list[np.ndarray]:
        """Per annotated organ present in case ``index``, the flat indices of (up to 10000 of) its voxels."""
        if index not in self._foreground:
            case = self.cases[index]
            flat = case.labels.reshape(-1)
            annotated = case.annotated if case.annotated is not None else np.ones(len(self.label_values), bool)
            voxels = []
            for value, known in zip(self.label_values.reshape(-1), annotated):
                where = np.flatnonzero(flat == value) if known else np.empty(0, np.int64)
                if where.size:
                    voxels.append(where[:: max(1, where.size // 10000)])
            self._foreground[index] = voxels
        return self._foreground[index]

    def batches(self, batch_size: int, rng: np.random.Generator, shard: tuple[int, int] | None = None):
        """Batches of one epoch: the cases in ``rng``'s order, ``batch_size`` at a time (the last one shorter).

        With ``shard`` ``(rank, world_size)``, only that rank's contiguous slice of each batch
        (:func:`distributed.batch_slice`; possibly empty in a short last batch). Every rank still draws the
        randomness of every patch in the same order, so the ranks' slices of a batch are together exactly
        the batch one process draws from the same generator."""
        order = rng.permutation(len(self.cases))
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            first, stop = (0, len(chosen)) if shard is None else distributed.batch_slice(len(chosen), *shard)
            images, sdms, masks, annotated = [], [], [], []
            for position, index in enumerate(chosen):
                case = self.cases[index]
                centre = None
                if self.foreground_fraction and rng.random() < self.foreground_fraction:
                    organs = self._organ_voxels(int(index))
                    if organs:
                        voxels = organs[int(rng.integers(len(organs)))]
                        centre = np.unravel_index(int(voxels[int(rng.integers(voxels.size))]), case.labels.shape)
                starts = _patch_starts(case.image.shape, self.patch_zyx, rng, centre)
                flip = self.flip and rng.random() < 0.5
                scale, shift = rng.uniform(0.9, 1.1), rng.uniform(-0.1, 0.1)
                if not first <= position < stop:
                    continue  # another rank's patch: drawn above, cropped there
                # Padding: image with its minimum (background), SDMs with +1 (outside every organ).
                image, labels, sdm = _crop_or_pad([case.image, case.labels, case.sdms], self.patch_zyx, starts, [float(case.image.min()), 0, 1.0])
                if flip:
                    image, labels, sdm = image[..., ::-1], labels[..., ::-1], sdm[..., ::-1]
                images.append(image * scale + shift)
                sdms.append(sdm)
                masks.append(labels[None] == self.label_values)
                annotated.append(case.annotated if case.annotated is not None else np.ones(len(self.label_values), bool))
            if images:
                images, sdms, masks, annotated = np.stack(images)[:, None], np.stack(sdms), np.stack(masks), np.stack(annotated)
            else:  # no patch of this rank in a short last batch
                organs = len(self.label_values)
                images, annotated = np.empty((0, 1, *self.patch_zyx)), np.empty((0, organs))
                sdms = masks = np.empty((0, organs, *self.patch_zyx))
            yield (
                torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)),
                torch.from_numpy(np.ascontiguousarray(sdms, dtype=np.float32)),
                torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float32)),
                torch.from_numpy(annotated.astype(np.float32)),
            )


def whole_volume_patch(cases: Sequence[PreparedCase], multiple: int) -> tuple[int, int, int]:
    """Patch ``(x, y, z)`` holding the largest case along each axis, rounded up to ``multiple``."""
    largest = np.max([case.image.shape for case in cases], axis=0)[::-1]
    return tuple(int(-(-int(size) // multiple) * multiple) for size in largest)


def evaluate_cases(
    network: torch.nn.Module, cases: Sequence[PreparedCase], organs: Sequence[Organ], device: torch.device, surface: bool = True,
    window_zyx: Sequence[int] | None = None, mirror_axes: Sequence[int] = (), largest_component: bool = False,
    head_agreement: bool = False, labels_from: str = "segmentation",
) -> dict[str, dict[str, list[float]]]:
    """Per organ, lists over cases of Dice (and HD, HD95, ASD with ``surface``) on whole volumes; with
    ``largest_component``, after keeping each organ's largest connected component (``segment
    --largest-component``). With ``head_agreement``, a dual model's lists also hold ``sdm_agreement``: the
    Dice between the SDM head's zero level and the segmentation head's organ (1 where both are empty).
    ``labels_from``: a dual model's label map from its ``"segmentation"`` head or its ``"sdm"`` head's zero level.

    Organs not annotated in a case (partial labels) are skipped for that case: the lists hold only the
    cases where the organ was contoured, in case order (``case_names`` of :func:`annotated_case_names`).
    """
    network.eval()
    label_values = [organ.label for organ in organs]
    results: dict[str, dict[str, list[float]]] = {o.name: {"dice": [], "hd": [], "hd95": [], "asd": []} for o in organs}
    for case in cases:
        # segment's default overlap, so that validation and card metrics are what users get.
        output = predict_array(network, case.image, device, window=window_zyx, overlap=0.25, mirror_axes=mirror_axes)
        sdm_head, label_head = split_heads(output, network.config, labels_from)
        prediction = sdms_to_label_map(label_head, label_values)
        sdm_zero_level = sdms_to_label_map(sdm_head, label_values) if head_agreement and network.config.heads == "dual" else None
        if largest_component:
            from ..method.postprocessing import keep_largest_component

            keep_largest_component(prediction, label_values)
        for index, organ in enumerate(organs):
            if case.annotated is not None and not case.annotated[index]:
                continue
            pred, ref = prediction == organ.label, case.labels == organ.label
            if surface:
                from ..method.metrics import organ_metrics

                values = organ_metrics(pred, ref, case.spacing).to_dict()
            else:
                total = pred.sum() + ref.sum()
                values = {"dice": float(2 * (pred & ref).sum() / total) if total else 1.0}
            if sdm_zero_level is not None:
                inside = sdm_zero_level == organ.label
                total = pred.sum() + inside.sum()
                values["sdm_agreement"] = float(2 * (pred & inside).sum() / total) if total else 1.0
            for metric, value in values.items():
                results[organ.name].setdefault(metric, []).append(float(value))
    network.to("cpu")
    return results


def fit_sdm_head_to_segmentation(network: torch.nn.Module, batches: Iterator, max_batches: int = 8, band: float = 2.0) -> list[float]:
    """Start a dual network's SDM head as a scaled copy of its segmentation head, so that the SDM's zero level
    lies on the segmentation's surface from the first step; returns each organ's scale.

    Both heads read the same features and are negative inside, so ``head = a * segmentation_head`` per organ
    is an SDM whose pre-activation is ``a`` times the organ's logit. ``a`` is the least-squares fit of the
    logits ``l`` to the targets' pre-activations ``z = atanh(target)`` over the annotated voxels of up to
    ``max_batches`` training batches with ``|z| < band`` (near the surface, where the iso-contours are):
    ``a = sum(l z) / sum(l^2)``. A freshly initialised head (zero output) would need thousands of Adam steps at
    a fine-tuning rate just to reach the far field's +1 (measured on OpenKBP: SDM-to-segmentation agreement
    0.01 after 420 steps at 2e-4). Organs without such voxels, or with a fit <= 0, keep the head as it is."""
    numerator = torch.zeros(network.config.out_channels, dtype=torch.float64)
    denominator = torch.zeros_like(numerator)
    device = next(network.parameters()).device
    network.eval()
    with torch.no_grad():
        for _, (images, target_sdm, _mask, annotated) in zip(range(max_batches), batches):
            logits = split_heads(network(images.to(device)).float().cpu().transpose(0, 1), network.config)[1].transpose(0, 1)
            pre_activation = torch.atanh(target_sdm.float().clamp(-0.995, 0.995))
            used = (pre_activation.abs() < band) & annotated.bool()[:, :, None, None, None]
            numerator += torch.where(used, logits * pre_activation, 0.0).sum(dim=(0, 2, 3, 4)).double()
            denominator += torch.where(used, logits.square(), 0.0).sum(dim=(0, 2, 3, 4)).double()
    network.train()
    scales = torch.where(denominator > 0, numerator / denominator.clamp(min=1e-12), 0.0)
    with torch.no_grad():
        for organ, scale in enumerate(scales.tolist()):
            if scale > 0:
                network.head.weight[organ].copy_(scale * network.segmentation_head.weight[organ])
                network.head.bias[organ].copy_(scale * network.segmentation_head.bias[organ])
    return [float(a) for a in scales]


def annotated_case_names(cases: Sequence[PreparedCase], organs: Sequence[Organ]) -> dict[str, list[str]]:
    """Per organ, the names of the cases in which it was annotated (all cases without partial labels)."""
    return {
        organ.name: [case.name for case in cases if case.annotated is None or case.annotated[index]]
        for index, organ in enumerate(organs)
    }


def summarize(results: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean and standard deviation of each metric per organ (infinite values counted separately)."""
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for organ, metrics in results.items():
        summary[organ] = {}
        for metric, values in metrics.items():
            if not values:
                continue
            array = np.asarray(values, dtype=float)
            finite = array[np.isfinite(array)]
            summary[organ][metric] = {
                "mean": round(float(finite.mean()), 4) if finite.size else math.inf,
                "std": round(float(finite.std()), 4) if finite.size else 0.0,
                "n": int(array.size),
                "n_infinite": int(array.size - finite.size),
            }
    return summary


def _mean_dice(results: dict[str, dict[str, list[float]]]) -> float:
    return float(np.mean([np.mean(m["dice"]) for m in results.values() if m["dice"]]))


def _plot_curves(log_rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in log_rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key in sorted({k for row in log_rows for k in row if k.startswith("loss")}):
        left.plot(epochs, [row.get(key, np.nan) for row in log_rows], label=key)
    left.set_xlabel("epoch"), left.set_ylabel("training loss"), left.legend(fontsize=8)
    validated = [row for row in log_rows if row.get("val_mean_dice") not in (None, "")]
    for key in sorted({k for row in validated for k in row if k.startswith("val_dice_")}):
        right.plot([r["epoch"] for r in validated], [r[key] for r in validated], marker="o", label=key.removeprefix("val_"))
    right.set_xlabel("epoch"), right.set_ylabel("validation Dice"), right.set_ylim(0, 1), right.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    with atomic_path(path) as temporary:
        temporary.write_bytes(buffer.getvalue())


def _write_log(log_rows: list[dict[str, Any]], path: Path) -> None:
    keys: list[str] = []
    for row in log_rows:
        keys += [k for k in row if k not in keys]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys)
    writer.writeheader()
    writer.writerows(log_rows)
    write_text_atomic(path, buffer.getvalue())


def _duration(seconds: float) -> str:
    minutes = int(round(seconds / 60))
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def _one_line(error: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:160] if text else 'no details'}"


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """The resume state in ``path``; anything else, a pickle of other objects included, is refused unread."""
    import pickle

    try:
        # weights_only: the unpickler builds tensors and plain containers only and never runs code.
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = dict(state)
        state["epoch"], state["best_dice"], state["log"] = int(state["epoch"]), float(state["best_dice"]), json.loads(state["log"])
        state["config"] = json.loads(state["config"]) if "config" in state else None
        for key in ("network", "optimizer", "scheduler"):
            if not isinstance(state[key], dict):
                raise TypeError(f"{key} is not a state dict")
    except pickle.UnpicklingError:
        raise SDMOrganSegError(
            f"cannot resume from {path}: it holds pickled objects other than tensors, refused unread because loading "
            "them could run code; delete it to start over, or use another --out"
        ) from None
    except Exception as error:  # unreadable or foreign file of any kind: the cause goes into the message
        raise SDMOrganSegError(f"cannot resume from {path}: it is not a checkpoint of this trainer ({_one_line(error)}); delete it to start over, or use another --out") from None
    return state


#: Settings that may change when a run is resumed: how long and where it runs, not what it learns.
RESUMABLE_CHANGES = frozenset({"epochs", "device", "threads", "validate_every", "data_dir", "out_dir", "model_name", "precision", "time_budget_min"})


def changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Settings (other than :data:`RESUMABLE_CHANGES`) whose values differ between two config records,
    as ``name: saved -> current``. A setting that one record lacks counts as its default."""
    defaults = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(TrainingConfig("", "")).items()}
    changes = []
    for key in sorted(set(saved) | set(current)):
        if key in RESUMABLE_CHANGES or key == "command":
            continue
        before, after = saved.get(key, defaults.get(key)), current.get(key, defaults.get(key))
        if before != after:
            changes.append(f"{key}: {before!r} -> {after!r}")
    return changes


class Trainer:
    """Runs :class:`TrainingConfig`; :meth:`run` trains (or resumes) and returns the best model folder."""

    def __init__(self, config: TrainingConfig, progress: Callable[[str], None] | None = None) -> None:
        if config.mode not in MODES:
            raise SDMOrganSegError(f"unknown training mode {config.mode!r}; choose one of {', '.join(MODES)}")
        if config.epochs < 1 or config.batch_size < 1 or config.lr_step < 1:
            raise SDMOrganSegError("epochs, batch size and lr step must be positive integers")
        if config.sdm_normalization not in SDM_NORMALIZATIONS:
            raise SDMOrganSegError(f"unknown SDM normalisation {config.sdm_normalization!r}; choose one of {', '.join(SDM_NORMALIZATIONS)}")
        if not config.sdm_scale_mm > 0 or not config.heaviside_k > 0:
            raise SDMOrganSegError("the SDM scale (mm) and the Heaviside steepness k must be positive")
        if config.output_bias not in OUTPUT_BIASES:
            raise SDMOrganSegError(f"unknown output bias {config.output_bias!r}; choose one of {', '.join(OUTPUT_BIASES)}")
        if not config.ce_weight >= 0:
            raise SDMOrganSegError("the cross-entropy weight must be 0 or positive")
        if config.eikonal_weight and (config.mode not in EIKONAL_MODES or config.sdm_normalization not in SCALED_NORMALIZATIONS):
            raise SDMOrganSegError("--eikonal-weight needs an SDM head (--mode sdm, sdm+dice or dual) and --sdm-normalization tanh or clip")
        if config.eikonal_unannotated and not config.eikonal_weight:
            raise SDMOrganSegError("--eikonal-unannotated extends the Eikonal term: give --eikonal-weight too")
        if config.eikonal_band not in EIKONAL_BANDS:
            raise SDMOrganSegError(f"unknown Eikonal band {config.eikonal_band!r}; choose one of {', '.join(EIKONAL_BANDS)}")
        if config.eikonal_band != "agreed" and not config.eikonal_weight:
            raise SDMOrganSegError("--eikonal-band chooses where the Eikonal term looks: give --eikonal-weight too")
        if config.own_distance_weight and (config.mode not in EIKONAL_MODES or config.sdm_normalization not in SCALED_NORMALIZATIONS):
            raise SDMOrganSegError("--own-distance-weight needs an SDM head (--mode sdm, sdm+dice or dual) and --sdm-normalization tanh or clip")
        if not config.own_distance_weight >= 0:
            raise SDMOrganSegError("the own-distance weight must be 0 or positive")
        if not config.eikonal_weight >= 0:
            raise SDMOrganSegError("the Eikonal weight must be 0 or positive")
        if config.sdm_balance not in SDM_BALANCES:
            raise SDMOrganSegError(f"unknown SDM balance {config.sdm_balance!r}; choose one of {', '.join(SDM_BALANCES)}")
        if config.ce_balance not in CE_BALANCES:
            raise SDMOrganSegError(f"unknown cross-entropy balance {config.ce_balance!r}; choose one of {', '.join(CE_BALANCES)}")
        if config.dice_reduction not in DICE_REDUCTIONS:
            raise SDMOrganSegError(f"unknown Dice reduction {config.dice_reduction!r}; choose one of {', '.join(DICE_REDUCTIONS)}")
        if not 0 <= config.foreground_fraction <= 1:
            raise SDMOrganSegError("the foreground fraction must lie in [0, 1]")
        for value, choices, what in (
            (config.optimizer, OPTIMIZERS, "optimizer"), (config.lr_schedule, LR_SCHEDULES, "learning-rate schedule"),
            (config.precision, PRECISIONS, "precision"), (config.augment, AUGMENTATIONS, "augmentation"),
        ):
            if value not in choices:
                raise SDMOrganSegError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")
        if config.time_budget_min is not None and not config.time_budget_min > 0:
            raise SDMOrganSegError("the time budget must be a positive number of minutes")
        if config.sdm_branch is not None and not (isinstance(config.sdm_branch, int) and config.sdm_branch >= 0):
            raise SDMOrganSegError("the SDM branch's channels must be a whole number, 0 or more")
        if config.sdm_branch and config.mode == "dice":
            raise SDMOrganSegError("--sdm-branch adds to the SDM head: give --mode sdm, sdm+dice or dual")
        if config.widen and not config.init_model:
            raise SDMOrganSegError("--widen doubles the channels of the model it starts from: give --init MODEL")
        if config.reset_sdm_head and (not config.init_model or config.mode != "dual"):
            raise SDMOrganSegError("--reset-sdm-head starts a dual model's SDM head afresh: give --init MODEL (a dual model) and --mode dual")
        self.config = config
        self.out_dir = Path(config.out_dir)
        self.say = progress or (lambda text: print(text, file=sys.stderr))
        self.ranks = distributed.SINGLE
        self.base = None  #: the model fine-tuning starts from (a modelfiles.LoadedModel), loaded by run()

    def _prepare(self) -> None:
        if is_pack(self.config.data_dir):
            return self._prepare_from_pack()
        config = self.config
        cases = find_cases(config.data_dir)
        check_case_headers(cases)
        names = read_label_names(config.data_dir)
        if names is None:
            raise SDMOrganSegError(f"{config.data_dir} has no labels.json naming the organs; add {{\"labels\": {{\"1\": \"organ\"}}}}")
        self.organs = organs_from_labels(names) if self.base is None else organs_for_data(self.base.card, names, str(config.data_dir))
        label_values = [o.label for o in self.organs]
        by_name = {c.name: c for c in cases}
        split_path = self.out_dir / "split.json"
        if config.split_file:
            split = read_split(config.split_file, list(by_name))
        elif split_path.is_file():
            split = read_split(split_path, list(by_name))
        else:
            split = make_split(list(by_name), config.validation_fraction, config.seed)
        if not split_path.is_file():
            write_text_atomic(split_path, json.dumps({**split, "seed": config.seed, "source": config.split_file or "make_split"}, indent=1) + "\n")
        self.split = split
        train_names = split["train"][: config.max_cases] if config.max_cases else split["train"]
        validation_names = split["validation"][: config.max_cases] if config.max_cases else split["validation"]
        annotations = read_annotations(config.data_dir, [o.name for o in self.organs], train_names + validation_names)
        self.partial_labels = annotations is not None
        cache = self.out_dir / "cache"
        tick = time.perf_counter()
        sdm = self.sdm_settings()
        # Training targets in half precision: 11 bits keep every SDM's sign and its value to 5e-4 of it (far
        # below what the network learns), and halve the largest share of memory (7 CT organs: 12 -> 7 GB).
        self.train_cases = load_cases([by_name[n] for n in train_names], label_values, config.intensity, config.spacing, cache, sdm, np.float16)
        self.validation_cases = load_cases([by_name[n] for n in validation_names], label_values, config.intensity, config.spacing, cache, sdm)
        if annotations is not None:
            for case in self.train_cases + self.validation_cases:
                case.annotated = annotations[case.name]
            unannotated = sum(int((~c.annotated).sum()) for c in self.train_cases)
            but = " but the Eikonal term (--eikonal-unannotated)" if self.config.eikonal_unannotated else ""
            self.say(f"partial labels (annotations.json): {unannotated} organ channels of training cases are unknown and get no loss{but}")
        self.say(f"{len(self.train_cases)} training and {len(self.validation_cases)} validation cases ready in {time.perf_counter() - tick:.1f} s")
        self.model_spacing = config.spacing or self.train_cases[0].spacing

    def _prepare_from_pack(self) -> None:
        """:meth:`_prepare` for a data pack (``sdmorganseg pack``): cases already resampled, SDMs computed here."""
        config = self.config
        pack = read_pack(config.data_dir)
        if self.base is not None:
            raise SDMOrganSegError("fine-tuning (--init) reads the data folder, not a pack; give the folder")
        problems = pack.mismatches(config.intensity, config.spacing)
        if problems:
            raise SDMOrganSegError(f"the pack {config.data_dir} was made with other settings ({'; '.join(problems)}); pack the data again with this run's settings")
        self.organs = organs_from_labels(pack.label_names)
        split_path = self.out_dir / "split.json"
        names = pack.case_names
        if config.split_file:
            split = read_split(config.split_file, names)
        elif split_path.is_file():
            split = read_split(split_path, names)
        elif pack.split is not None:
            split = read_split_record(pack.split, names, str(config.data_dir))
        else:
            split = make_split(names, config.validation_fraction, config.seed)
        if not split_path.is_file():
            write_text_atomic(split_path, json.dumps({**split, "seed": config.seed, "source": config.split_file or "pack"}, indent=1) + "\n")
        self.split = split
        train_names = split["train"][: config.max_cases] if config.max_cases else split["train"]
        validation_names = split["validation"][: config.max_cases] if config.max_cases else split["validation"]
        tick = time.perf_counter()
        label_values = [o.label for o in self.organs]
        self.train_cases = pack.prepared(train_names, label_values, self.sdm_settings(), np.float16)
        self.validation_cases = pack.prepared(validation_names, label_values, self.sdm_settings())
        self.partial_labels = pack.annotations is not None
        if pack.annotations is not None:
            organ_names = [o.name for o in self.organs]
            for case in self.train_cases + self.validation_cases:
                listed = pack.annotations.get(case.name, organ_names)
                case.annotated = np.array([name in listed for name in organ_names], bool)
        self.say(f"{len(self.train_cases)} training and {len(self.validation_cases)} validation cases from the pack ready in {time.perf_counter() - tick:.1f} s")
        self.model_spacing = tuple(pack.spacing) if pack.spacing else self.train_cases[0].spacing

    def sdm_settings(self) -> dict[str, Any]:
        """The ground-truth SDM normalisation, as the dataset cache and the model card record it."""
        config = self.config
        if config.sdm_normalization == "paper":
            return {"normalization": "paper"}
        return {"normalization": config.sdm_normalization, "scale_mm": float(config.sdm_scale_mm)}

    @functools.cached_property
    def organs_with_volume_ranges(self) -> list[Organ]:
        """The organs with the smallest and largest volume (ml) of each in the training labels where it was
        annotated and present, for the card's plausibility check of predictions (widened to the base
        model's range when fine-tuning). Computed once, after the data are prepared: every saved card uses it."""
        import dataclasses

        organs = []
        for index, organ in enumerate(self.organs):
            volumes = [
                float(np.count_nonzero(case.labels == organ.label)) * float(np.prod(case.spacing)) / 1000.0
                for case in self.train_cases
                if case.annotated is None or case.annotated[index]
            ]
            volumes = [v for v in volumes if v > 0] + list(organ.volume_ml or ())
            organs.append(dataclasses.replace(organ, volume_ml=(round(min(volumes), 3), round(max(volumes), 3)) if volumes else None))
        return organs

    @functools.cached_property
    def training_extent_mm(self) -> tuple[float, float, float]:
        """Largest physical extent (x, y, z) mm of the training images."""
        extents = [np.asarray(case.image.shape[::-1], float) * np.asarray(case.spacing, float) for case in self.train_cases]
        return tuple(round(float(v), 1) for v in np.max(extents, axis=0))

    def _config_record(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.config).items() if k not in ("command",)}

    def _card(self, metrics: dict[str, Any], epoch: int) -> ModelCard:
        config = self.config
        training = {
            "data": str(config.data_dir),
            "split": self.split,
            "command": config.command,
            "epochs_trained": epoch,
            "config": self._config_record(),
            "sdm": self.sdm_settings(),
            "partial_labels": self.partial_labels,
            "torch": torch.__version__,
            "world_size": self.ranks.world_size,
            **self._budget_record(epoch),
        }
        description = f"UNet3D ({config.preset} preset) trained with {config.mode} by SDMOrganSeg {__version__}"
        extent = self.training_extent_mm
        if self.base is not None:
            training["base_model"] = base_model_record(self.base.card, self.base.directory)
            description = f"{self.base.card.name} fine-tuned with {config.mode} on {config.data_dir} by SDMOrganSeg {__version__}"
            if self.base.card.input_extent_mm:
                extent = tuple(max(a, b) for a, b in zip(extent, self.base.card.input_extent_mm))
        return ModelCard(
            name=config.model_name,
            description=description,
            architecture=self.network.config,
            organs=self.organs_with_volume_ranges,
            modality=config.modality,
            field_of_view=config.field_of_view,
            input_extent_mm=extent,
            spacing=tuple(float(s) for s in self.model_spacing),
            intensity=dict(config.intensity),
            window=self.patch_size if config.sliding_window else None,
            heaviside_k=config.heaviside_k,
            inference=dict(self.base.card.inference) if self.base is not None else {},  # a fine-tuned model is used as its base
            training=training,
            metrics=metrics,
        )

    def _budget_record(self, epoch: int) -> dict[str, Any]:
        """What the training cost up to ``epoch``: precision, optimiser steps, training wall time (validation
        excluded) and speed, and the machine, for the card."""
        import platform

        rows = [row for row in getattr(self, "log_rows", []) if int(row.get("epoch", 0)) <= epoch and row.get("epoch_s") not in (None, "")]
        steps = epoch * math.ceil(len(self.train_cases) / self.config.batch_size)
        seconds = float(sum(float(row["epoch_s"]) for row in rows))
        device = getattr(self, "device", None)
        if device is not None and device.type == "cuda":
            machine = torch.cuda.get_device_name(device)
        else:
            machine = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
        return {
            "precision": getattr(self, "precision", None), "steps": steps, "training_time_s": round(seconds, 1),
            "steps_per_s": round(steps / seconds, 3) if seconds else None, "machine": machine,
        }

    def _validation_dice(self, device: torch.device, window: Sequence[int] | None) -> tuple[float, dict[str, float]]:
        """Mean validation Dice on whole volumes, and the log's ``val_mean_dice`` and ``val_dice_<organ>``."""
        # A fine-tuned card keeps its base's inference, so the label map it is validated (and best/ chosen) by
        # is the one segment will give: a base taking it from the SDM head (the shipped headneck-oar) included.
        labels_from = self.base.card.labels_from if self.base is not None else "segmentation"
        results = evaluate_cases(
            self.network, self.validation_cases, self.organs, device, surface=False, window_zyx=window, head_agreement=True, labels_from=labels_from,
        )
        self.network.to(device)
        mean_dice = _mean_dice(results)
        fields = {"val_mean_dice": round(mean_dice, 5)}
        fields.update({f"val_dice_{organ}": round(float(np.mean(metrics["dice"])), 5) for organ, metrics in results.items()})
        agreement = [float(np.mean(metrics["sdm_agreement"])) for metrics in results.values() if metrics.get("sdm_agreement")]
        if agreement:
            # A dual model's SDM head is only trusted where it describes the segmentation it is shown beside.
            fields["val_sdm_agreement"] = round(float(np.mean(agreement)), 5)
            if fields["val_sdm_agreement"] < 0.5:
                self.say(
                    f"warning: the SDM head's zero level agrees with the segmentation by Dice {fields['val_sdm_agreement']:.2f} only; "
                    "if it stays low, its tanh has saturated: --sdm-normalization tanh and, fine-tuning, --reset-sdm-head (docs/headneck.md)"
                )
        return mean_dice, fields

    def _save_checkpoint(self, epoch: int, best: float, log_rows: list[dict[str, Any]]) -> None:
        state = {
            "epoch": epoch,
            "best_dice": best,
            "network": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "log": json.dumps(log_rows),
            "config": json.dumps(self._config_record()),
            "planned_epochs": self.planned_epochs,
        }
        with atomic_path(self.out_dir / "checkpoint.pt") as temporary:
            torch.save(state, temporary)

    def _resume_state(self, checkpoint_path: Path) -> dict[str, Any] | None:
        """The state of the checkpoint to resume from (None: none yet), refused when it was written with
        settings that change what the network learns."""
        # Temporary files of a run that was killed while writing: never complete, never needed.
        for stale in self.out_dir.glob(".checkpoint.pt.*.part*"):
            stale.unlink(missing_ok=True)
        state = _read_checkpoint(checkpoint_path) if checkpoint_path.is_file() else None
        if state is not None and state["config"] is not None:
            changes = changed_settings(state["config"], self._config_record())
            if changes:
                raise SDMOrganSegError(
                    f"cannot resume {self.out_dir} with other settings ({'; '.join(changes)}); "
                    "rerun with the run's settings (see its log and split.json), or use another --out"
                )
        return state

    def run(self) -> Path:
        """Train, or resume. Under torchrun, this process is one rank of a DistributedDataParallel run
        (:mod:`.distributed`): ``batch_size`` is the global batch, each rank takes its share of every batch,
        and rank 0 alone validates and writes the run's files while the others wait."""
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        backend = distributed.backend_for(resolve_device(self.config.device).type)
        with distributed.process_group(backend) as self.ranks:
            if not self.ranks.main:
                self.say = lambda text: None
            try:
                return self._run()
            except RuntimeError as error:
                message = distributed.lost_contact(self.ranks, error)
                if message is None:
                    raise
                raise SDMOrganSegError(message) from None

    def _run(self) -> Path:
        config, ranks = self.config, self.ranks
        self.out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint_path = self.out_dir / "checkpoint.pt"
        with distributed.all_or_none(ranks):
            if config.batch_size % ranks.world_size:
                raise SDMOrganSegError(
                    f"--batch-size {config.batch_size} is the global batch, shared evenly by the {ranks.world_size} processes: "
                    f"give a multiple of {ranks.world_size}"
                )
            device = distributed.rank_device(config.device, ranks)
            # Read the checkpoint before the data, so that a bad one is refused before any work; rank 0
            # reads it and hands it to the others, so they need not see the run folder.
            state = self._resume_state(checkpoint_path) if ranks.main else None
        state = distributed.broadcast(ranks, state)
        with distributed.all_or_none(ranks):
            if config.init_model:
                from ..formats.modelfiles import load_model, resolve_model

                self.base = load_model(resolve_model(config.init_model))
                refuse_contradictions(self.base.card, self._config_record())
            self._prepare()
        distributed.check_same(
            ranks, self.split, "training and validation cases", "give every machine the same data folder and --split, or a run folder they share"
        )
        torch.manual_seed(config.seed)
        overrides = {k: getattr(config, k) for k in ("depth", "base_channels", "max_channels", "sdm_branch") if getattr(config, k) is not None}
        if config.sdm_branch is None and self.base is not None:  # fine-tuning keeps the model's branch unless told
            overrides["sdm_branch"] = self.base.card.architecture.sdm_branch
        if config.widen and state is not None:  # a resumed widened run: the checkpoint holds the wide weights
            narrow = preset(config.preset, 1, len(self.organs), **overrides)
            overrides.update(base_channels=2 * narrow.base_channels, max_channels=2 * narrow.max_channels)
        self.network = UNet3D(
            preset(config.preset, 1, len(self.organs), output_activation=output_activation_for(config.mode), heads=heads_for(config.mode), **overrides)
        ).to(device)
        if config.output_bias != "zero" and self.base is None and state is None:
            with torch.no_grad():
                for layer, bias in initial_output_biases(self.train_cases, config.mode, config.output_bias).items():
                    getattr(self.network, layer).bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
        if self.base is not None:
            base_architecture = self.base.card.architecture
            added_branch = self.network.config.sdm_branch if not base_architecture.sdm_branch else 0
            if dataclasses.replace(self.network.config, sdm_branch=base_architecture.sdm_branch) != base_architecture and not (config.widen and state is not None):
                # refuse_contradictions has said why already
                raise SDMOrganSegError(f"the network of this run differs from that of model {self.base.card.name}; it cannot be fine-tuned")
            if state is None:
                # A branch added to the base starts at zero (UNet3D): the base's outputs, whatever the branch's other weights.
                missing, unexpected = self.network.load_state_dict(self.base.network.state_dict(), strict=not added_branch)
                if unexpected or any(not key.startswith("sdm_branch.") for key in missing):
                    raise SDMOrganSegError(f"the weights of model {self.base.card.name} do not fit this run's network; it cannot be fine-tuned")
                if added_branch:
                    self.say(f"added an SDM branch of {added_branch} channels to {self.base.card.name} (zero at the start: the same outputs)")
                if config.widen:
                    from ..method.widening import widen

                    self.network = widen(self.network, config.seed).to(device)
                    self.say(f"widened {self.base.card.name} to {self.network.config.base_channels}-{self.network.config.max_channels} channels, the same outputs")
                if config.reset_sdm_head:
                    with torch.no_grad():  # PyTorch's initial weights, and a zero bias: every SDM starts at 0
                        self.network.head.reset_parameters()
                        self.network.head.bias.zero_()
                        for layer in self.network.sdm_output_layers()[1:]:  # a branch starts at zero again
                            layer.weight.zero_()
                            layer.bias.zero_()
                elif sdm_head_rescalable(self.base.card, self._config_record()):
                    factor = sdm_head_rescale(self.base.card, config.sdm_scale_mm)
                    if factor != 1.0:
                        with torch.no_grad():  # tanh(a) = tanh(d / s) becomes tanh(a s / s') = tanh(d / s')
                            for layer in self.network.sdm_output_layers():  # a sums over them
                                layer.weight.mul_(factor)
                                layer.bias.mul_(factor)
                        self.say(f"SDM head of {self.base.card.name} rescaled from {kept_settings(self.base.card)['sdm_scale_mm']:g} mm to {config.sdm_scale_mm:g} mm (x{factor:g})")
        self.patch_size = tuple(config.patch_size) if config.patch_size else whole_volume_patch(self.train_cases, self.network.size_multiple)
        if config.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(self.network.parameters(), lr=config.learning_rate, momentum=0.99, nesterov=True, weight_decay=3e-5)
        else:
            self.optimizer = torch.optim.Adam(self.network.parameters(), lr=config.learning_rate)
        self.planned_epochs = config.epochs
        if config.lr_schedule == "poly":
            # Per epoch, as nnU-Net: the factor for the epoch about to train; planned_epochs may be fixed later by the time budget.
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda done: max(1 - done / self.planned_epochs, 0.0) ** 0.9)
        else:
            self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=config.lr_step, gamma=config.lr_decay)
        loss_function = SDMSegmentationLoss(
            config.mode, config.sdm_weight, config.heaviside_k, config.dice_reduction, config.ce_weight, config.ce_balance, config.sdm_balance,
            config.eikonal_weight, tuple(float(v) for v in self.model_spacing), config.sdm_scale_mm, config.sdm_normalization,
            config.eikonal_unannotated, config.eikonal_band, config.own_distance_weight,
        )
        loss_function.float_parts = ranks.distributed  # the all-reduce takes numbers; otherwise parts stay tensors
        self.precision = resolve_precision(config.precision, device)
        autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        augment_generator = torch.Generator()

        start_epoch, best, log_rows = 0, -1.0, []
        self.log_rows, self.device = log_rows, device
        if state is not None:
            try:
                self.network.load_state_dict(state["network"])
                self.optimizer.load_state_dict(state["optimizer"])
                self.scheduler.load_state_dict(state["scheduler"])
            except (RuntimeError, ValueError, KeyError) as error:
                raise SDMOrganSegError(
                    f"cannot resume from {checkpoint_path}: it was written by a run with other settings ({_one_line(error)}); "
                    "delete it to start over, or use another --out"
                ) from None
            start_epoch, best, log_rows = state["epoch"], state["best_dice"], state["log"]
            self.log_rows = log_rows
            if config.time_budget_min and state.get("planned_epochs"):  # the length the budget fixed; otherwise --epochs (resumable)
                self.planned_epochs = min(int(state["planned_epochs"]), config.epochs)
            self.say(f"resuming after epoch {start_epoch} (best validation Dice so far {best:.4f})")
        if start_epoch >= self.planned_epochs:
            self.say(f"already trained for {start_epoch} epochs")
            from ..formats.modelfiles import load_model

            try:
                load_model(self.out_dir / "last")
            except SDMOrganSegError:
                # Killed after the last checkpoint but before last/ was complete: write it from the checkpoint.
                if ranks.main:
                    save_model(self.network, self._card({}, start_epoch), self.out_dir / "last", overwrite=True)
            return self.out_dir / "best"

        if config.model_name in shipped_models():
            self.say(
                f"note: this model is named {config.model_name!r} like a shipped model, and --model {config.model_name} "
                f"picks the shipped one: use this run's folder ({self.out_dir / 'best'}), or another name (--name)"
            )
        sampler = PatchSampler(self.train_cases, [o.label for o in self.organs], self.patch_size, config.flip, config.foreground_fraction)
        if config.reset_sdm_head and self.base is not None and state is None:
            # Before DistributedDataParallel, which hands every rank rank 0's weights.
            scales = fit_sdm_head_to_segmentation(self.network, sampler.batches(config.batch_size, np.random.default_rng([config.seed, 0])))
            self.say("SDM head started from the segmentation head, scaled by " + ", ".join(f"{o.name} {a:.3f}" for o, a in zip(self.organs, scales)))
        model = distributed.data_parallel(self.network, ranks, device)
        if ranks.distributed:
            self.say(f"{ranks.world_size} processes, {config.batch_size // ranks.world_size} patches each per batch of {config.batch_size}")
        steps_per_epoch = math.ceil(len(self.train_cases) / config.batch_size)
        validation_window = tuple(reversed(self.patch_size)) if config.sliding_window else None
        self.say(f"patch {'x'.join(map(str, self.patch_size))} (x, y, z), {sum(p.numel() for p in self.network.parameters()):,} parameters")
        if self.base is not None and start_epoch == 0 and ranks.main:
            # The base model is the first candidate: best/ is replaced only by an epoch that validates better,
            # so fine-tuning never hands back a model that is worse on the validation cases than the one it started from.
            # With its SDM head reset it is no candidate: that head is untrained.
            base_dice, fields = self._validation_dice(device, validation_window)
            log_rows.append({"epoch": 0, **fields})
            _write_log(log_rows, self.out_dir / "log.csv")
            if config.reset_sdm_head:
                self.say(f"base model {self.base.card.name}: validation Dice {base_dice:.4f}; its SDM head starts afresh")
            else:
                best = base_dice
                save_model(self.network, self._card({"validation_mean_dice": round(best, 5), "epoch": 0}, 0), self.out_dir / "best", overwrite=True)
                self.say(f"base model {self.base.card.name}: validation Dice {best:.4f} before fine-tuning")
        run_started, run_first_epoch = time.perf_counter(), start_epoch + 1
        self.say(f"precision {self.precision} on {device.type}; optimizer {config.optimizer}, {config.lr_schedule} schedule, {config.augment} augmentation")
        from tqdm import tqdm

        epoch = start_epoch
        while epoch < self.planned_epochs:
            epoch += 1
            self.network.train()
            learning_rate = self.optimizer.param_groups[0]["lr"]  # the rate this epoch trains with
            rng = np.random.default_rng([config.seed, epoch])
            sums: dict[str, float] = {}
            tick = time.perf_counter()
            data_time = 0.0
            # The bar only on a terminal: in a log file (nohup, batch jobs) the per-epoch lines say it all.
            augment_generator.manual_seed(config.seed * 1_000_003 + epoch)
            bar = tqdm(
                total=steps_per_epoch, desc=f"epoch {epoch}/{self.planned_epochs}", leave=False, file=sys.stderr, dynamic_ncols=True,
                disable=not sys.stderr.isatty() or not ranks.main,
            )
            batches = sampler.batches(config.batch_size, rng, ranks.shard)
            skipped = 0
            for step in range(steps_per_epoch):
                data_tick = time.perf_counter()
                images, target_sdm, target_mask, annotated = (t.to(device, non_blocking=True) for t in next(batches))
                images, target_sdm, target_mask = augment_batch(
                    images, target_sdm, target_mask, config.augment, self.model_spacing, augment_generator, config.sdm_normalization
                )
                data_time += time.perf_counter() - data_tick
                with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                    prediction = model(images)
                loss, parts = loss_function(prediction, target_sdm, target_mask, annotated if self.partial_labels else None)
                values = {"loss": loss.detach(), **{f"loss_{k}": v for k, v in parts.items()}}
                if ranks.distributed:
                    total = min(config.batch_size, len(self.train_cases) - step * config.batch_size)
                    loss, values = distributed.global_batch_mean(ranks, loss, values, prediction, total)
                self.optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(self.optimizer)
                # nnU-Net clips the gradient norm at 12 with SGD: momentum 0.99 turns one outlier batch into many bad steps.
                gradient_norm = torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12.0 if config.optimizer == "sgd" else math.inf)
                if self.precision == "fp16" or torch.isfinite(gradient_norm):
                    scaler.step(self.optimizer)  # fp16: the scaler skips overflowing steps itself, while it finds its scale
                else:
                    # One non-finite gradient would make every weight NaN through Adam's moments. The one cause
                    # seen (PyTorch 2.13's CPU bf16 convolution of 2-voxel-deep inputs) is avoided in
                    # method/network.Conv3x3x3; this is the backstop, as fp16's GradScaler is for overflows.
                    skipped += 1
                scaler.update()
                for name, value in values.items():
                    sums[name] = sums.get(name, 0.0) + value  # tensors stay on the device: no wait for the GPU each step
                if not bar.disable:
                    bar.set_postfix(loss=f"{float(sums['loss']) / (step + 1):.4f}")
                bar.update()
            bar.close()
            if skipped > max(1, steps_per_epoch // 10):  # the same on every rank: the gradients were all-reduced
                raise SDMOrganSegError(
                    f"epoch {epoch}: {skipped} of {steps_per_epoch} steps had non-finite gradients and were skipped, so the "
                    f"model is not learning: lower --lr, or use --precision fp32 (this run: {self.precision})"
                )
            self.scheduler.step()
            if not ranks.main:
                distributed.barrier(ranks)  # while rank 0 validates and writes this epoch's files
                continue
            elapsed = time.perf_counter() - tick
            row: dict[str, Any] = {"epoch": epoch, "lr": learning_rate}
            row.update({name: round(float(value) / steps_per_epoch, 6) for name, value in sums.items()})
            row.update({"epoch_s": round(elapsed, 3), "steps_per_s": round(steps_per_epoch / elapsed, 3), "data_share": round(data_time / elapsed, 4)})
            row["skipped_steps"] = skipped
            message = f"epoch {epoch}: loss {row['loss']:.4f}, {row['steps_per_s']:.2f} steps/s"
            if skipped:
                message += f", {skipped} step(s) skipped for a non-finite gradient"
            log_rows.append(row)
            if epoch % config.validate_every == 0 or epoch == self.planned_epochs:
                mean_dice, fields = self._validation_dice(device, validation_window)
                row.update(fields)
                message += f", validation Dice {mean_dice:.4f}"
                if mean_dice > best:
                    best = mean_dice
                    save_model(self.network, self._card({"validation_mean_dice": round(mean_dice, 5), "epoch": epoch}, epoch), self.out_dir / "best", overwrite=True)
                    message += " (best)"
            per_epoch = (time.perf_counter() - run_started) / (epoch - run_first_epoch + 1)
            if config.time_budget_min and "val_mean_dice" in row and self.planned_epochs == config.epochs and start_epoch == 0:
                # The first validated epoch fixes the run's length from its speed (validation included), so
                # that the schedule ends with the budget; the checkpoint keeps it for a resume.
                fitted = max(epoch, min(config.epochs, int(config.time_budget_min * 60 / per_epoch)))
                if fitted != self.planned_epochs:
                    self.planned_epochs = fitted
                    if config.lr_schedule == "poly":  # the next epoch's rate was set before the length was fixed
                        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
                            group["lr"] = base * max(1 - self.scheduler.last_epoch / fitted, 0.0) ** 0.9
                    self.say(f"time budget {config.time_budget_min:g} min at {per_epoch:.2f} s an epoch: {fitted} epochs")
            if config.time_budget_min and time.perf_counter() - run_started > config.time_budget_min * 60 * 1.1 and epoch < self.planned_epochs:
                self.say(f"time budget {config.time_budget_min:g} min overrun by 10 %: stopping after epoch {epoch} of {self.planned_epochs}")
                self.planned_epochs = epoch
            row["eta_s"] = round(per_epoch * (self.planned_epochs - epoch), 1)
            _write_log(log_rows, self.out_dir / "log.csv")
            self._save_checkpoint(epoch, best, log_rows)
            if "val_mean_dice" in row:
                _plot_curves(log_rows, self.out_dir / "curves.png")
            self.say(f"{message}; ETA {_duration(row['eta_s'])} ({time.strftime('%H:%M', time.localtime(time.time() + row['eta_s']))})")
            distributed.barrier(ranks)
        if ranks.main:
            save_model(self.network, self._card({}, self.planned_epochs), self.out_dir / "last", overwrite=True)
            if self.base is not None and read_card(self.out_dir / "best").metrics.get("epoch") == 0:
                self.say(f"no fine-tuned epoch validated better than the base model: best/ holds its weights, last/ those of epoch {self.planned_epochs}")
        return self.out_dir / "best"


def evaluate_model_on_split(
    model: Any, data_dir: str | Path, cache_dir: Path | None, device: str = "auto", tta: bool = False, split_name: str = "validation",
    largest_component: bool = False,
) -> tuple[dict[str, dict[str, list[float]]], list[PreparedCase]]:
    """Per-organ, per-case metrics of a loaded model on the cases of its card's split (partial labels
    honoured when the data folder has ``annotations.json``), with its card's window and, with ``tta``,
    mirroring along the axes it was trained flipped on."""
    card = model.card
    names = card.training["split"][split_name]
    sdm = card.training.get("sdm")
    if is_pack(data_dir):
        pack = read_pack(data_dir)
        trained_spacing = (card.training.get("config") or {}).get("spacing", card.spacing)  # None: the data's own
        problems = pack.mismatches(card.intensity, trained_spacing)
        if problems:
            raise SDMOrganSegError(f"the pack {data_dir} was made with other settings than model {card.name} ({'; '.join(problems)})")
        prepared = pack.prepared(names, card.label_values, sdm or {})
        annotations = None if pack.annotations is None else {
            n: np.array([o in pack.annotations.get(n, card.organ_names) for o in card.organ_names], bool) for n in names
        }
    else:
        cases = {c.name: c for c in find_cases(data_dir)}
        prepared = load_cases([cases[n] for n in names], card.label_values, card.intensity, card.spacing, cache_dir, sdm)
        annotations = read_annotations(data_dir, card.organ_names, names)
    if annotations is not None:
        for case in prepared:
            case.annotated = annotations[case.name]
    mirror = tta_axes(card) if tta else ()
    window = tuple(reversed(card.window)) if card.window else None
    results = evaluate_cases(
        model.network, prepared, card.organs, resolve_device(device), window_zyx=window, mirror_axes=mirror, largest_component=largest_component,
        labels_from=card.labels_from,
    )
    return results, prepared


def finalize_best_model(run_dir: str | Path, data_dir: str | Path, device: str = "auto", tta: bool = False) -> dict[str, Any]:
    """Evaluate ``run_dir/best`` on its validation split (Dice, HD, HD95, ASD), store the summary in its card,
    and export it to ``model.onnx`` (:func:`SDMOrganSegLib.engines.onnxmodel.export_model`) for ONNX Runtime."""
    from ..formats.modelfiles import installed, load_model
    from .onnxmodel import export_model

    run_dir = Path(run_dir)
    model = load_model(run_dir / "best", runtime="torch")
    card = model.card
    results, prepared = evaluate_model_on_split(model, data_dir, run_dir / "cache", device, tta)
    card.metrics = split_metrics_record(
        results, prepared, card.organs, card.metrics.get("epoch"), tta,
        "metrics at the model spacing on whole validation volumes (organs only where annotated); HD/HD95/ASD in mm",
    )
    save_model(model.network, card, run_dir / "best", overwrite=True)
    missing = [module for module in ("onnx", "onnxscript") if not installed(module)]
    if missing:  # the model is complete without it: it runs on PyTorch
        print(f"note: {run_dir / 'best'} has no model.onnx, since {' and '.join(missing)} (the ONNX exporter's) is not installed; "
              f"install them (pip install 'sdmorganseg[train]') and run sdmorganseg export {run_dir / 'best'}", file=sys.stderr)
    else:
        export_model(run_dir / "best")
    return card.metrics["per_organ"]


def split_metrics_record(
    results: dict[str, dict[str, list[float]]], prepared: Sequence[PreparedCase], organs: Sequence[Organ], epoch: int | None, tta: bool, note: str
) -> dict[str, Any]:
    """A card's ``metrics``: the summary and per-case values of :func:`evaluate_model_on_split`'s results."""
    return {
        "split": "validation",
        "cases": len(prepared),
        "per_organ": summarize(results),
        "per_case": {organ: {m: [round(v, 5) for v in values] for m, values in metrics.items()} for organ, metrics in results.items()},
        "case_names": [c.name for c in prepared],
        "organ_case_names": annotated_case_names(prepared, organs),
        "epoch": epoch,
        "tta": bool(tta),
        "note": note,
    }
