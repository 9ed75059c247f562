"""Training losses of the paper and the four training modes of its ablation.

All tensors are ``(batch, organs, z, y, x)``. ``pred`` is the network output (normalised SDM, negative
inside; or a logit with the same sign for Dice-only models), ``target_sdm`` the ground-truth normalised
SDM and ``target_mask`` the 0/1 organ masks. ``annotated`` (optional, ``(batch, organs)`` 0/1) marks the organs
contoured in each case of partially annotated data: a 0 removes that organ's channel of that case from
every term (its gradient is exactly zero); without it every organ counts, and the losses are the paper's.

Modes (``--mode`` of the trainer):

* ``dice``: Dice loss only (Eq. 1). The network has no tanh and its output is a logit ``z``; the organ
  probability is ``sigmoid(-z)`` (organ where ``z < 0``, the same sign as an SDM). A steep Heaviside on an
  unbounded logit would stop gradients, so this is the paper's "segmentation only" baseline.
* ``sdm``: product loss (Eq. 4) + L1 on the tanh SDM output.
* ``l1+dice``: Dice on ``sigmoid(-k * sdm)`` + lambda * L1.
* ``sdm+dice``: Dice on ``sigmoid(-k * sdm)`` + lambda * (product + L1) (Eq. 5), lambda = 10, k = 1500.
* ``dual``: two heads on one decoder (``pred`` has ``2 * organs`` channels: tanh SDMs, then logits). The
  segmentation head's logit ``z`` gets Dice on ``sigmoid(-z)`` (and the cross-entropy with ``ce_weight``), as
  ``dice``; the SDM head gets lambda * (product + L1) against the normalised SDM, as ``sdm``. The
  segmentation never passes through a steep Heaviside, so the SDM term shapes the shared features without
  costing the Dice term its gradient (distance-regression multi-task training: Audebert et al., CVIU 2019;
  compared with the paper's coupling in Ma et al., MIDL 2020).
"""

from __future__ import annotations

import torch
from torch import nn

from .architecture import output_activation_for  # noqa: F401  (the activation a mode trains; re-exported)
from .sdm import HEAVISIDE_K, SCALED_NORMALIZATIONS

MODES = ("dice", "sdm", "l1+dice", "sdm+dice", "dual")
#: How the Dice term pools a batch: per case (Eq. 1 per patch, the paper) or over the batch; see soft_dice_loss.
DICE_REDUCTIONS = ("case", "batch")

_SPATIAL = (2, 3, 4)


def _batch_organ_mean(per_case_organ: torch.Tensor, annotated: torch.Tensor | None) -> torch.Tensor:
    """Sum over organs, mean over the batch, of a ``(batch, organs)`` term; unannotated entries weigh 0."""
    if annotated is not None:
        # where(), not a product: a masked term that is inf or NaN must not leak a NaN gradient.
        per_case_organ = torch.where(annotated.to(per_case_organ.dtype) > 0, per_case_organ, torch.zeros_like(per_case_organ))
    return per_case_organ.sum(1).mean()


def soft_dice_loss(
    probability: torch.Tensor,
    target_mask: torch.Tensor,
    epsilon: float = 1e-5,
    annotated: torch.Tensor | None = None,
    reduction: str = "case",
) -> torch.Tensor:
    """Eq. 1: ``N - sum_t (2 sum y p + eps) / (sum y + sum p + eps)``, summed over organs (as the paper).

    ``reduction="case"`` (the paper's, Eq. 1 per patch) takes each case's Dice and averages over the batch.
    An organ absent from a patch then scores ``eps / (sum p + eps)`` whatever the prediction, so false
    positives of organs absent from the patch get (almost) no gradient; on patches holding a few of many
    organs (CT) the network learns to paint absent organs anywhere. ``reduction="batch"`` sums ``y p``, ``y``
    and ``p`` over the whole batch before the ratio (one Dice per organ, as nnU-Net's batch Dice), so an
    organ present in any patch of the batch penalises its false positives in all of them. With a batch of
    one the two are the same. Unannotated (case, organ) entries (``annotated`` 0) add nothing in either:
    their voxels are left out of the batch sums and an organ annotated in no case of the batch has no term.
    """
    if reduction not in DICE_REDUCTIONS:
        raise ValueError(f"unknown Dice reduction {reduction!r}; choose one of {', '.join(DICE_REDUCTIONS)}")
    intersection = (probability * target_mask).sum(_SPATIAL)
    total = probability.sum(_SPATIAL) + target_mask.sum(_SPATIAL)
    if reduction == "case":
        dice = (2 * intersection + epsilon) / (total + epsilon)
        return _batch_organ_mean(1 - dice, annotated)
    if annotated is not None:
        keep = annotated.to(intersection.dtype) > 0
        intersection = torch.where(keep, intersection, torch.zeros_like(intersection))
        total = torch.where(keep, total, torch.zeros_like(total))
        present = keep.any(0)
    else:
        present = torch.ones(intersection.shape[1], dtype=torch.bool, device=intersection.device)
    dice = (2 * intersection.sum(0) + epsilon) / (total.sum(0) + epsilon)
    return torch.where(present, 1 - dice, torch.zeros_like(dice)).sum()


