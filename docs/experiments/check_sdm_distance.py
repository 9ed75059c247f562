"""Is a candidate model's SDM output a distance? The check that decides whether a head-and-neck model ships.

For each case and each organ its label map holds (>= 30 voxels), it prints the share of voxels inside that the
SDM calls negative, of those outside it calls positive, and the rank correlation of the SDM with the signed
distance from the label map's surface, within the band where the card's normalisation is not clipped: the
quantities of ``Testing/Python/conftest.assert_sdm_is_a_distance`` (bars 0.95, 0.95, 0.9), computed the same
way, so that a run's model folder can be judged before it is shipped.

    .venv/bin/python docs/experiments/check_sdm_distance.py runs/hn/dual-sdm10/best [--cases hn_235 hn_226]
    .venv/bin/python docs/experiments/check_sdm_distance.py runs/hn/dual-eik/best --checkpoint runs/hn/dual-eik/checkpoint.pt

``--checkpoint`` judges a running training's latest epoch: the weights of its ``checkpoint.pt`` in the
network of the model folder's card (the run's own ``best/``). ``--labels-from sdm`` judges a dual model as if
its card took the label map from the SDM head's zero level (``inference.labels_from``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.stats import spearmanr

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "SDMOrganSeg"))

from SDMOrganSegLib.engines.inference import segment_image  # noqa: E402
from SDMOrganSegLib.formats.modelfiles import load_model  # noqa: E402
from SDMOrganSegLib.method.sdm import signed_distance_mm  # noqa: E402


def distance_figures(sdm: np.ndarray, mask: np.ndarray, spacing, scale_mm: float) -> tuple[float, float, float]:
    distance = signed_distance_mm(mask, spacing)
    voxel = max(spacing)
    band = np.abs(distance) <= scale_mm - voxel
    inside, outside = band & (distance <= -voxel), band & (distance >= voxel)
    correlation = float(spearmanr(sdm[band], distance[band]).statistic)
    return float(np.mean(sdm[inside] < 0)), float(np.mean(sdm[outside] > 0)), correlation


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a model folder (a run's best/ or last/)")
    parser.add_argument("--data", type=Path, default=REPO / "Testing" / "Data" / "openkbp-hn")
    parser.add_argument("--checkpoint", type=Path, help="a run's checkpoint.pt, whose weights replace the folder's")
    parser.add_argument("--cases", nargs="+", default=["hn_235", "hn_226"])
    parser.add_argument("--labels-from", choices=["segmentation", "sdm"], help="override the card's inference.labels_from")
    args = parser.parse_args()
    model = load_model(args.model)
    if args.labels_from:
        model.card.inference["labels_from"] = args.labels_from
    if args.checkpoint:
        import torch

        state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        model.network.load_state_dict(state["network"])
        print(f"weights of epoch {state['epoch']} ({args.checkpoint})")
    scale = model.card.training["sdm"]["scale_mm"]
    passed = True
    for case in args.cases:
        image = sitk.ReadImage(str(args.data / "imagesTr" / f"{case}.nii.gz"))
        result = segment_image(image, model, "cpu")
        labels = sitk.GetArrayFromImage(result.labels)
        for organ in model.card.organs:
            mask = labels == organ.label
            if mask.sum() < 30:
                print(f"{case} {organ.name:14s} too small to judge ({mask.sum()} voxels)")
                continue
            sdm = sitk.GetArrayFromImage(result.sdms[organ.name])
            negative, positive, correlation = distance_figures(sdm, mask, image.GetSpacing(), scale)
            ok = negative >= 0.95 and positive >= 0.95 and correlation >= 0.9
            passed &= ok
            print(f"{case} {organ.name:14s} inside<0 {negative:.3f}  outside>0 {positive:.3f}  rank {correlation:.3f}  {'ok' if ok else 'FAIL'}")
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
