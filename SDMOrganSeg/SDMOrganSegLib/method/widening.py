"""Function-preserving widening of a trained UNet3D: twice the channels, the same outputs.

Each channel ``c`` of every hidden layer becomes the pair ``2c, 2c + 1``: the incoming weights are copied, and
every weight that reads channel ``c`` is split between the two copies as ``r w`` and ``(1 - r) w`` with a
random ``r`` in [0.3, 0.7] per weight (Net2WiderNet, Chen et al., ICLR 2016). The sums, hence the outputs, are
unchanged; the uneven split gives the two copies different gradients, so training can make them differ.
Convolutions carry no bias here, and group norm keeps its number of groups: a group of the widened layer holds
exactly the copies of one group of the original, so its mean and variance are the original's. The network's
input (the image) and its outputs (the organs) keep their channels.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .network import UNet3D


def widen(network: UNet3D, seed: int = 0) -> UNet3D:
    """A copy of ``network`` with twice its base and maximum channels that computes the same outputs."""
    config = network.config
    wide = UNet3D(dataclasses.replace(config, base_channels=2 * config.base_channels, max_channels=2 * config.max_channels))
    generator = torch.Generator().manual_seed(seed)
    narrow_modules = dict(network.named_modules())
    with torch.no_grad():
        for name, module in wide.named_modules():
            old = narrow_modules[name]
            if isinstance(module, nn.Conv3d):
                module.weight.copy_(_widened_weight(old.weight, module.weight.shape, generator))
                if module.bias is not None:
                    module.bias.copy_(old.bias.repeat_interleave(2) if module.bias.shape != old.bias.shape else old.bias)
            elif isinstance(module, nn.GroupNorm):
                if module.num_groups != old.num_groups:
                    raise ValueError(f"{name}: group norm would change from {old.num_groups} to {module.num_groups} groups")
                wider = module.weight.shape != old.weight.shape  # the SDM branch keeps its channels
                module.weight.copy_(old.weight.repeat_interleave(2) if wider else old.weight)
                module.bias.copy_(old.bias.repeat_interleave(2) if wider else old.bias)
    return wide


def _widened_weight(weight: torch.Tensor, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """``weight`` (out, in, ...) laid out for ``shape``: output channels copied, input channels split."""
    if shape[0] != weight.shape[0]:
        weight = weight.repeat_interleave(2, dim=0)
    if shape[1] != weight.shape[1]:
        share = 0.3 + 0.4 * torch.rand(weight.shape, generator=generator, dtype=weight.dtype)
        weight = torch.stack([share * weight, (1 - share) * weight], dim=2).flatten(1, 2)
    return weight
