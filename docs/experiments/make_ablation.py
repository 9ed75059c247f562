"""Tables and figures of docs/ablation.md from the four finished runs in runs/ablation/.

    python docs/experiments/make_ablation.py [--runs runs/ablation] [--data ../shared/data/hippocampus] [--case NAME] [--prefix ablation_]

``--runs`` holds one run folder (or a link to one) per mode: dice, sdm, l1+dice, sdm+dice. The figures'
file names start with ``--prefix`` (``recipe_`` for the four modes on the final recipe).

Reads each run's best/model.json (metrics written by `sdmorganseg train --finalize`), prints the Table 1
style markdown, and writes docs/figures/: ablation_curves.png (validation Dice per epoch of the four runs),
ablation_contours.png (paper Fig. 5 style: ground truth and each model's level-0 contour on an axial slice)
and ablation_sdm_levels.png (paper Fig. 4 style: SDM iso-contours 0, 0.1, 0.2, 0.3).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[2]  # this file is docs/experiments/<name>.py
sys.path.insert(0, str(REPO / "SDMOrganSeg"))

from SDMOrganSegLib.images.contours import DEFAULT_LEVELS, LEVEL_COLORS  # noqa: E402
from SDMOrganSegLib.engines.inference import segment_image  # noqa: E402
from SDMOrganSegLib.formats.modelfiles import load_model  # noqa: E402
from SDMOrganSegLib.method.sdm import label_map_to_sdms  # noqa: E402

MODES = ["dice", "sdm", "l1+dice", "sdm+dice"]
MODE_COLORS = {"dice": "tab:blue", "sdm": "gold", "l1+dice": "tab:purple", "sdm+dice": "lime"}
PAPER_TABLE1 = {  # Xue et al. 2020, Table 1 (their hippocampus CT data, 12 test cases)
    "dice": "0.840 ± 0.025; 23.568 ± 17.811; 1.989 ± 1.596; 0.414 ± 0.153",
    "sdm": "0.757 ± 0.065; 8.076 ± 4.650; 3.393 ± 3.303; 0.714 ± 0.466",
    "sdm+dice": "0.843 ± 0.032; 5.400 ± 1.895; 1.747 ± 1.270; 0.345 ± 0.130",
}


def table(runs: Path) -> str:
    lines = ["| training | organ | Dice | HD (mm) | HD95 (mm) | ASD (mm) | paper Table 1 (Dice, HD, HD95, ASD) |", "|---|---|---|---|---|---|---|"]
    for mode in MODES:
        card = json.loads((runs / mode / "best" / "model.json").read_text())
        per_organ = card["metrics"]["per_organ"]
        for index, (organ, metrics) in enumerate(per_organ.items()):
            cells = []
            for name in ("dice", "hd", "hd95", "asd"):
                m = metrics[name]
                cell = f"{m['mean']:.3f} ± {m['std']:.3f}"
                if m.get("n_infinite"):
                    cell += f" ({m['n_infinite']} empty)"
                cells.append(cell)
            paper = PAPER_TABLE1.get(mode, "—") if index == 0 else ""
            lines.append(f"| {mode if index == 0 else ''} | {organ} | " + " | ".join(cells) + f" | {paper} |")
    return "\n".join(lines)


def curves(runs: Path, out: Path) -> None:
    figure, axis = plt.subplots(figsize=(6, 3.6))
    for mode in MODES:
        rows = [r for r in csv.DictReader((runs / mode / "log.csv").open()) if r.get("val_mean_dice")]
        axis.plot([int(r["epoch"]) for r in rows], [float(r["val_mean_dice"]) for r in rows], marker="o", ms=3, label=mode, color=MODE_COLORS[mode])
    axis.set_xlabel("epoch"), axis.set_ylabel("validation mean Dice (40 cases)"), axis.set_ylim(0, 1), axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)


def _slice_of(image: sitk.Image, z: int) -> np.ndarray:
    return sitk.GetArrayFromImage(image)[z]


def figures(runs: Path, data: Path, case: str, out_dir: Path, prefix: str = "ablation_") -> None:
    image = sitk.ReadImage(str(data / "imagesTr" / f"{case}.nii.gz"))
    labels = sitk.ReadImage(str(data / "labelsTr" / f"{case}.nii.gz"))
    label_array = np.rint(sitk.GetArrayFromImage(labels)).astype(int)
    z = int(np.argmax((label_array > 0).sum(axis=(1, 2))))
    background = _slice_of(image, z)
    results = {mode: segment_image(image, load_model(runs / mode / "best"), "cpu") for mode in MODES}

    # Figure 5 style: ground truth (red) and each model's segmentation contour.
    figure, axis = plt.subplots(figsize=(4.5, 5))
    axis.imshow(background, cmap="gray")
    axis.contour(label_array[z] > 0, levels=[0.5], colors="red", linewidths=2)
    for mode, result in results.items():
        axis.contour(sitk.GetArrayFromImage(result.labels)[z] > 0, levels=[0.5], colors=MODE_COLORS[mode], linewidths=1.2)
    handles = [plt.Line2D([], [], color=c, label=l) for l, c in [("ground truth", "red")] + [(m, MODE_COLORS[m]) for m in MODES]]
    axis.legend(handles=handles, loc="lower left", fontsize=7)
    axis.set_title(f"{case}, axial slice {z}: both labels")
    axis.axis("off")
    figure.tight_layout()
    figure.savefig(out_dir / f"{prefix}contours.png", dpi=100)
    plt.close(figure)

    # Figure 4 style: SDM of the anterior label with iso-contours, ground truth vs predictions.
    truth = label_map_to_sdms(label_array, [1], labels.GetSpacing())[0]
    panels = [("image", None), ("ground-truth SDM", truth)] + [(f"{m} SDM", sitk.GetArrayFromImage(next(iter(results[m].sdms.values())))) for m in ("sdm", "sdm+dice", "dice")]
    figure, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.6))
    for axis, (title, sdm) in zip(axes, panels):
        if sdm is None:
            axis.imshow(background, cmap="gray")
        else:
            axis.imshow(np.clip(sdm[z], -1, 1), cmap="gray", vmin=-1, vmax=1)
            for level in DEFAULT_LEVELS:
                axis.contour(sdm[z], levels=[level], colors=[LEVEL_COLORS[level]], linewidths=1.2)
        axis.set_title(title, fontsize=9)
        axis.axis("off")
    figure.suptitle("anterior hippocampus: SDM iso-contours 0 (red), 0.1 (orange), 0.2 (yellow), 0.3 (green)", fontsize=9)
    figure.tight_layout()
    figure.savefig(out_dir / f"{prefix}sdm_levels.png", dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=str(REPO / "runs" / "ablation"))
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "hippocampus"))
    parser.add_argument("--case", default="hippocampus_003", help="validation case for the figures")
    parser.add_argument("--prefix", default="ablation_", help="start of the figure file names")
    args = parser.parse_args()
    runs, out_dir = Path(args.runs), REPO / "docs" / "figures"
    out_dir.mkdir(parents=True, exist_ok=True)
    print(table(runs))
    curves(runs, out_dir / f"{args.prefix}curves.png")
    figures(runs, Path(args.data), args.case, out_dir, args.prefix)
    print(f"figures written to {out_dir}")


if __name__ == "__main__":
    main()
