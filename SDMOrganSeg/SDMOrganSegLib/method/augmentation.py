"""Data augmentation of training batches, on the device the network trains on (``--augment``).

``basic`` (the default, the trainer's behaviour before this module): the sampler's random left-right flips
and intensity scale/shift, nothing here. ``strong`` adds, per patch and with nnU-Net's probabilities
(Isensee et al., Nature Methods 2021, and its ``nnUNetTrainer`` defaults: rotation and scaling each with
probability 0.2, Gaussian noise 0.1, brightness 0.15, contrast 0.15, gamma 0.3):

* rotation (up to 30 degrees about the axial axis, 15 about the others, in millimetres so that anisotropic
  voxels rotate as anatomy does) and scaling (0.7-1.4), one affine resampling of image, SDMs and masks
  together, so they stay aligned; elastic deformation is left out, as nnU-Net v2 leaves it out;
* Gaussian noise, brightness, contrast and gamma on the image only.

Shapes: images ``(B, 1, z, y, x)``, SDMs and masks ``(B, organs, z, y, x)``. SDM values follow the
resampling: the paper's normalisation divides by the largest distance, so it does not change with scale;
``clip`` and ``tanh`` SDMs are distances in units of ``scale_mm`` and are multiplied by the zoom.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

AUGMENTATIONS = ("basic", "strong")

#: Probabilities and ranges (nnU-Net v2's defaults where it has one).
P_ROTATION, P_SCALE, P_NOISE, P_BRIGHTNESS, P_CONTRAST, P_GAMMA = 0.2, 0.2, 0.1, 0.15, 0.15, 0.3
ROTATION_AXIAL_DEG, ROTATION_OTHER_DEG = 30.0, 15.0
SCALE_RANGE = (0.7, 1.4)


def _rotation(angles_xyz: torch.Tensor) -> torch.Tensor:
    """3x3 rotation matrices ``(B, 3, 3)`` in (x, y, z) order, from angles in radians about x, y, z."""
    cx, cy, cz = torch.cos(angles_xyz).unbind(1)
    sx, sy, sz = torch.sin(angles_xyz).unbind(1)
    one, zero = torch.ones_like(cx), torch.zeros_like(cx)
    rx = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], 1).view(-1, 3, 3)
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], 1).view(-1, 3, 3)
    rz = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], 1).view(-1, 3, 3)
    return rz @ ry @ rx


def spatial_transform(
    images: torch.Tensor, sdms: torch.Tensor, masks: torch.Tensor, spacing_xyz: Sequence[float], generator: torch.Generator,
    sdm_normalization: str = "paper",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random rotation and scaling of each patch about its centre (identity for patches not drawn)."""
    batch, device = images.shape[0], images.device
    draw = lambda *shape: torch.rand(*shape, generator=generator).to(device)  # noqa: E731  (CPU generator: reproducible on any device)
    rotate = draw(batch) < P_ROTATION
    scale_it = draw(batch) < P_SCALE
    if not bool(rotate.any() or scale_it.any()):
        return images, sdms, masks
    limits = torch.tensor([ROTATION_OTHER_DEG, ROTATION_OTHER_DEG, ROTATION_AXIAL_DEG], device=device) * math.pi / 180
    angles = (draw(batch, 3) * 2 - 1) * limits * rotate[:, None]
    low, high = SCALE_RANGE
    zoom = torch.where(scale_it, low + draw(batch) * (high - low), torch.ones(batch, device=device))
    # affine_grid works in normalised coordinates [-1, 1] per axis (x, y, z); the patch's half extent in mm
    # per axis converts them, so the rotation is one of physical space.
    extent = torch.tensor([s * (n - 1) / 2 for s, n in zip(spacing_xyz, reversed(images.shape[2:]))], device=device, dtype=torch.float32)
    to_mm, to_unit = torch.diag(extent), torch.diag(1 / extent)
    # Output voxel -> input position: rotate back and shrink by the zoom (zoom > 1 magnifies the content).
    matrix = to_unit @ _rotation(angles).transpose(1, 2) @ to_mm / zoom[:, None, None]
    theta = torch.cat([matrix, torch.zeros(batch, 3, 1, device=device)], 2)
    grid = F.affine_grid(theta, list(images.shape), align_corners=True)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=True)
    sdms = F.grid_sample(sdms, grid, mode="bilinear", padding_mode="border", align_corners=True)
    masks = (F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=True) >= 0.5).to(masks.dtype)
    factor = zoom[:, None, None, None, None]
    if sdm_normalization == "clip":
        sdms = (sdms * factor).clamp(-1, 1)
    elif sdm_normalization == "tanh":
        sdms = torch.tanh(torch.atanh(sdms.clamp(-0.999, 0.999)) * factor)
    return images, sdms, masks


def intensity_transform(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise, brightness, contrast and gamma, each drawn per patch."""
    batch, device = images.shape[0], images.device
    draw = lambda *shape: torch.rand(*shape, generator=generator).to(device)  # noqa: E731
    shape = (batch, 1, 1, 1, 1)
    noise_sd = torch.where(draw(batch) < P_NOISE, draw(batch) * 0.1 ** 0.5, torch.zeros(batch, device=device)).view(shape)
    noise = torch.randn(images.shape, generator=generator).to(device)
    images = images + noise * noise_sd
    brightness = torch.where(draw(batch) < P_BRIGHTNESS, 0.75 + 0.5 * draw(batch), torch.ones(batch, device=device)).view(shape)
    images = images * brightness
    contrast = torch.where(draw(batch) < P_CONTRAST, 0.75 + 0.5 * draw(batch), torch.ones(batch, device=device)).view(shape)
    mean = images.mean(dim=(2, 3, 4), keepdim=True)
    images = (images - mean) * contrast + mean
    gamma_on = draw(batch) < P_GAMMA
    if bool(gamma_on.any()):
        # Gamma on the patch's values mapped to [0, 1] and back, as nnU-Net does.
        low = images.amin(dim=(2, 3, 4), keepdim=True)
        span = (images.amax(dim=(2, 3, 4), keepdim=True) - low).clamp_min(1e-6)
        gamma = torch.where(gamma_on, 0.7 + 0.8 * draw(batch), torch.ones(batch, device=device)).view(shape)
        images = ((images - low) / span).clamp(0, 1).pow(gamma) * span + low
    return images


def augment_batch(
    images: torch.Tensor, sdms: torch.Tensor, masks: torch.Tensor, kind: str, spacing_xyz: Sequence[float], generator: torch.Generator,
    sdm_normalization: str = "paper",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch augmented as ``kind`` (one of :data:`AUGMENTATIONS`) says; ``basic`` returns it as it is."""
    if kind == "basic" or images.shape[0] == 0:
        return images, sdms, masks
    if kind != "strong":
        raise ValueError(f"unknown augmentation {kind!r}; choose one of {', '.join(AUGMENTATIONS)}")
    images, sdms, masks = spatial_transform(images, sdms, masks, spacing_xyz, generator, sdm_normalization)
    return intensity_transform(images, generator), sdms, masks
