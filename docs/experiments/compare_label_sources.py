"""A dual model's label map from its segmentation head or from its SDM head's zero level, on its validation split.

    .venv/bin/python docs/experiments/compare_label_sources.py MODEL_DIR --data ../shared/data/openkbp-hn [--cache RUN/cache]

Both label maps come from the same network outputs (the SDM head's zero level is the paper's Heaviside
segmentation); the script prints per organ the mean Dice and median HD95 of each, and the paired Wilcoxon
signed-rank test between them over the cases where the organ was annotated, to decide a card's
``inference.labels_from``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy.stats import wilcoxon

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "SDMOrganSeg"))

from SDMOrganSegLib.engines.training import evaluate_model_on_split  # noqa: E402
from SDMOrganSegLib.formats.modelfiles import load_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a dual model folder")
    parser.add_argument("--data", type=Path, required=True, help="the data folder of the model's split")
    parser.add_argument("--cache", type=Path, help="a training run's cache/ of the same data and settings (saves preparing the cases)")
    args = parser.parse_args()
    model = load_model(args.model, runtime="torch")
    results = {}
    for source in ("segmentation", "sdm"):
        model.card.inference["labels_from"] = source
        results[source], _ = evaluate_model_on_split(model, args.data, args.cache, "cpu")
    print("| organ | cases | Dice (segmentation head) | Dice (SDM zero level) | p | HD95 median (seg) | HD95 median (SDM) |")
    print("|---|---|---|---|---|---|---|")
    means = {source: [] for source in results}
    for organ in model.card.organ_names:
        seg, sdm = (np.asarray(results[s][organ]["dice"]) for s in ("segmentation", "sdm"))
        p = wilcoxon(seg, sdm).pvalue if np.any(seg != sdm) else 1.0
        hd = [np.nanmedian(results[s][organ]["hd95"]) for s in ("segmentation", "sdm")]
        means["segmentation"].append(seg.mean())
        means["sdm"].append(sdm.mean())
        print(f"| {organ} | {len(seg)} | {seg.mean():.3f} | {sdm.mean():.3f} | {p:.3g} | {hd[0]:.2f} | {hd[1]:.2f} |")
    print(f"| mean of organs | | {np.mean(means['segmentation']):.3f} | {np.mean(means['sdm']):.3f} | | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