def product_loss(
    pred_sdm: torch.Tensor, target_sdm: torch.Tensor, epsilon: float = 1e-6, annotated: torch.Tensor | None = None, regions: torch.Tensor | None = None
) -> torch.Tensor:
    """Eq. 4: ``-sum_t y p / (y p + p^2 + y^2)``, per voxel, averaged over voxels and batch, summed over organs.

    Per voxel the term lies in [-1, 1/3]: it rewards a prediction with the target's sign and penalises
    the wrong sign most near the boundary. ``y p + p^2 + y^2 >= 0`` with equality only at ``y = p = 0``,
    which ``epsilon`` covers. With ``regions`` (:func:`sdm_regions`) each region present counts alike.
    """
    product = pred_sdm * target_sdm
    ratio = product / (product + pred_sdm.square() + target_sdm.square() + epsilon)
    return _batch_organ_mean(_voxel_mean(-ratio, regions), annotated)


def l1_loss(pred_sdm: torch.Tensor, target_sdm: torch.Tensor, annotated: torch.Tensor | None = None, regions: torch.Tensor | None = None) -> torch.Tensor:
    """Mean absolute SDM error, averaged over voxels and batch, summed over organs like Eq. 4."""
    return _batch_organ_mean(_voxel_mean((pred_sdm - target_sdm).abs(), regions), annotated)


#: How the SDM terms average a patch's voxels (``--sdm-balance``): all alike; the band near each organ
#: and the far field half each; or the organ, the band outside it and the far field a third each (sdm_regions).
SDM_BALANCES = ("voxel", "band", "sides")
#: The band's edge as a normalised SDM value: tanh(1), one ``scale_mm`` from the surface for ``tanh``.
NEAR_BAND_LEVEL = 0.7616


def sdm_regions(target_sdm: torch.Tensor, target_mask: torch.Tensor, balance: str = "band") -> torch.Tensor:
    """Per voxel, the region the SDM terms average apart (``_voxel_mean``): 0 the far field, 1 the band
    ``|target SDM| < NEAR_BAND_LEVEL`` around each organ (``band``: with the organ; ``sides``: outside it), 2
    the organ (``sides`` only).

    On CT an organ and its surroundings are 0.1-2 % of a patch; averaged over all voxels, the SDM terms are
    those of the far field (target near +1), and a head whose features cannot yet place the surface fits them
    best with a constant near +1: the head-and-neck campaign's SDM head went there twice (docs/headneck.md).
    Averaging the regions apart, like ``cross_entropy_loss``'s ``balance="organ"``, gives the surface its
    weight whatever the organ's size; ``sides`` also keeps the band's outside voxels, several times the
    thin organs' own, from outvoting the inside (with ``band`` the SDM head's zero level sat inside the
    segmentation: 27-56 % of hn_235's inside voxels positive after 10 epochs)."""
    near = target_sdm.abs() < NEAR_BAND_LEVEL
    inside = target_mask > 0
    if balance == "sides":
        return torch.where(inside, 2, torch.where(near, 1, 0))
    return (near | inside).long()


#: Normalised SDM values beyond which the Eikonal term looks away: the tanh's slope there (1 - p^2 < 0.19)
#: would turn a small error of ``p`` into a large one of the distance.
EIKONAL_LEVEL = 0.9
#: Where the Eikonal term looks (eikonal_loss): ``agreed`` where both the target and the prediction are within
#: their levels, ``target`` the true surface's band whatever the prediction.
EIKONAL_BANDS = ("agreed", "target")
#: Modes with an SDM output the Eikonal term reads as a distance (with one of ``SCALED_NORMALIZATIONS``).
EIKONAL_MODES = ("sdm", "sdm+dice", "dual")


