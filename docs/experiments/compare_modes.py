"""Tables of issue 19, item 4: dice, sdm+dice and dual on the hippocampus at one budget, three seeds.

    python docs/experiments/compare_modes.py [--runs runs/compare] [--data ../shared/data/hippocampus] [--no-agreement]
    python docs/experiments/compare_modes.py --campaign DIR   # the runs of docs/gpu/campaign.py, unpacked in DIR

Reads each finished run's ``best/model.json`` (``train --finalize --tta`` stores the validation metrics per case
there; ``compare_modes_cpu.sh`` trains the runs) and prints markdown:

* per mode and organ, Dice, HD95 and ASD: the mean over the seeds of each seed's mean over the 40 cases, ± the
  standard deviation over the seeds;
* paired two-sided Wilcoxon tests between the modes, over the cases, each case averaged over the seeds
  (as in docs/ablation.md);
* for every dual run, the Dice between its segmentation head's organ mask and its SDM head's zero level on
  the validation cases (with the card's test-time augmentation), the agreement that makes its iso-contours
  describe the segmentation shown beside them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "SDMOrganSeg"))

from experiments import wilcoxon_p  # noqa: E402  (docs/experiments/experiments.py, beside this script)

MODES = ["dice", "sdm", "dual"]
METRICS = ["dice", "hd95", "asd"]


def load_runs(runs_dir: Path) -> dict[str, dict[int, dict]]:
    """mode -> seed -> card metrics, for the runs whose best model was evaluated (``--finalize``)."""
    found: dict[str, dict[int, dict]] = {}
    for card_path in sorted(runs_dir.glob("*-s*/best/model.json")):
        mode, seed = card_path.parent.parent.name.rsplit("-s", 1)
        metrics = json.loads(card_path.read_text()).get("metrics", {})
        if "per_case" in metrics:
            found.setdefault(mode, {})[int(seed)] = metrics
    return found


def load_campaign(campaign_dir: Path) -> dict[str, dict[int, dict]]:
    """The same from a GPU campaign's results (``docs/gpu/campaign.py``): ``runs/hippo-MODE-sSEED/metrics.json``,
    with TTA where the run was evaluated with it, and the SDM head's agreement measured there."""
    found: dict[str, dict[int, dict]] = {}
    for path in sorted(campaign_dir.glob("runs/hippo-*-s[0-9]/metrics.json")):
        mode, seed = path.parent.name.removeprefix("hippo-").rsplit("-s", 1)
        record = json.loads(path.read_text())
        evaluated = record.get("tta", record["plain"])
        found.setdefault(mode, {})[int(seed)] = {
            "per_case": evaluated["per_case"], "epoch": record["card_metrics"].get("epoch"), "budget": record["budget"],
            "agreement": record.get("sdm_head_vs_segmentation_dice"),
        }
    return found


def case_values(records: dict[int, dict], seeds: list[int], organ: str, metric: str) -> np.ndarray:
    """Per case, the metric averaged over ``seeds`` (all runs share the fixed validation split and its order)."""
    return np.mean([np.asarray(records[s]["per_case"][organ][metric], float) for s in seeds], axis=0)


