"""Training and fine-tuning from the panel: from corrected segmentations in the scene (or a data folder) to
a model folder, in the background.

The steps, all behind :func:`prepare_training` and :class:`TrainingRun`:

1. The run folder (the user's output folder) must be new, empty or an earlier run of this trainer (which is
   then resumed: the trainer refuses in one line to resume with other settings).
2. Training data from the scene: each (volume, segmentation) pair becomes a case of a training folder in
   the run folder (``data/``: ``imagesTr/``, ``labelsTr/``, ``labels.json``), the label map exported on the
   volume's own grid. Segments are mapped to the organs by name (case, spaces, ``_`` and ``-`` ignored);
   a segment that names no organ is refused in one line before anything is written. An organ that a
   segmentation has no segment for is *not contoured* there (``annotations.json``: no loss for it), an
   empty segment means the organ is absent. Files are rewritten only when their content changed, so that
   a resumed run keeps its cache. From a folder: our layout, nnU-Net v2 or MSD, as ``sdmorganseg train``.
3. The starting point: a model (shipped or a folder) to fine-tune, whose organs, network and preprocessing
   are kept (:mod:`.finetuning`), or scratch with a preset (organs from the segment names).
4. :class:`TrainingRun` runs the trainer in a worker process (:mod:`.background`, the same wrapper as
   segmentation); its progress (epoch, loss, validation Dice, ETA) is read from the run's ``log.csv``
   (:func:`read_training_progress`) and its curves from ``curves.png``. Cancel stops the worker between
   epochs (or kills it after a grace period: every checkpoint is written atomically), keeping the last
   checkpoint; starting the same run folder again resumes. When it is done the best validation model is
   measured on the validation cases (Dice, HD, HD95, ASD into its card) and its folder, ``best/``, is the
   result.

Nothing here imports PyTorch, and ``slicer`` only inside the functions that need the scene.
"""

from __future__ import annotations

import csv
import filecmp
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from .background import LOG, BackgroundProcess, Report
from ..common.errors import CancelCheck, CancelledError, SDMOrganSegError
from ..common.files import safe_name, write_text_atomic
from ..formats.modelfiles import organ_key

#: Where the scene's cases are written, inside the run folder.
DATA_FOLDER = "data"
#: The worker's output (the trainer's messages), appended to in the run folder.
TRAINING_LOG = "training.log"
#: Names an earlier run may have left in a run folder (the trainer's outputs and the scene's data).
RUN_FOLDER_NAMES = frozenset({DATA_FOLDER, TRAINING_LOG, "split.json", "checkpoint.pt", "log.csv", "curves.png", "cache", "best", "last"})
#: Starting points that train from scratch, as ``SCRATCH + preset``.
SCRATCH = "scratch:"
#: At least one case to train on and one to validate on.
MINIMUM_CASES = 2
CANCELLED = "cancelled by the user; the checkpoint of the last finished epoch is kept: start the same run folder again to resume"


# --- the run folder and the data ----------------------------------------------------------------------------


def training_mode_of(start: str) -> str | None:
    """The loss mode a fine-tuning of ``start`` (a shipped name or a model folder) takes by default: the one
    its network was trained with (a dual model keeps its two heads, a Dice-only one its logits); None for
    ``scratch:<preset>`` or a model that cannot be read (the training will say why)."""
    from ..formats.finetuning import default_settings
    from ..formats.modelfiles import read_card, resolve_model

    if not start or start.startswith(SCRATCH):
        return None
    try:
        return default_settings(read_card(resolve_model(start)))["mode"]
    except SDMOrganSegError:
        return None