def eikonal_loss(
    pred_sdm: torch.Tensor, target_sdm: torch.Tensor, spacing_mm: tuple[float, float, float], scale_mm: float, normalization: str = "tanh",
    annotated: torch.Tensor | None = None, unannotated_too: bool = False, band_rule: str = "agreed",
) -> torch.Tensor:
    """``(|grad d| - 1)^2`` of the predicted distance ``d`` in mm, averaged over the band within one scale of
    each organ's true surface, summed over organs like Eq. 4.

    The L1 and product terms fit each voxel's value apart, so an SDM head can match the targets on average and
    still not be a distance to its own zero level: on the head-and-neck CTs its values scattered by about
    +-30 % around the distance (docs/headneck.md). A distance function has a gradient of norm 1 almost
    everywhere (the Eikonal equation; as a regulariser of learnt SDMs: Gropp et al., ICML 2020), which ties
    each voxel to its neighbours. ``d`` is ``scale_mm * atanh(p)`` (``tanh``) or ``scale_mm * p`` (``clip``),
    so ``|grad d| = scale_mm |grad p| / (1 - p^2)`` or ``scale_mm |grad p|``; forward differences over
    ``spacing_mm`` (x, y, z), on voxels where the target is below :data:`NEAR_BAND_LEVEL` in magnitude and, with
    ``band_rule`` ``agreed``, the prediction below :data:`EIKONAL_LEVEL`.

    ``agreed`` leaves a way out: a prediction that saturates (the organ called absent, or placed far away) where
    the organ is has no band, so no Eikonal term, which a heavier term rewards (at weight 3 OpenKBP's esophagus,
    contoured in a third of the cases, vanished from both heads: docs/headneck.md). ``target`` counts the true band whatever the
    prediction, the tanh's slope held at :data:`EIKONAL_LEVEL`'s there, so a flat saturated field costs about 1
    a voxel, as a missing gradient should.

    The equation needs no label: with ``unannotated_too``, an organ not contoured in a case (``annotated`` 0)
    is held to it too, in the band within one scale of its *predicted* surface, so that an organ contoured in
    a third of the cases (OpenKBP's esophagus) gets the term in all of them."""
    if normalization not in SCALED_NORMALIZATIONS:
        raise ValueError(f"the Eikonal term needs a distance-proportional normalisation (tanh or clip), not {normalization!r}")
    if band_rule not in EIKONAL_BANDS:
        raise ValueError(f"unknown Eikonal band {band_rule!r}; choose one of {', '.join(EIKONAL_BANDS)}")
    sx, sy, sz = (float(v) for v in spacing_mm)
    core = pred_sdm[..., :-1, :-1, :-1]
    gz = (pred_sdm[..., 1:, :-1, :-1] - core) / sz
    gy = (pred_sdm[..., :-1, 1:, :-1] - core) / sy
    gx = (pred_sdm[..., :-1, :-1, 1:] - core) / sx
    norm = scale_mm * torch.sqrt(gx.square() + gy.square() + gz.square() + 1e-12)
    if normalization == "tanh":
        norm = norm / (1 - core.square()).clamp(min=1 - EIKONAL_LEVEL**2)
    near = target_sdm[..., :-1, :-1, :-1].abs() < NEAR_BAND_LEVEL
    if unannotated_too and annotated is not None:
        own_band = core.detach().abs() < NEAR_BAND_LEVEL
        near = torch.where(annotated.bool()[:, :, None, None, None], near, own_band)
        annotated = None
    if band_rule == "agreed":
        near = near & (core.detach().abs() < EIKONAL_LEVEL)
    band = near.to(norm.dtype)
    per_case_organ = ((norm - 1).square() * band).sum(_SPATIAL) / band.sum(_SPATIAL).clamp(min=1)  # 0 where no band
    return _batch_organ_mean(per_case_organ, annotated)


