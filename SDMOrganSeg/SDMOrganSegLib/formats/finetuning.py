"""Fine-tuning: training that starts from a model's weights and keeps what makes the model what it is.

A fine-tuned model replaces its base wherever the base was used, so it keeps the base's organs (names,
label values, colours, terminology; the volume ranges are widened to cover the new labels), its network
(architecture and output activation) and its preprocessing (spacing, intensity normalisation, the
ground-truth SDM's normalisation, the Heaviside steepness k, the sliding window), and its modality.
Training settings (loss mode among those of the same output activation, epochs, learning rate, patch
size when the model infers on whole volumes, flips) may change; the learning rate defaults to
:data:`FINE_TUNING_LEARNING_RATE`, lower than training from scratch, so that a few corrected cases adjust
the model rather than overwrite it.

:func:`fine_tuning_settings` gives the :class:`~SDMOrganSegLib.engines.training.TrainingConfig` fields of a
fine-tuning run: the base card's, with the settings a user gave explicitly on top, and refuses in one line
explicit settings that contradict the base. The trainer checks the final configuration again
(:func:`contradictions`) and the data's organs (:func:`organs_for_data`). Nothing here needs PyTorch, so
the Slicer panel builds its request with it before any worker starts.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

from ..method.architecture import PRESETS, UNetConfig, heads_for, output_activation_for, preset
from ..common.errors import SDMOrganSegError
from .modelfiles import ModelCard, Organ, organ_key

#: Default learning rate of a fine-tuning run (training from scratch: 5e-4).
FINE_TUNING_LEARNING_RATE = 5e-6


def _preset_of(card: ModelCard) -> str:
    """The preset which, with the card's depth and channels as overrides, builds the card's network."""
    arch = card.architecture
    recorded = card.training.get("config", {}).get("preset")
    for name in ([recorded] if recorded in PRESETS else []) + sorted(PRESETS):
        built = _network(name, arch.depth, arch.base_channels, arch.max_channels, arch.output_activation, arch.out_channels, arch.heads)
        if dataclasses.replace(built, sdm_branch=arch.sdm_branch) == arch:
            return name
    raise SDMOrganSegError(
        f"the network of model {card.name} ({_describe_network(arch)}) is not one this trainer builds; it cannot be fine-tuned here"
    )


def _network(name: str, depth: int | None, base: int | None, largest: int | None, activation: str, organs: int, heads: str = "single") -> UNetConfig:
    overrides = {k: v for k, v in (("depth", depth), ("base_channels", base), ("max_channels", largest)) if v is not None}
    return preset(name, 1, organs, output_activation=activation, heads=heads, **overrides)


def _mode_of(arch: UNetConfig) -> str:
    """The loss mode a model's network was trained with, where its card does not say: dual for two heads,
    Dice-only for logits, the paper's sdm+dice otherwise."""
    return "dual" if arch.heads == "dual" else ("dice" if arch.output_activation == "none" else "sdm+dice")


def _describe_network(arch: UNetConfig) -> str:
    return f"depth {arch.depth}, {arch.base_channels}-{arch.max_channels} channels, {arch.out_channels} outputs"


def _sdm(card: ModelCard) -> dict[str, Any]:
    return dict(card.training.get("sdm") or {"normalization": "paper"})


def kept_settings(card: ModelCard) -> dict[str, Any]:
    """The settings a fine-tuning run takes from the base card and may not change (network, preprocessing)."""
    arch = card.architecture
    sdm = _sdm(card)
    kept: dict[str, Any] = {
        "preset": _preset_of(card), "depth": arch.depth, "base_channels": arch.base_channels, "max_channels": arch.max_channels,
        "spacing": tuple(float(s) for s in card.spacing) if card.spacing else None,
        "intensity": dict(card.intensity),
        "sdm_normalization": str(sdm.get("normalization", "paper")),
        "heaviside_k": float(card.heaviside_k),
        "sdm_branch": arch.sdm_branch,
        "sliding_window": card.window is not None,
        "modality": card.modality,
    }
    if kept["sdm_normalization"] != "paper":
        kept["sdm_scale_mm"] = float(sdm["scale_mm"])
    if card.window:
        kept["patch_size"] = tuple(int(v) for v in card.window)
    return kept


