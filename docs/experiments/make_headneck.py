"""Tables and figures of docs/headneck.md from two head-and-neck CT runs (a Dice-only and an SDM one).

    python docs/experiments/experiments.py evaluate runs/hn/dice-ce runs/hn/sdm+dice-ce --data ../shared/data/openkbp-hn
    python docs/experiments/make_headneck.py [--runs runs/hn] [--compare dice-ce sdm+dice-ce] [--data ...] [--case hn_201]

Reads each run's ``eval.json`` (per-case metrics on the 32 validation cases, organs only where annotated)
and ``log.csv``; prints the per-organ table with the paper's Table 2/3 figures beside it and the paired
Wilcoxon p-values, and writes docs/figures/headneck_curves.png and headneck_case.png (axial and coronal
slices of one validation case: ground truth and each model's organs, the SDM iso-contours of the
sdm+dice model).
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
sys.path.insert(0, str(REPO / "docs" / "experiments"))  # experiments.py, beside this file

from experiments import wilcoxon_p  # noqa: E402
from SDMOrganSegLib.images.contours import DEFAULT_LEVELS, LEVEL_COLORS  # noqa: E402
from SDMOrganSegLib.engines.inference import segment_image  # noqa: E402
from SDMOrganSegLib.formats.modelfiles import load_model  # noqa: E402

RUNS = ["dice-ce", "sdm+dice-ce"]  #: the compared runs, baseline first (--compare)
RUN_STYLE = {"dice-ce": "tab:blue", "sdm+dice-ce": "tab:green", "dice": "tab:gray", "sdm+dice": "tab:olive", "sdm+dice-clip20-k15": "tab:orange"}
#: Xue et al. 2020, Tables 2 and 3 (MICCAI 2015 / PDDCA test set, about 1 mm voxels): (Dice, HD95 mm) of
#: their backbone trained with Dice only and with SDM + Dice.
PAPER = {
    "brainstem": {"dice": ("0.902 ± 0.076", "1.81 ± 1.10"), "sdm+dice": ("0.883 ± 0.065", "2.29 ± 1.48")},
    "mandible": {"dice": ("0.957 ± 0.018", "0.60 ± 0.49"), "sdm+dice": ("0.940 ± 0.032", "1.14 ± 0.31")},
    "left parotid": {"dice": ("0.893 ± 0.073", "1.91 ± 1.16"), "sdm+dice": ("0.883 ± 0.056", "2.32 ± 1.32")},
    "right parotid": {"dice": ("0.888 ± 0.092", "3.27 ± 3.66"), "sdm+dice": ("0.880 ± 0.065", "2.46 ± 1.56")},
}
GOAL_ORGANS = ("brainstem", "spinal cord", "right parotid", "left parotid", "mandible")


def _finite(values) -> np.ndarray:
    array = np.asarray(values, float)
    return array[np.isfinite(array)]


def _cell(values) -> str:
    finite = _finite(values)
    infinite = len(values) - finite.size
    text = f"{finite.mean():.3f} ± {finite.std():.3f}" if finite.size else "—"
    return text + (f" ({infinite} empty)" if infinite else "")


def _mode(run: str) -> str:
    """The paper's row a run compares with: its Dice-only or its SDM + Dice model."""
    return "sdm+dice" if run.startswith("sdm") else "dice"


def table(runs: Path) -> str:
    evaluations = {run: json.loads((runs / run / "eval.json").read_text()) for run in RUNS if (runs / run / "eval.json").is_file()}
    organs = list(evaluations[RUNS[0]]["per_case"])
    lines = [
        "| organ | cases | training | Dice | HD (mm) | HD95 (mm) | ASD (mm) | p Dice / p HD95 (vs dice) | paper Dice; HD95 (PDDCA, ~1 mm) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    goal = {run: [] for run in evaluations}
    for organ in organs:
        for index, run in enumerate(evaluations):
            metrics = evaluations[run]["per_case"][organ]
            cells = [_cell(metrics[m]) for m in ("dice", "hd", "hd95", "asd")]
            p = "—"
            if index:
                reference = evaluations[RUNS[0]]["per_case"][organ]
                p = " / ".join(f"{wilcoxon_p(np.asarray(metrics[m], float), np.asarray(reference[m], float)):.2g}" for m in ("dice", "hd95"))
            paper = "; ".join(PAPER[organ][_mode(run)]) if organ in PAPER else ""
            lines.append(f"| {organ if index == 0 else ''} | {len(metrics['dice']) if index == 0 else ''} | {run} | " + " | ".join(cells) + f" | {p} | {paper} |")
            if organ in GOAL_ORGANS:
                goal[run].append(float(np.mean(metrics["dice"])))
    lines.append("")
    for run in evaluations:
        lines.append(f"- {run}: mean Dice over {', '.join(GOAL_ORGANS)} = {np.mean(goal[run]):.3f} (lowest {min(goal[run]):.3f}); epoch {evaluations[run]['epoch']}")
    return "\n".join(lines)


def validation_table(runs: Path) -> str:
    """Validation Dice per organ at each validated epoch of the compared runs (from their log.csv)."""
    lines = []
    for run in RUNS:
        rows = [r for r in csv.DictReader((runs / run / "log.csv").open()) if r.get("val_mean_dice")]
        organs = [k[len("val_dice_"):] for k in rows[0] if k.startswith("val_dice_")] if rows else []
        if not lines:
            lines += ["| training | epoch | " + " | ".join(organs) + " | mean of 7 | mean of the goal's 5 |", "|---" * (len(organs) + 4) + "|"]
        for r in rows:
            values = [float(r[f"val_dice_{o}"]) for o in organs]
            goal = np.mean([float(r[f"val_dice_{o}"]) for o in GOAL_ORGANS])
            lines.append(f"| {run} | {r['epoch']} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {float(r['val_mean_dice']):.3f} | {goal:.3f} |")
    return "\n".join(lines)


def curves(runs: Path, out: Path) -> None:
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for run in RUNS:
        if not (runs / run / "log.csv").is_file():
            continue
        rows = list(csv.DictReader((runs / run / "log.csv").open()))
        validated = [r for r in rows if r.get("val_mean_dice")]
        left.plot([int(r["epoch"]) for r in rows], [float(r["loss"]) / float(rows[0]["loss"]) for r in rows], label=run, color=RUN_STYLE[run])
        right.plot([int(r["epoch"]) for r in validated], [float(r["val_mean_dice"]) for r in validated], marker="o", label=f"{run}: mean of 7", color=RUN_STYLE[run])
        for organ, style in (("brainstem", ":"), ("mandible", "--")):
            right.plot([int(r["epoch"]) for r in validated], [float(r[f"val_dice_{organ}"]) for r in validated], style, color=RUN_STYLE[run], alpha=0.6, label=f"{run}: {organ}")
    left.set_xlabel("epoch"), left.set_ylabel("training loss / first epoch's"), left.legend(), left.grid(alpha=0.3)
    right.set_xlabel("epoch"), right.set_ylabel("validation Dice (32 cases, annotated organs)"), right.set_ylim(0, 1)
    right.legend(fontsize=7), right.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)