def own_distance_loss(
    pred_sdm: torch.Tensor, spacing_mm: tuple[float, float, float], scale_mm: float, normalization: str = "tanh",
    target_sdm: torch.Tensor | None = None, annotated: torch.Tensor | None = None,
) -> torch.Tensor:
    """``|p - n(d_own)|`` of the SDM head ``p`` against the normalised distance ``d_own`` (mm) to its *own* zero
    level, computed from the prediction at each step, averaged over the band ``max(spacing) <= |d_own| <
    scale_mm`` of each organ, summed over organs like Eq. 4. ``n`` is the card's normalisation (``tanh(d /
    scale)`` or ``clip(d / scale)``); the target is detached, so the term moves the values, not the zero level.

    The ship check (``Testing/Python/conftest.assert_sdm_is_a_distance``) ranks the SDM against exactly this
    distance. The L1 and product terms pull each voxel toward the median of what the training cases put there,
    and where an organ may or may not go on (OpenKBP's esophagus above its upper end, inside the larynx) that
    median is a low positive value, a dip 8-9 mm below the distance to the surface the head draws; the
    Eikonal term sees only the dip's floor, where ``|grad d|`` is 0. This term pulls every voxel of the band
    to the distance from the drawn surface, so it needs no label: every organ with a surface in the patch counts.

    A head that draws no surface has no distance to be judged by, which a heavy term rewards (at weight 30 the
    esophagus and larynx vanished from the SDM head within 5 epochs, docs/headneck.md). With
    ``target_sdm``, a case-organ whose prediction has no surface but whose target has one (and that is
    ``annotated``, where given) is judged against the target instead, in its band ``|target| < NEAR_BAND_LEVEL``.

    Voxels one voxel from the surface are left to the other terms (the distance between voxel centres
    overstates theirs by up to half a voxel), and so are those nearer the patch's edge than to the surface
    (the surface may go on beyond the edge). Distances by :func:`..sdm.signed_distance_mm` on the organ's box
    grown by one scale; on the CPU about 5 ms an organ of a 64 x 64 x 48 patch (a 20 mm sphere), so 7 organs in a
    batch of 2 add about 10 % to a 0.7 s step of the `cpu` preset."""
    import numpy as np

    from .sdm import _organ_bounding_box, signed_distance_mm

    if normalization not in SCALED_NORMALIZATIONS:
        raise ValueError(f"the own-distance term needs a distance-proportional normalisation (tanh or clip), not {normalization!r}")
    values = pred_sdm.detach().float().cpu().numpy()
    truth = target_sdm.detach().float().cpu().numpy() if target_sdm is not None else None
    known = annotated.detach().cpu().numpy() > 0 if annotated is not None else np.ones(values.shape[:2], bool)
    shape = values.shape[2:]
    zyx_spacing = tuple(float(v) for v in reversed(tuple(spacing_mm)))
    edge_mm = np.full(shape, np.inf, np.float32)
    for axis, (n, step) in enumerate(zip(shape, zyx_spacing)):
        index = np.arange(n, dtype=np.float32)
        along = np.minimum(index + 1, n - index) * step  # to the nearest voxel beyond the patch on this axis
        edge_mm = np.minimum(edge_mm, along.reshape([-1 if a == axis else 1 for a in range(3)]))
    margin = [int(np.ceil(scale_mm / step)) + 1 for step in zyx_spacing]
    target = np.zeros(values.shape, np.float32)
    weight = np.zeros(values.shape, np.float32)
    for b in range(values.shape[0]):
        for c in range(values.shape[1]):
            inside = values[b, c] < 0
            # Beyond the organ's box grown by one scale every voxel is farther than the band reaches.
            box = _organ_bounding_box(inside, margin)
            if box is None or inside.all():
                if truth is not None and known[b, c] and (truth[b, c] < 0).any() and not (truth[b, c] < 0).all():
                    target[b, c] = truth[b, c]
                    weight[b, c] = np.abs(truth[b, c]) < NEAR_BAND_LEVEL
                continue
            local = inside[box]
            if local.all():
                continue
            distance = signed_distance_mm(local, spacing_mm)
            band = (np.abs(distance) >= max(zyx_spacing)) & (np.abs(distance) < scale_mm) & (np.abs(distance) <= edge_mm[box])
            scaled = distance / scale_mm
            target[b, c][box] = np.tanh(scaled) if normalization == "tanh" else np.clip(scaled, -1.0, 1.0)
            weight[b, c][box] = band
    target_t = torch.from_numpy(target).to(pred_sdm.device)
    weight_t = torch.from_numpy(weight).to(pred_sdm.device)
    per_case_organ = ((pred_sdm.float() - target_t).abs() * weight_t).sum(_SPATIAL) / weight_t.sum(_SPATIAL).clamp(min=1)
    return _batch_organ_mean(per_case_organ, None)