def default_settings(card: ModelCard) -> dict[str, Any]:
    """The settings a fine-tuning run takes from the base card unless given: :func:`kept_settings`, the base's
    loss mode and flips, its patch size and field of view, and the lower learning rate."""
    recorded = card.training.get("config", {})
    activation = card.architecture.output_activation
    mode = recorded.get("mode")
    if not mode or output_activation_for(mode) != activation or heads_for(mode) != card.architecture.heads:
        mode = _mode_of(card.architecture)
    defaults: dict[str, Any] = {
        "mode": mode, "learning_rate": FINE_TUNING_LEARNING_RATE, "flip": bool(recorded.get("flip", True)),
        "field_of_view": card.field_of_view,
    }
    if "patch_size" in recorded:  # None: whole volumes
        defaults["patch_size"] = tuple(int(v) for v in recorded["patch_size"]) if recorded["patch_size"] else None
    return {**defaults, **kept_settings(card)}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(a)), abs(float(b)))
    return a == b


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(_shown(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k}={_shown(v)}" for k, v in value.items())
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def sdm_head_rescalable(card: ModelCard, settings: Mapping[str, Any]) -> bool:
    """Whether a fine-tuning run may give ``card``'s model another ``--sdm-scale``: its SDM head ends in a tanh
    and learnt ``tanh(d / s)``, so dividing the head's last layer by ``s' / s`` makes it compute
    ``tanh(d / s')`` from the same features (:func:`sdm_head_rescale`), and training goes on from there."""
    kept = kept_settings(card)
    return (
        card.architecture.output_activation == "tanh" and kept["sdm_normalization"] == "tanh"
        and settings.get("sdm_normalization", "tanh") == "tanh" and "sdm_scale_mm" in settings
    )


def sdm_head_rescale(card: ModelCard, scale_mm: float) -> float:
    """The factor for the SDM head's last layer (weights and bias) of ``card``'s tanh model that moves its
    normalisation from ``tanh(d / s)`` to ``tanh(d / scale_mm)``: ``s / scale_mm``, exact in ``d``."""
    return float(kept_settings(card)["sdm_scale_mm"]) / float(scale_mm)


def contradictions(card: ModelCard, settings: Mapping[str, Any]) -> list[str]:
    """What in ``settings`` (TrainingConfig fields; missing ones are not checked) a fine-tuned model of
    ``card`` could not keep, as ``what: given (the model's: ...)``."""
    problems = []
    arch = card.architecture
    if any(key in settings for key in ("preset", "depth", "base_channels", "max_channels", "mode")):
        kept = kept_settings(card)
        mode = settings.get("mode") or _mode_of(arch)
        sizes = ("depth", "base_channels", "max_channels")
        # A preset given without sizes means the preset's sizes; no preset given, the model's.
        name, values = (settings["preset"], [settings.get(k) for k in sizes]) if settings.get("preset") else (kept["preset"], [settings.get(k, kept[k]) for k in sizes])
        built = _network(name, *values, output_activation_for(mode), len(card.organs), heads_for(mode))
        if built.output_activation != arch.output_activation:
            problems.append(f"mode {mode}: output activation {built.output_activation} (the model's: {arch.output_activation})")
        elif built.heads != arch.heads:
            problems.append(f"mode {mode}: {built.heads} output head(s) (the model's: {arch.heads})")
        if dataclasses.replace(built, output_activation=arch.output_activation, heads=arch.heads, sdm_branch=arch.sdm_branch) != arch:
            problems.append(f"network: {_describe_network(built)} (the model's: {_describe_network(arch)})")
    branch = settings.get("sdm_branch")
    if branch is not None and branch != arch.sdm_branch and (arch.sdm_branch or arch.output_activation != "tanh"):
        # A branch may be added (it starts at zero: the same outputs), not changed or removed, and only to an SDM head.
        problems.append(
            f"SDM branch: {branch} channels (the model's: {arch.sdm_branch or 'none'}"
            + (", and a Dice-only model has no SDM head to add one to)" if arch.output_activation != "tanh" else ")")
        )
    kept = kept_settings(card)
    checked = ("spacing", "intensity", "sdm_normalization", "sdm_scale_mm", "heaviside_k", "modality")
    if settings.get("reset_sdm_head"):
        if arch.heads != "dual":
            problems.append(f"--reset-sdm-head: the model has {arch.heads} output head(s), not a dual model's separate SDM head")
        else:
            checked = tuple(key for key in checked if not key.startswith("sdm_"))  # the new head learns the new normalisation
    elif sdm_head_rescalable(card, settings):
        checked = tuple(key for key in checked if key != "sdm_scale_mm")  # the head is rescaled exactly (sdm_head_rescale)
    for key in checked:
        if key in settings and key in kept and not _same(settings[key], kept[key]):
            if key == "modality" and settings[key] is None:
                continue  # not stated: the model's
            problems.append(f"{key.replace('_', ' ')}: {_shown(settings[key])} (the model's: {_shown(kept[key])})")
    if "sliding_window" in settings and bool(settings["sliding_window"]) != kept["sliding_window"]:
        problems.append(
            f"sliding window: {'on' if settings['sliding_window'] else 'off'} (the model's: "
            f"{'windows of ' + _shown(card.window) if card.window else 'whole volumes'})"
        )
    elif card.window and "patch_size" in settings and not _same(settings["patch_size"], kept["patch_size"]):
        problems.append(f"patch: {_shown(settings['patch_size'])} (the model infers in windows of {_shown(card.window)})")
    return problems


def refuse_contradictions(card: ModelCard, settings: Mapping[str, Any]) -> None:
    """One line naming every contradiction of :func:`contradictions`, if any."""
    problems = contradictions(card, settings)
    if problems:
        raise SDMOrganSegError(
            f"fine-tuning model {card.name} keeps its network and preprocessing, and these settings differ: {'; '.join(problems)}; "
            "leave them out to take the model's, or train from scratch"
        )


def fine_tuning_settings(card: ModelCard, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """TrainingConfig fields of a run that fine-tunes ``card``'s model: :func:`default_settings` with the
    explicitly ``given`` ones on top, refused in one line when they contradict the model."""
    given = dict(given or {})
    refuse_contradictions(card, given)
    return {**default_settings(card), **given}


def organs_for_data(card: ModelCard, names: Mapping[int, str], source: str) -> list[Organ]:
    """The base model's organs for training data whose label values are named ``names``: each organ of the
    model, with the same label value, matched by name (case, spaces, ``_`` and ``-`` ignored)."""
    by_key = {organ_key(organ.name): organ for organ in card.organs}
    found = {value: by_key.get(organ_key(name)) for value, name in names.items()}
    unknown = [f"{value}: {names[value]}" for value, organ in sorted(found.items()) if organ is None]
    moved = [f"{names[value]} is {value}" for value, organ in sorted(found.items()) if organ is not None and organ.label != value]
    missing = [organ.name for organ in card.organs if organ not in found.values()]
    if unknown or moved or missing:
        problems = (
            ([f"unknown {', '.join(unknown)}"] if unknown else []) + ([f"other values ({', '.join(moved)})"] if moved else [])
            + ([f"missing {', '.join(missing)}"] if missing else [])
        )
        expected = ", ".join(f"{organ.label}: {organ.name}" for organ in card.organs)
        raise SDMOrganSegError(
            f"the organs of {source} are not those of model {card.name} ({'; '.join(problems)}); fine-tuning needs its organs "
            f"with its label values ({expected}): rename them, or train from scratch"
        )
    return list(card.organs)


def base_model_record(card: ModelCard, folder: str | Path) -> dict[str, Any]:
    """What a fine-tuned model's card records of its base (``training["base_model"]``)."""
    record: dict[str, Any] = {"name": card.name, "folder": str(folder), "weights_sha256": card.weights_sha256}
    dice = {organ: values["dice"]["mean"] for organ, values in (card.metrics.get("per_organ") or {}).items() if "dice" in values}
    if dice:
        record["validation_dice"] = dice
    elif "validation_mean_dice" in card.metrics:
        record["validation_mean_dice"] = card.metrics["validation_mean_dice"]
    return record
