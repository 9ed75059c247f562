"""Architecture settings of the UNet, free of PyTorch.

Model cards store a :class:`UNetConfig`; reading a card (in the Slicer panel before PyTorch is installed,
or to refuse a bad model folder quickly) must not need PyTorch, so the settings live apart from
:mod:`SDMOrganSegLib.method.network`, which builds the layers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


#: Output heads of a :class:`UNetConfig` (training mode ``dual`` uses two).
HEADS = ("single", "dual")


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a :class:`UNet3D`; stored in each model card so the weights can be rebuilt."""

    in_channels: int = 1
    out_channels: int = 1
    depth: int = 6  #: number of downsamplings (the paper uses 6)
    base_channels: int = 24  #: channels at full resolution, doubled at each level
    max_channels: int = 384  #: cap on the doubling
    norm_groups: int = 8  #: group-norm groups (reduced where a layer has fewer channels)
    negative_slope: float = 0.01  #: leaky ReLU slope
    output_activation: str = "tanh"  #: "tanh" for SDM models, "none" for Dice-only logits
    #: "single": one output per organ (an SDM, or a Dice-only logit); "dual": an SDM head (tanh) and a
    #: segmentation head (logits) on the same decoder, output as the organs' SDMs then the organs' logits.
    heads: str = "single"
    #: Channels of the SDM branch (0: none): two 3x3x3 convolutions on the last decoder features and a 1x1x1
    #: convolution whose output is added to the SDM head's, before the tanh. It gives the SDM features of its
    #: own, apart from those the segmentation head reads; see :class:`SDMOrganSegLib.method.network.UNet3D`.
    sdm_branch: int = 0

    def __post_init__(self) -> None:
        if self.heads not in HEADS:
            raise ValueError(f"unknown heads {self.heads!r}; choose one of {', '.join(HEADS)}")
        if not (isinstance(self.sdm_branch, int) and self.sdm_branch >= 0):
            raise ValueError(f"the SDM branch's channels must be a whole number >= 0, not {self.sdm_branch!r}")

    @property
    def output_channels(self) -> int:
        """Channels of the network's output: one per organ, or two (SDM, then logit) for dual heads."""
        return self.out_channels * (2 if self.heads == "dual" else 1)

    def channels(self, level: int) -> int:
        return min(self.base_channels * 2**level, self.max_channels)

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        if not self.sdm_branch:  # cards without a branch stay readable by versions that predate it
            del values["sdm_branch"]
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "UNetConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown architecture fields {sorted(unknown)}")
        return cls(**values)


#: Named architectures: the paper's and one small enough to train on two CPU cores within an hour.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(depth=6, base_channels=24, max_channels=384),
    "cpu": dict(depth=4, base_channels=8, max_channels=64),
}


def preset(name: str, in_channels: int = 1, out_channels: int = 1, **overrides: Any) -> UNetConfig:
    """A :class:`UNetConfig` from :data:`PRESETS` with the given channel counts."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return UNetConfig(in_channels=in_channels, out_channels=out_channels, **{**PRESETS[name], **overrides})


def output_activation_for(mode: str) -> str:
    """The network's (SDM head's) output activation for a training mode: logits for Dice-only, tanh SDM otherwise."""
    return "none" if mode == "dice" else "tanh"


def heads_for(mode: str) -> str:
    """The output heads a training mode trains: two for ``dual``, one otherwise."""
    return "dual" if mode == "dual" else "single"


#: Where a dual model's label map comes from (its card's ``inference["labels_from"]``): the segmentation head
#: (the default), or the SDM head's zero level, the paper's Heaviside, so that the red 0 iso-contour is the
#: label map's boundary by construction.
LABEL_SOURCES = ("segmentation", "sdm")


def split_heads(output: Any, architecture: UNetConfig, labels_from: str = "segmentation") -> tuple[Any, Any]:
    """The SDM channels and the channels the label map is made from, of a network output ``(channels, ...)``
    (numpy or torch): the same channels for single-head models; for dual heads, the SDM head's and the
    segmentation head's (both negative inside, see :func:`SDMOrganSegLib.method.sdm.sdms_to_label_map`), or
    the SDM head's twice with ``labels_from="sdm"`` (:data:`LABEL_SOURCES`)."""
    if labels_from not in LABEL_SOURCES:
        raise ValueError(f"unknown label source {labels_from!r}; choose one of {', '.join(LABEL_SOURCES)}")
    organs = architecture.out_channels
    if architecture.heads == "dual":
        sdm = output[:organs]  # one object for both roles, so callers see that the label map needs no second resampling
        return sdm, sdm if labels_from == "sdm" else output[organs:]
    return output, output
