"""Fine-tuning the shipped hippocampus model, measured (issue 15, item 5; figures in the README).

    python docs/experiments/finetune_hippocampus.py --data ../shared/data/hippocampus --work runs/finetune [--lr LR] [--epochs 5]

Two fine-tuning runs of ``Resources/Models/hippocampus`` with ``sdmorganseg train --init hippocampus`` and
its defaults (learning rate 5e-6 unless ``--lr``), on the first 10 training cases of
``Resources/Splits/hippocampus.json``, one thread:

- ``original``: the cases' own labels. Fine-tuning should not lower the model's validation Dice by more
  than 0.01.
- ``grown``: each organ of every label map grown by one voxel (6-neighbourhood) into the background, a
  systematic shift such as another site's contouring habit. Fine-tuning should move the predictions toward
  the grown labels: larger, covering more of the one-voxel shell the labels gained, closer to the grown
  labels in Dice and farther from the original ones.

Both runs validate after every epoch on the split's 40 validation cases, so ``log.csv`` holds the validation
Dice of every epoch; the figures below are of ``last/`` (the last epoch's weights), which no selection on
those cases has touched (``best/`` is chosen on them, the base model included, so it cannot be worse there).
Everything is measured on the 40 validation cases at the model spacing, the base model the same way.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]  # this file is docs/experiments/<name>.py
sys.path.insert(0, str(REPO / "SDMOrganSeg"))


def grown_copy(data: Path, folder: Path, cases: list[str]) -> Path:
    """``cases`` of ``data`` with every organ grown by one voxel (images linked, label maps rewritten)."""
    import SimpleITK as sitk
    from scipy import ndimage

    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "labels.json").write_text((data / "labels.json").read_text())
    for case in cases:
        image = folder / "imagesTr" / f"{case}.nii.gz"
        if not image.exists():
            image.symlink_to((data / "imagesTr" / f"{case}.nii.gz").resolve())
        source = sitk.ReadImage(str(data / "labelsTr" / f"{case}.nii.gz"))
        labels = sitk.GetArrayFromImage(source).astype(np.uint8)
        grown = labels.copy()
        for value in (1, 2):
            grown[(grown == 0) & ndimage.binary_dilation(labels == value)] = value
        out = sitk.GetImageFromArray(grown)
        out.CopyInformation(source)
        sitk.WriteImage(out, str(folder / "labelsTr" / f"{case}.nii.gz"), True)
    return folder


def predictions(model_dir: Path, cases) -> list[np.ndarray]:
    import torch

    from SDMOrganSegLib.engines.inference import predict_array
    from SDMOrganSegLib.formats.modelfiles import load_model
    from SDMOrganSegLib.method.sdm import sdms_to_label_map

    torch.set_num_threads(1)
    model = load_model(model_dir)
    return [sdms_to_label_map(predict_array(model.network, case.image, torch.device("cpu")), model.card.label_values) for case in cases]


def dice(prediction: np.ndarray, reference: np.ndarray, value: int) -> float:
    a, b = prediction == value, reference == value
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else 1.0


def measure(model_dir: Path, cases, originals: list[np.ndarray], grown: list[np.ndarray]) -> dict[str, float]:
    """Mean over organs and the cases of Dice against the original and the grown labels, the predicted
    volume (voxels), and the share of the grown labels' one-voxel shell predicted as the organ."""
    found = predictions(model_dir, cases)
    rows = []
    for prediction, original, larger in zip(found, originals, grown):
        for value in (1, 2):
            shell = (larger == value) & (original != value)
            rows.append([
                dice(prediction, original, value), dice(prediction, larger, value), float((prediction == value).sum()),
                float((prediction[shell] == value).mean()),
            ])
    means = np.mean(rows, axis=0)
    return {"dice_original": means[0], "dice_grown": means[1], "volume_voxels": means[2], "shell_covered": means[3]}


def train(data: Path, out: Path, split: Path, epochs: int, lr: float | None) -> None:
    command = [
        sys.executable, "-m", "SDMOrganSegLib.cli", "train", str(data), "--out", str(out), "--init", "hippocampus", "--split", str(split),
        "--epochs", str(epochs), "--validate-every", "1", "--threads", "1", "--device", "cpu",
    ] + (["--lr", str(lr)] if lr else [])
    subprocess.run(command, check=True, cwd=REPO / "SDMOrganSeg")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "hippocampus")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "finetune")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: fine-tuning's, 5e-6)")
    args = parser.parse_args()

    import SimpleITK as sitk

    from SDMOrganSegLib.formats.dataset import find_cases, load_cases
    from SDMOrganSegLib.formats.modelfiles import read_card, resolve_model

    shipped = json.loads((REPO / "Resources" / "Splits" / "hippocampus.json").read_text())
    split = {"train": shipped["train"][:10], "validation": shipped["validation"]}
    tag = f"lr{args.lr:g}" if args.lr else "default"
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / "split.json").write_text(json.dumps(split, indent=1) + "\n")
    grown_data = grown_copy(args.data.resolve(), work / "grown-data", split["train"] + split["validation"])
    for name, data in (("original", args.data.resolve()), ("grown", grown_data)):
        train(data, work / f"{name}-{tag}", work / "split.json", args.epochs, args.lr)

    card = read_card(resolve_model("hippocampus"))
    by_name = {case.name: case for case in find_cases(grown_data)}
    cases = load_cases([by_name[name] for name in split["validation"]], card.label_values, card.intensity, card.spacing, None)
    grown = [case.labels for case in cases]
    originals = [sitk.GetArrayFromImage(sitk.ReadImage(str(args.data / "labelsTr" / f"{case.name}.nii.gz"))).astype(np.uint8) for case in cases]
    base = measure(resolve_model("hippocampus"), cases, originals, grown)
    print(f"\n40 validation cases; fine-tuned {args.epochs} epochs on 10 cases, learning rate {args.lr or 'default (5e-6)'}")
    print("| model | Dice vs original labels | Dice vs grown labels | predicted volume (voxels) | grown shell covered |")
    print("|---|---|---|---|---|")
    for label, model_dir in (("base (shipped)", resolve_model("hippocampus")), ("fine-tuned on original labels", work / f"original-{tag}" / "last"),
                             ("fine-tuned on grown labels", work / f"grown-{tag}" / "last")):
        values = base if model_dir == resolve_model("hippocampus") else measure(model_dir, cases, originals, grown)
        print(f"| {label} | {values['dice_original']:.4f} | {values['dice_grown']:.4f} | {values['volume_voxels']:.0f} | {values['shell_covered']:.3f} |")
    for name in ("original", "grown"):
        with open(work / f"{name}-{tag}" / "log.csv", newline="") as handle:
            trajectory = [f"{int(row['epoch'])}: {float(row['val_mean_dice']):.4f}" for row in csv.DictReader(handle)]
        print(f"validation Dice per epoch ({name} labels, against them): {', '.join(trajectory)}")


if __name__ == "__main__":
    main()