def case_figure(runs: Path, data: Path, case: str, out: Path) -> None:
    image = sitk.ReadImage(str(data / "imagesTr" / f"{case}.nii.gz"))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "labelsTr" / f"{case}.nii.gz")))
    annotated = set(json.loads((data / "annotations.json").read_text())[case])
    models = {run: load_model(runs / run / "best") for run in RUNS}
    results = {run: segment_image(image, model, "cpu") for run, model in models.items()}
    organs = models[RUNS[-1]].card.organs
    array = sitk.GetArrayFromImage(image)
    parotid = [o.label for o in organs if "parotid" in o.name]
    z = int(np.argmax(np.isin(truth, parotid).sum(axis=(1, 2))))  # axial slice through the parotids
    y = int(np.argmax(np.isin(truth, [o.label for o in organs if o.name in ("brainstem", "spinal cord")]).sum(axis=(0, 2))))
    sx, sy, sz = image.GetSpacing()
    views = [("axial", lambda a: a[z], sy / sx, f"z = {z}"), ("coronal", lambda a: a[::-1, y], sz / sx, f"y = {y}")]
    columns = [("ground truth", truth, None)] + [(run, sitk.GetArrayFromImage(results[run].labels), results[run]) for run in RUNS]
    figure, axes = plt.subplots(2, len(columns) + 1, figsize=(3.6 * (len(columns) + 1), 7.4))
    for row, (view, cut, aspect, where) in enumerate(views):
        for column, (title, labels, result) in enumerate(columns):
            axis = axes[row, column]
            axis.imshow(np.clip(cut(array), -250, 350), cmap="gray", aspect=aspect)
            for organ in organs:
                mask = cut(labels) == organ.label
                if mask.any():
                    axis.contour(mask, levels=[0.5], colors=[organ.color], linewidths=1.3)
            axis.set_title(f"{title} ({view}, {where})", fontsize=9)
            axis.axis("off")
        # SDM iso-contours of the sdm+dice model: every organ's 0, 0.1, 0.2, 0.3 levels.
        axis = axes[row, -1]
        axis.imshow(np.clip(cut(array), -250, 350), cmap="gray", aspect=aspect)
        for organ in organs:
            sdm = cut(sitk.GetArrayFromImage(results[RUNS[-1]].sdms[organ.name]))
            if sdm.min() < 0.3:
                for level in DEFAULT_LEVELS:
                    axis.contour(sdm, levels=[level], colors=[LEVEL_COLORS[level]], linewidths=0.9)
        axis.set_title(f"{RUNS[-1]} SDM levels 0 / 0.1 / 0.2 / 0.3", fontsize=9)
        axis.axis("off")
    handles = [plt.Line2D([], [], color=o.color, label=o.name) for o in organs]
    handles += [plt.Line2D([], [], color=LEVEL_COLORS[level], label=f"SDM {level:g}") for level in DEFAULT_LEVELS]
    figure.legend(handles=handles, loc="lower center", ncol=6, fontsize=8)
    missing = [o.name for o in organs if o.name not in annotated]
    figure.suptitle(f"validation case {case}" + (f" (not contoured in the clinical data: {', '.join(missing)})" if missing else ""), fontsize=10)
    figure.tight_layout(rect=(0, 0.06, 1, 0.97))
    figure.savefig(out, dpi=90)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=str(REPO / "runs" / "hn"))
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "openkbp-hn"))
    parser.add_argument("--case", default="hn_201", help="validation case for the figure")
    parser.add_argument("--compare", nargs=2, default=RUNS, metavar=("BASELINE", "OTHER"), help="run folder names (default %(default)s)")
    args = parser.parse_args()
    RUNS[:] = args.compare
    runs, out_dir = Path(args.runs), REPO / "docs" / "figures"
    out_dir.mkdir(parents=True, exist_ok=True)
    print(validation_table(runs) + "\n")
    if all((runs / run / "eval.json").is_file() for run in RUNS):
        print(table(runs))
    curves(runs, out_dir / "headneck_curves.png")
    case_figure(runs, Path(args.data), args.case, out_dir / "headneck_case.png")
    print(f"figures written to {out_dir}")


if __name__ == "__main__":
    main()
