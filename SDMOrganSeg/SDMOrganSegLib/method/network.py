"""The paper's deep 3D UNet backbone, with a configurable depth and width.

Shapes: input ``(batch, in_channels, z, y, x)``, output ``(batch, config.output_channels, z, y, x)`` of the
same spatial size. Each output channel is one organ's normalised SDM, in [-1, 1] through ``tanh`` and
negative inside the organ; a Dice-only model (``output_activation="none"``) gives unbounded logits with the
same sign convention. A dual-head model (``heads="dual"``) outputs ``2 * out_channels`` channels: the organs'
tanh SDMs from ``head``, then the organs' segmentation logits (negative inside) from ``segmentation_head``,
two 1x1x1 convolutions on the same last decoder features. With ``sdm_branch`` channels, an SDM branch (two
3x3x3 convolutions and a 1x1x1 one, zero at the start) adds its output to ``head``'s before the tanh: features
of the SDM's own, so that the distance away from the surface need not share the features the segmentation
head reads (8 channels in the cpu preset), and a model fine-tuned with a new branch starts from the outputs it had.

Paper preset: 6 downsamplings (7 resolution levels, 6 skip connections), 24 channels doubling up to 384,
group normalisation, leaky ReLU, trilinear upsampling followed by a 3x3x3 convolution instead of a
transposed convolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .architecture import PRESETS, UNetConfig, preset  # noqa: F401  (re-exported: the model API)


def _groups(channels: int, wanted: int) -> int:
    groups = min(wanted, channels)
    while channels % groups:
        groups -= 1
    return groups


class Conv3x3x3(nn.Conv3d):
    """A 3x3x3 convolution (padding 1, no bias) that runs in float32 under CPU bf16 autocast where an input
    side is shorter than the kernel.

    PyTorch 2.13's CPU bf16 convolution returns a non-finite weight gradient most of the time when the input's
    depth is 2 (it reads memory it never wrote: ``test_recipe.py`` shows it with a freed NaN buffer); the cpu
    preset's bottleneck is 2 x 3 x 2 voxels on a 32 x 48 x 32 patch. Such inputs hold a few dozen voxels: a
    cpu-preset bf16 step took 300 ms against 293 ms with the plain convolution (one thread, interleaved,
    under load; benchmarks/RESULTS.md). Weights and their names are those of ``nn.Conv3d``.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and min(x.shape[2:]) < 3:
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


class ConvNormAct(nn.Sequential):
    """3x3x3 convolution, group norm, leaky ReLU."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, slope: float) -> None:
        super().__init__(
            Conv3x3x3(in_channels, out_channels),
            nn.GroupNorm(_groups(out_channels, groups), out_channels),
            nn.LeakyReLU(slope, inplace=True),
        )


class DoubleConv(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, groups: int, slope: float) -> None:
        super().__init__(
            ConvNormAct(in_channels, out_channels, groups, slope),
            ConvNormAct(out_channels, out_channels, groups, slope),
        )


class UpBlock(nn.Module):
    """Trilinear x2 upsampling, a convolution, concatenation with the skip, then two convolutions."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, groups: int, slope: float) -> None:
        super().__init__()
        self.reduce = ConvNormAct(in_channels, out_channels, groups, slope)
        self.merge = DoubleConv(out_channels + skip_channels, out_channels, groups, slope)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
        return self.merge(torch.cat([skip, self.reduce(x)], dim=1))


class UNet3D(nn.Module):
    """Deep 3D UNet predicting one SDM channel per organ.

    Any input size is accepted: sizes that don't divide by ``2**depth`` are padded (edge-replicated)
    before the encoder and cropped back after the decoder.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        c, g, s = config, config.norm_groups, config.negative_slope
        self.encoders = nn.ModuleList(
            [DoubleConv(c.in_channels if level == 0 else c.channels(level - 1), c.channels(level), g, s) for level in range(c.depth + 1)]
        )
        self.decoders = nn.ModuleList(
            [UpBlock(c.channels(level + 1), c.channels(level), c.channels(level), g, s) for level in reversed(range(c.depth))]
        )
        self.head = nn.Conv3d(c.channels(0), c.out_channels, kernel_size=1)
        if c.heads == "dual":
            self.segmentation_head = nn.Conv3d(c.channels(0), c.out_channels, kernel_size=1)
        if c.sdm_branch:
            self.sdm_branch = nn.Sequential(
                ConvNormAct(c.channels(0), c.sdm_branch, g, s),
                ConvNormAct(c.sdm_branch, c.sdm_branch, g, s),
                nn.Conv3d(c.sdm_branch, c.out_channels, kernel_size=1),
            )
            nn.init.zeros_(self.sdm_branch[-1].weight)
            nn.init.zeros_(self.sdm_branch[-1].bias)

    def sdm_output_layers(self) -> list[nn.Conv3d]:
        """The 1x1x1 convolutions whose outputs sum to the SDM's pre-activation (``head``, and the branch's last)."""
        return [self.head] + ([self.sdm_branch[-1]] if self.config.sdm_branch else [])

    @property
    def size_multiple(self) -> int:
        return 2**self.config.depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = x.shape[2:]
        multiple = self.size_multiple
        pad = [(-size) % multiple for size in spatial]
        if any(pad):
            # F.pad lists the last axis first, as (before, after) pairs.
            x = F.pad(x, [p for size in reversed(pad) for p in (0, size)], mode="replicate")
        skips = []
        for level, encoder in enumerate(self.encoders):
            if level:
                x = F.max_pool3d(x, 2)
            x = encoder(x)
            skips.append(x)
        x = skips.pop()
        for decoder in self.decoders:
            x = decoder(x, skips.pop())
        features = x
        x = self.head(features)
        if self.config.sdm_branch:
            x = x + self.sdm_branch(features)
        if self.config.output_activation == "tanh":
            x = torch.tanh(x)
        if self.config.heads == "dual":
            x = torch.cat([x, self.segmentation_head(features)], dim=1)
        if any(pad):
            x = x[(...,) + tuple(slice(0, size) for size in spatial)]
        return x