def _voxel_mean(per_voxel: torch.Tensor, regions: torch.Tensor | None) -> torch.Tensor:
    """``(batch, organs)`` mean over voxels; with ``regions`` (integer ids, or a bool "near" mask), the mean
    of the present regions' means."""
    if regions is None:
        return per_voxel.mean(dim=_SPATIAL)
    regions = regions.long()
    total = torch.zeros(per_voxel.shape[:2], dtype=per_voxel.dtype, device=per_voxel.device)
    present = torch.zeros_like(total)
    for region in range(int(regions.max()) + 1):
        member = (regions == region).to(per_voxel.dtype)
        count = member.sum(_SPATIAL)
        total = total + (per_voxel * member).sum(_SPATIAL) / count.clamp(min=1)
        present = present + (count > 0).to(per_voxel.dtype)
    return total / present.clamp(min=1)


#: How the cross-entropy weighs voxels: all alike, or an organ's voxels and the others half each (see cross_entropy_loss).
CE_BALANCES = ("voxel", "organ")


def cross_entropy_loss(
    organ_logit: torch.Tensor, target_mask: torch.Tensor, annotated: torch.Tensor | None = None, balance: str = "voxel"
) -> torch.Tensor:
    """Binary cross-entropy of ``sigmoid(organ_logit)`` against the masks, averaged over voxels and batch,
    summed over organs like Eq. 4.

    Unlike Dice, its gradient with respect to the logit is ``p - y`` at every voxel: it does not vanish on a
    confidently wrong voxel, nor on an organ absent from the patch. nnU-Net trains with Dice + cross-entropy
    for this reason (Isensee et al., Nature Methods 2021).

    ``balance="voxel"`` averages over all voxels, so an organ filling a fraction ``f`` of a patch pulls its
    logit up with a total weight ``f``: 2e-4 for a CT esophagus, against a Dice gradient that the sigmoid's
    slope at a prior-initialised bias scales by about ``f`` too, and such organs stay at "absent".
    ``balance="organ"`` averages the organ's voxels and the other voxels of each patch separately and takes
    half of each (class-balanced cross-entropy), so every organ present in a patch pulls with weight 1/2
    whatever its size; a patch without the organ keeps the whole background term.
    """
    if balance not in CE_BALANCES:
        raise ValueError(f"unknown cross-entropy balance {balance!r}; choose one of {', '.join(CE_BALANCES)}")
    per_voxel = nn.functional.binary_cross_entropy_with_logits(organ_logit, target_mask, reduction="none")
    if balance == "voxel":
        return _batch_organ_mean(per_voxel.mean(dim=_SPATIAL), annotated)
    inside = target_mask.sum(_SPATIAL)
    outside = target_mask[0, 0].numel() - inside
    inside_mean = (per_voxel * target_mask).sum(_SPATIAL) / inside.clamp(min=1)
    outside_mean = (per_voxel * (1 - target_mask)).sum(_SPATIAL) / outside.clamp(min=1)
    balanced = torch.where(inside > 0, 0.5 * (inside_mean + outside_mean), outside_mean)
    return _batch_organ_mean(balanced, annotated)


def smooth_heaviside(sdm: torch.Tensor, k: float = HEAVISIDE_K) -> torch.Tensor:
    """``sigmoid(-k * sdm)``: near 1 inside the organ (negative SDM), near 0 outside."""
    return torch.sigmoid(-k * sdm)


