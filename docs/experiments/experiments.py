"""Controlled training experiments: evaluate finished runs per case, then compare configurations.

    python docs/experiments/experiments.py evaluate RUN [RUN ...] --data DATA [--tta] [--largest-component]
    python docs/experiments/experiments.py compare RUNS_DIR --baseline NAME [--tta] [--markdown FILE]

``evaluate`` scores each run's ``best/`` model on its card's validation split (Dice, HD, HD95, ASD per
organ and case, partial labels honoured) and writes ``RUN/eval.json`` (``RUN/eval-tta.json`` with mirroring
test-time augmentation). ``compare`` groups the runs of ``RUNS_DIR`` by configuration (the folder name
without its ``-sN`` seed suffix), averages each case's metric over the seeds of a configuration, and tests
each configuration against the baseline with the Wilcoxon signed-rank test over the validation cases
(two-sided, paired by case; scipy.stats.wilcoxon). A difference is called real only when p < 0.05.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]  # this file is docs/experiments/<name>.py
sys.path.insert(0, str(REPO / "SDMOrganSeg"))

METRICS = ("dice", "hd", "hd95", "asd")


def evaluate(runs: list[Path], data: Path, tta: bool, largest_component: bool = False) -> None:
    from SDMOrganSegLib.formats.modelfiles import load_model
    from SDMOrganSegLib.engines.training import annotated_case_names, evaluate_model_on_split

    for run in runs:
        model = load_model(run / "best")
        results, prepared = evaluate_model_on_split(model, data, run / "cache", "cpu", tta, largest_component=largest_component)
        names = annotated_case_names(prepared, model.card.organs)
        record = {
            "run": run.name,
            "epoch": model.card.metrics.get("epoch") or model.card.training.get("epochs_trained"),
            "tta": tta,
            "largest_component": largest_component,
            "per_case": {organ: {m: [float(v) for v in values] for m, values in metrics.items()} for organ, metrics in results.items()},
            "case_names": names,
        }
        target = run / ("eval" + ("-tta" if tta else "") + ("-lcc" if largest_component else "") + ".json")
        target.write_text(json.dumps(record) + "\n")
        means = {organ: round(float(np.mean(m["dice"])), 4) for organ, m in results.items() if m["dice"]}
        print(f"{run.name}: epoch {record['epoch']}, Dice {means}", flush=True)


def _configuration(name: str) -> tuple[str, int]:
    match = re.fullmatch(r"(.+)-s(\d+)", name)
    return (match.group(1), int(match.group(2))) if match else (name, 0)


def load_evaluations(runs_dir: Path, tta: bool) -> dict[str, dict[int, dict]]:
    """``{configuration: {seed: eval record}}`` of the evaluated runs in ``runs_dir``."""
    found: dict[str, dict[int, dict]] = defaultdict(dict)
    for path in sorted(runs_dir.glob("*/eval-tta.json" if tta else "*/eval.json")):
        configuration, seed = _configuration(path.parent.name)
        found[configuration][seed] = json.loads(path.read_text())
    return dict(found)


def case_means(records: dict[int, dict], organ: str, metric: str) -> tuple[list[str], np.ndarray]:
    """Per case, the metric averaged over the seeds (cases in the order of the first record)."""
    first = next(iter(records.values()))
    names = first["case_names"][organ]
    values = np.mean([np.asarray(r["per_case"][organ][metric], float) for r in records.values()], axis=0)
    return names, values


def wilcoxon_p(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import wilcoxon

    finite = np.isfinite(a) & np.isfinite(b)
    if not np.any(a[finite] != b[finite]):
        return 1.0
    return float(wilcoxon(a[finite], b[finite]).pvalue)


def compare(runs_dir: Path, baseline: str, tta: bool) -> str:
    evaluations = load_evaluations(runs_dir, tta)
    if baseline not in evaluations:
        raise SystemExit(f"no evaluated runs of the baseline {baseline!r} in {runs_dir} (have: {sorted(evaluations)})")
    organs = list(evaluations[baseline][next(iter(evaluations[baseline]))]["per_case"])
    header = "| configuration | seeds | " + " | ".join(f"{o} Dice | {o} HD95 (mm)" for o in organs) + " | p (Dice) | p (HD95) |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for configuration, records in sorted(evaluations.items(), key=lambda item: item[0] != baseline):
        cells, p_dice, p_hd95 = [], [], []
        for organ in organs:
            for metric, p_list in (("dice", p_dice), ("hd95", p_hd95)):
                _, values = case_means(records, organ, metric)
                per_seed = [float(np.mean(np.asarray(r["per_case"][organ][metric])[np.isfinite(r["per_case"][organ][metric])])) for r in records.values()]
                spread = f" ± {np.std(per_seed):.3f}" if len(per_seed) > 1 else ""
                cells.append(f"{np.mean(per_seed):.3f}{spread}")
                if configuration != baseline:
                    _, reference = case_means(evaluations[baseline], organ, metric)
                    p_list.append(f"{wilcoxon_p(values, reference):.2g}")
        seeds = ",".join(str(s) for s in sorted(records))
        lines.append(f"| {configuration} | {seeds} | " + " | ".join(cells) + f" | {' / '.join(p_dice) or '—'} | {' / '.join(p_hd95) or '—'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    ev = commands.add_parser("evaluate")
    ev.add_argument("runs", nargs="+", type=Path)
    ev.add_argument("--data", type=Path, required=True)
    ev.add_argument("--tta", action="store_true")
    ev.add_argument("--largest-component", action="store_true", help="keep each organ's largest component first (eval[-tta]-lcc.json)")
    cmp = commands.add_parser("compare")
    cmp.add_argument("runs_dir", type=Path)
    cmp.add_argument("--baseline", required=True)
    cmp.add_argument("--tta", action="store_true")
    cmp.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    if args.command == "evaluate":
        evaluate(args.runs, args.data, args.tta, args.largest_component)
    else:
        text = compare(args.runs_dir, args.baseline, args.tta)
        print(text)
        if args.markdown:
            args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