def summary_table(runs: dict[str, dict[int, dict]]) -> str:
    organs = list(next(iter(next(iter(runs.values())).values()))["per_case"])
    header = "| mode | seeds | " + " | ".join(f"{organ} {m}" for organ in organs for m in ("Dice", "HD95 (mm)", "ASD (mm)")) + " |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for mode in [m for m in MODES if m in runs]:
        cells = []
        for organ in organs:
            for metric in METRICS:
                per_seed = [float(np.nanmean(runs[mode][s]["per_case"][organ][metric])) for s in sorted(runs[mode])]
                spread = f" ± {np.std(per_seed):.3f}" if len(per_seed) > 1 else ""
                cells.append(f"{np.mean(per_seed):.3f}{spread}")
        lines.append(f"| {mode} | {','.join(map(str, sorted(runs[mode])))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(runs: dict[str, dict[int, dict]]) -> str:
    organs = list(next(iter(next(iter(runs.values())).values()))["per_case"])
    lines = ["| pair (a vs b) | seeds | organ | Dice a - b | p | HD95 a - b (mm) | p |", "|---|---|---|---|---|---|---|"]
    present = [m for m in MODES if m in runs]
    for i, a in enumerate(present):
        for b in present[i + 1:]:
            seeds = sorted(set(runs[a]) & set(runs[b]))
            if not seeds:
                continue
            for organ in organs:
                row = []
                for metric in ("dice", "hd95"):
                    va, vb = case_values(runs[a], seeds, organ, metric), case_values(runs[b], seeds, organ, metric)
                    finite = np.isfinite(va) & np.isfinite(vb)
                    row += [f"{np.mean(va[finite] - vb[finite]):+.4f}", f"{wilcoxon_p(va, vb):.2g}"]
                lines.append(f"| {a} vs {b} | {','.join(map(str, seeds))} | {organ} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def head_agreement(runs_dir: Path, data_dir: Path, seeds: list[int]) -> str:
    """Dice between a dual model's segmentation-head mask and its SDM head's zero level, per organ."""
    import SimpleITK as sitk

    from SDMOrganSegLib.formats.dataset import find_cases
    from SDMOrganSegLib.engines.inference import segment_image
    from SDMOrganSegLib.formats.modelfiles import load_model

    lines = ["| run | organ | Dice(segmentation head, SDM < 0): mean | min |", "|---|---|---|---|"]
    cases = {case.name: case for case in find_cases(data_dir)}
    for seed in seeds:
        folder = runs_dir / f"dual-s{seed}" / "best"
        model = load_model(folder)
        names = model.card.metrics["case_names"]
        scores: dict[str, list[float]] = {organ.name: [] for organ in model.card.organs}
        for name in names:
            result = segment_image(sitk.ReadImage(str(cases[name].image)), model, device="cpu", tta=bool(model.card.metrics.get("tta")))
            labels = sitk.GetArrayFromImage(result.labels)
            for organ in model.card.organs:
                zero_level = sitk.GetArrayFromImage(result.sdms[organ.name]) < 0
                mask = labels == organ.label
                total = int(mask.sum() + zero_level.sum())
                scores[organ.name].append(2.0 * int((mask & zero_level).sum()) / total if total else 1.0)
        for organ, values in scores.items():
            lines.append(f"| dual-s{seed} | {organ} | {np.mean(values):.4f} | {np.min(values):.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "compare")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "hippocampus")
    parser.add_argument("--no-agreement", action="store_true", help="skip the dual models' head agreement (it segments the validation cases)")
    parser.add_argument("--campaign", type=Path, help="read a GPU campaign's unpacked results instead of --runs")
    args = parser.parse_args()
    if args.campaign:
        runs = load_campaign(args.campaign)
        for mode, records in runs.items():
            budgets = [records[s]["budget"] for s in sorted(records)]
            print(f"- {mode}: best epochs {[records[s]['epoch'] for s in sorted(records)]}, steps to them {[b['steps'] for b in budgets]}, "
                  f"{budgets[0]['precision']}, {min(b['steps_per_s'] for b in budgets)}-{max(b['steps_per_s'] for b in budgets)} steps/s ({budgets[0]['machine']})"
                  + (f"; SDM head vs segmentation Dice {[{o[:4]: round(v, 3) for o, v in records[s]['agreement'].items()} for s in sorted(records)]}" if records[min(records)]["agreement"] else ""))
        print()
        print(summary_table(runs))
        print()
        print(paired_table(runs))
        return
    runs = load_runs(args.runs)
    if not runs:
        raise SystemExit(f"no finished runs in {args.runs}: train them with docs/experiments/compare_modes_cpu.sh")
    for mode, records in runs.items():
        card = json.loads((args.runs / f"{mode}-s{min(records)}" / "best" / "model.json").read_text())
        training = card["training"]
        print(f"- {mode}: best epochs {[records[s].get('epoch') for s in sorted(records)]}, precision {training.get('precision')}, "
              f"{training.get('steps')} steps to the best epoch of seed {min(records)} in {training.get('training_time_s')} s "
              f"({training.get('steps_per_s')} steps/s, {training.get('machine')})")
    print()
    print(summary_table(runs))
    print()
    print(paired_table(runs))
    if "dual" in runs and not args.no_agreement:
        print()
        print(head_agreement(args.runs, args.data, sorted(runs["dual"])))


if __name__ == "__main__":
    main()