class SDMSegmentationLoss(nn.Module):
    """The training objective for one of :data:`MODES`; returns the total and its named parts."""

    def __init__(
        self, mode: str = "sdm+dice", sdm_weight: float = 10.0, k: float = HEAVISIDE_K, dice_reduction: str = "case", ce_weight: float = 0.0,
        ce_balance: str = "voxel", sdm_balance: str = "voxel", eikonal_weight: float = 0.0,
        spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0), scale_mm: float = 5.0, normalization: str = "tanh",
        eikonal_unannotated: bool = False, eikonal_band: str = "agreed", own_distance_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown training mode {mode!r}; choose one of {', '.join(MODES)}")
        if dice_reduction not in DICE_REDUCTIONS:
            raise ValueError(f"unknown Dice reduction {dice_reduction!r}; choose one of {', '.join(DICE_REDUCTIONS)}")
        if ce_balance not in CE_BALANCES:
            raise ValueError(f"unknown cross-entropy balance {ce_balance!r}; choose one of {', '.join(CE_BALANCES)}")
        self.mode, self.sdm_weight, self.k, self.dice_reduction, self.ce_weight = mode, sdm_weight, k, dice_reduction, ce_weight
        if sdm_balance not in SDM_BALANCES:
            raise ValueError(f"unknown SDM balance {sdm_balance!r}; choose one of {', '.join(SDM_BALANCES)}")
        self.ce_balance, self.sdm_balance = ce_balance, sdm_balance
        if eikonal_weight and (mode not in EIKONAL_MODES or normalization not in SCALED_NORMALIZATIONS):
            raise ValueError("the Eikonal term needs an SDM head (modes sdm, sdm+dice, dual) and the tanh or clip normalisation")
        self.eikonal_weight, self.spacing_mm, self.scale_mm, self.normalization = eikonal_weight, tuple(spacing_mm), scale_mm, normalization
        if eikonal_band not in EIKONAL_BANDS:
            raise ValueError(f"unknown Eikonal band {eikonal_band!r}; choose one of {', '.join(EIKONAL_BANDS)}")
        self.eikonal_unannotated, self.eikonal_band = eikonal_unannotated, eikonal_band
        if own_distance_weight and (mode not in EIKONAL_MODES or normalization not in SCALED_NORMALIZATIONS):
            raise ValueError("the own-distance term needs an SDM head (modes sdm, sdm+dice, dual) and the tanh or clip normalisation")
        self.own_distance_weight = own_distance_weight
        #: Parts as Python floats (a wait for the device per part) or as detached tensors (the trainer sums them on the device).
        self.float_parts = True

    def forward(
        self, pred: torch.Tensor, target_sdm: torch.Tensor, target_mask: torch.Tensor, annotated: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        pred = pred.float()  # losses in float32 under autocast
        parts: dict[str, torch.Tensor] = {}
        regions = sdm_regions(target_sdm, target_mask, self.sdm_balance) if self.sdm_balance != "voxel" and self.mode != "dice" else None
        if self.mode == "dual":
            organs = target_mask.shape[1]
            sdm, logit = pred[:, :organs], pred[:, organs:]
            parts["l1"] = l1_loss(sdm, target_sdm, annotated, regions)
            parts["product"] = product_loss(sdm, target_sdm, annotated=annotated, regions=regions)
            parts["dice"] = soft_dice_loss(torch.sigmoid(-logit), target_mask, annotated=annotated, reduction=self.dice_reduction)
            total = parts["dice"] + self.sdm_weight * (parts["l1"] + parts["product"])
            organ_logit, sdm_output = -logit, sdm
        elif self.mode == "dice":
            parts["dice"] = soft_dice_loss(torch.sigmoid(-pred), target_mask, annotated=annotated, reduction=self.dice_reduction)
            total = parts["dice"]
            organ_logit = -pred
        else:
            parts["l1"] = l1_loss(pred, target_sdm, annotated, regions)
            sdm_term = parts["l1"]
            if self.mode in ("sdm", "sdm+dice"):
                parts["product"] = product_loss(pred, target_sdm, annotated=annotated, regions=regions)
                sdm_term = sdm_term + parts["product"]
            if self.mode == "sdm":
                total = sdm_term
            else:
                parts["dice"] = soft_dice_loss(smooth_heaviside(pred, self.k), target_mask, annotated=annotated, reduction=self.dice_reduction)
                total = parts["dice"] + self.sdm_weight * sdm_term
            organ_logit, sdm_output = -self.k * pred, pred  # the smooth Heaviside's logit
        # The distance terms of an SDM output (the constructor refused them for a mode without one).
        if self.eikonal_weight:
            parts["eikonal"] = eikonal_loss(sdm_output, target_sdm, self.spacing_mm, self.scale_mm, self.normalization, annotated, self.eikonal_unannotated, self.eikonal_band)
            total = total + self.eikonal_weight * parts["eikonal"]
        if self.own_distance_weight:
            parts["own_distance"] = own_distance_loss(sdm_output, self.spacing_mm, self.scale_mm, self.normalization, target_sdm, annotated)
            total = total + self.own_distance_weight * parts["own_distance"]
        if self.ce_weight:
            parts["ce"] = cross_entropy_loss(organ_logit, target_mask, annotated, self.ce_balance)
            total = total + self.ce_weight * parts["ce"]
        return total, {name: float(value.detach()) if self.float_parts else value.detach() for name, value in parts.items()}