def can_resume(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a checkpoint that training there would continue from."""
    return bool(str(run_dir).strip()) and (Path(run_dir) / "checkpoint.pt").is_file()


def check_run_folder(run_dir: str | Path) -> Path:
    """``run_dir`` as a Path, refused in one line unless it is new, empty or an earlier training run."""
    text = str(run_dir).strip()
    if text in ("", "."):
        raise SDMOrganSegError("choose an output folder for the training run")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise SDMOrganSegError(f"output folder {path} is a file; choose a folder")
    if path.is_dir():
        others = sorted(p.name for p in path.iterdir() if p.name not in RUN_FOLDER_NAMES and not p.name.startswith("."))
        if others:
            listed = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise SDMOrganSegError(
                f"output folder {path} holds other files ({listed}); choose a new or empty folder, or the folder of an earlier training run to resume it"
            )
    return path


def scene_organs(pairs: Sequence[tuple[Any, Any]]) -> dict[int, str]:
    """Organs to train from scratch on the scene's pairs: each segment name (matched ignoring case, spaces,
    ``_`` and ``-``) in the order of first appearance, as label values 1, 2, ..."""
    from .mrmlscene import segment_ids

    names: dict[str, str] = {}
    for _volume, segmentation in pairs:
        if segmentation is None:
            continue
        content = segmentation.GetSegmentation()
        for segment_id in segment_ids(content):
            name = content.GetSegment(segment_id).GetName()
            names.setdefault(organ_key(name), name)
    if not names:
        raise SDMOrganSegError("the chosen segmentations have no segments; segment the organs first")
    return {value: name for value, name in enumerate(names.values(), start=1)}


def _case_names(volumes: Sequence[Any]) -> list[str]:
    names: list[str] = []
    for volume in volumes:
        base = safe_name(volume.GetName())
        name, number = base, 2
        while name in names:
            name, number = f"{base}_{number}", number + 1
        names.append(name)
    return names


def _write_if_changed(image: sitk.Image, path: Path) -> None:
    """Write ``image`` to ``path`` unless the file there already holds exactly these bytes (so a resumed
    run's cache, keyed by file times, stays valid); replaced atomically otherwise."""
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as temporary:
        candidate = Path(temporary) / path.name
        sitk.WriteImage(image, str(candidate), useCompression=True)
        if path.is_file() and filecmp.cmp(candidate, path, shallow=False):
            return
        os.replace(candidate, path)


def export_training_folder(
    pairs: Sequence[tuple[Any, Any]], organs: Mapping[int, str], folder: str | Path, scene: Any = None, prune: bool = False,
) -> list[str]:
    """Write the scene's (volume, segmentation) pairs as a training folder (see the module's docstring);
    returns the case names. With ``prune``, cases of the folder that are not among the pairs (an earlier
    export's) are removed. The scene is left as it was (temporary label maps are removed)."""
    from .mrmlmetrics import export_labelmap
    from .mrmlscene import removed_on_failure, segment_ids, slicer_module, volume_node_to_sitk

    scene = scene if scene is not None else slicer_module().mrmlScene
    if len(pairs) < MINIMUM_CASES:
        raise SDMOrganSegError(
            f"training needs at least {MINIMUM_CASES} volume + segmentation pairs (cases to train on and to validate on); add another pair"
        )
    by_key = {organ_key(name): (int(value), name) for value, name in organs.items()}
    listed = ", ".join(organs.values())
    # Every pair is checked before anything is written.
    for volume, segmentation in pairs:
        if volume is None or segmentation is None or not scene.IsNodePresent(volume) or not scene.IsNodePresent(segmentation):
            raise SDMOrganSegError("a training pair's volume or segmentation is no longer in the scene; remove the pair and add it again")
        content = segmentation.GetSegmentation()
        for segment_id in segment_ids(content):
            name = content.GetSegment(segment_id).GetName()
            if organ_key(name) not in by_key:
                raise SDMOrganSegError(
                    f"segment {name!r} of {segmentation.GetName()!r} is none of the organs ({listed}); rename it to one of them or delete it"
                )
    folder = Path(folder)
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    names = _case_names([volume for volume, _ in pairs])
    contoured: dict[str, list[str]] = {}
    with removed_on_failure(scene, keep=False):
        for (volume, segmentation), case in zip(pairs, names):
            image = volume_node_to_sitk(volume)
            ids = segment_ids(segmentation.GetSegmentation())
            values = [by_key[organ_key(segmentation.GetSegmentation().GetSegment(i).GetName())][0] for i in ids]
            exported = export_labelmap(segmentation, ids, volume, scene)[0] if ids else np.zeros(image.GetSize()[::-1], np.uint8)
            if exported.shape != image.GetSize()[::-1]:
                raise SDMOrganSegError(f"the segmentation {segmentation.GetName()!r} could not be put on the grid of {volume.GetName()!r}")
            labels = np.zeros(exported.shape, np.uint8 if max(organs, default=0) < 256 else np.uint16)
            for index, value in enumerate(values):
                labels[exported == index + 1] = value
            label_image = sitk.GetImageFromArray(labels)
            label_image.CopyInformation(image)
            _write_if_changed(image, folder / "imagesTr" / f"{case}.nii.gz")
            _write_if_changed(label_image, folder / "labelsTr" / f"{case}.nii.gz")
            contoured[case] = [name for value, name in organs.items() if value in values]
    if prune:
        for stale in [p for sub in ("imagesTr", "labelsTr") for p in (folder / sub).iterdir() if p.name not in {f"{n}.nii.gz" for n in names}]:
            stale.unlink()
    write_text_atomic(folder / "labels.json", json.dumps({"labels": {str(value): name for value, name in sorted(organs.items())}}, indent=1) + "\n", True)
    annotations = folder / "annotations.json"
    if any(len(present) < len(organs) for present in contoured.values()):
        write_text_atomic(annotations, json.dumps(contoured, indent=1) + "\n", True)
    elif annotations.is_file():
        annotations.unlink()
    return names


# --- the request ------------------------------------------------------------------------------------------------


def prepare_training(
    run_dir: str | Path, start: str, mode: str, epochs: int, device: str = "auto", *, data_dir: str | Path | None = None,
    pairs: Sequence[tuple[Any, Any]] | None = None, scene: Any = None, threads: int | None = None,
) -> dict[str, Any]:
    """The TrainingConfig fields of a panel run, after writing the scene's ``pairs`` (or with ``data_dir``)
    as its data; ``start`` is ``scratch:<preset>`` or a model (shipped name or folder) to fine-tune."""
    from ..formats.finetuning import fine_tuning_settings
    from ..formats.modelfiles import read_card, resolve_model

    run_dir = check_run_folder(run_dir)
    if epochs < 1:
        raise SDMOrganSegError("the number of epochs must be at least 1")
    card = None if start.startswith(SCRATCH) else read_card(resolve_model(start))
    if (pairs is None) == (data_dir is None):
        raise SDMOrganSegError("choose the training data: a data folder or volume + segmentation pairs of the scene")
    if pairs is not None:
        organs = {organ.label: organ.name for organ in card.organs} if card is not None else scene_organs(pairs)
        data_dir = run_dir / DATA_FOLDER
        # A new run trains on exactly these pairs; a run under way keeps the cases its split names.
        export_training_folder(pairs, organs, data_dir, scene, prune=not (run_dir / "split.json").is_file())
    else:
        from ..formats.dataset import check_case_headers, find_cases, read_label_names
        from ..formats.finetuning import organs_for_data

        check_case_headers(find_cases(data_dir))
        names = read_label_names(data_dir)
        if names is None:
            raise SDMOrganSegError(f"{data_dir} has no labels.json (or dataset.json) naming the organs; add {{\"labels\": {{\"1\": \"organ\"}}}}")
        if card is not None:
            organs_for_data(card, names, str(data_dir))
    fields: dict[str, Any] = {
        "data_dir": str(data_dir), "out_dir": str(run_dir), "epochs": int(epochs), "mode": mode, "device": device, "threads": threads,
        # A point on the live curve every few epochs: about ten on a long run, every epoch on a short one.
        "validate_every": max(1, min(5, int(epochs) // 10)), "model_name": run_dir.name,
        "command": "SDM Organ Segmentation panel (3D Slicer)",
    }
    if card is None:
        fields["preset"] = start[len(SCRATCH):]
    else:
        fields.update(fine_tuning_settings(card, {"mode": mode}), init_model=str(resolve_model(start)))
    return fields


# --- progress ---------------------------------------------------------------------------------------------------


def _number(text: Any) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


@dataclass
class TrainingProgress:
    """Where a run stands, from its ``log.csv``."""

    epoch: int  #: the last finished epoch (0: none yet)
    epochs: int
    loss: float | None  #: training loss of that epoch
    validation_dice: float | None  #: mean validation Dice of the last validation
    validated_epoch: int | None
    best_dice: float | None  #: best mean validation Dice of a trained epoch
    base_dice: float | None  #: the base model's, before fine-tuning (epoch 0)
    eta_s: float | None

    @property
    def fraction(self) -> float:
        return min(max(self.epoch / self.epochs, 0.0), 1.0) if self.epochs else 0.0

    def describe(self) -> str:
        """``Epoch 7/20: loss -5.81, validation Dice 0.861 (epoch 5; best 0.866; before fine-tuning 0.885), about 3 min left``."""
        parts = [f"Epoch {self.epoch}/{self.epochs}"]
        details = []
        if self.loss is not None:
            details.append(f"loss {self.loss:.4f}")
        if self.validation_dice is not None:
            notes = [f"epoch {self.validated_epoch}"] if self.validated_epoch not in (None, self.epoch) else []
            notes += [f"best {self.best_dice:.3f}"] if self.best_dice is not None else []
            notes += [f"before fine-tuning {self.base_dice:.3f}"] if self.base_dice is not None else []
            details.append(f"validation Dice {self.validation_dice:.3f}" + (f" ({'; '.join(notes)})" if notes else ""))
        if self.eta_s is not None and self.epoch < self.epochs:
            details.append(f"about {_duration(self.eta_s)} left")
        return parts[0] + (": " + ", ".join(details) if details else "")


def _duration(seconds: float) -> str:
    minutes = int(round(seconds / 60))
    if minutes < 1:
        return "1 min" if seconds > 30 else f"{max(int(round(seconds)), 1)} s"
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def read_training_progress(run_dir: str | Path, epochs: int) -> TrainingProgress | None:
    """The progress of the run in ``run_dir`` (to ``epochs``), None before its first log line."""
    try:
        with open(Path(run_dir) / "log.csv", newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except OSError:
        return None
    if not rows:
        return None
    last = rows[-1]
    validated = [(int(row["epoch"]), _number(row.get("val_mean_dice"))) for row in rows if _number(row.get("val_mean_dice")) is not None]
    trained = [dice for epoch, dice in validated if epoch > 0]
    base = [dice for epoch, dice in validated if epoch == 0]
    return TrainingProgress(
        epoch=int(last["epoch"]), epochs=int(epochs), loss=_number(last.get("loss")),
        validation_dice=validated[-1][1] if validated else None, validated_epoch=validated[-1][0] if validated else None,
        best_dice=max(trained) if trained else None, base_dice=base[0] if base else None, eta_s=_number(last.get("eta_s")),
    )


# --- the background run -----------------------------------------------------------------------------------------


class TrainingRun(BackgroundProcess):
    """A training run (the fields of a TrainingConfig, e.g. from :func:`prepare_training`) in a worker
    process; :meth:`result` gives the model folder and its validation metrics once it is done."""

    job = "train"
    what = "the training process"
    cancelled_message = CANCELLED

    def __init__(self, config: Mapping[str, Any], python: str | None = None, env: Mapping[str, str] | None = None, workdir: str | Path | None = None) -> None:
        self.config = dict(config)
        super().__init__({"config": self.config}, python, env, workdir)

    @property
    def run_dir(self) -> Path:
        return Path(self.config["out_dir"])

    def training_progress(self) -> TrainingProgress | None:
        return read_training_progress(self.run_dir, int(self.config["epochs"]))

    def result(self) -> dict[str, Any]:
        """``model_dir`` (the best validation model's folder), ``summary`` (its validation metrics) and
        ``epoch`` (the epoch it is from; 0: the base model, when no fine-tuned epoch validated better)."""
        return self.result_values()

    def cleanup(self) -> None:
        """As :meth:`BackgroundProcess.cleanup`, after keeping the worker's output in the run folder's training.log."""
        if self.workdir is not None and (self.workdir / LOG).is_file() and self.run_dir.is_dir():
            try:
                with open(self.run_dir / TRAINING_LOG, "ab") as kept:
                    kept.write((self.workdir / LOG).read_bytes())
            except OSError:
                pass  # the log is a convenience; the run's own outputs are complete without it
        super().cleanup()


def _config_fields(values: Mapping[str, Any]) -> dict[str, Any]:
    """TrainingConfig fields from JSON (which has turned tuples into lists)."""
    fields = dict(values)
    for key in ("patch_size", "spacing"):
        if isinstance(fields.get(key), list):
            fields[key] = tuple(fields[key])
    return fields


def run_job(folder: Path, request: Mapping[str, Any], report: Report, cancel: CancelCheck) -> dict[str, Any]:
    """The worker's side of :class:`TrainingRun`: train (or resume), then measure the best model."""
    from ..engines.training import Trainer, TrainingConfig, finalize_best_model

    config = TrainingConfig(**_config_fields(request["config"]))
    run_dir = Path(config.out_dir)

    def stop_if_cancelled() -> None:
        if cancel():
            raise CancelledError(CANCELLED)

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)
        stop_if_cancelled()  # between epochs the last checkpoint is complete: stopping here loses no finished epoch
        progress = read_training_progress(run_dir, config.epochs)
        report(progress.fraction if progress else 0.0, text, now=True)

    best = Trainer(config, progress=say).run()
    stop_if_cancelled()
    report(1.0, "measuring the best model on the validation cases", now=True)
    summary = finalize_best_model(run_dir, config.data_dir, config.device)
    from ..formats.modelfiles import read_card

    # Epoch 0: no fine-tuned epoch validated better than the base model, whose weights best/ then holds.
    return {"model_dir": str(best), "run_dir": str(run_dir), "summary": summary, "epoch": read_card(best).metrics.get("epoch")}
