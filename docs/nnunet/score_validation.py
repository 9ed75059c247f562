"""Score label maps of the OpenKBP validation cases with `sdmorganseg evaluate --ignore-unannotated`, and compare
two of them per organ with the paired Wilcoxon signed-rank test (docs/headneck.md, "nnU-Net on the same CPU
budget").

    python docs/nnunet/score_validation.py --data ../shared/data/openkbp-hn \
        --pred headneck-oar=/work/nnunet_data/ours/{case}/labels.nii.gz \
        --pred nnU-Net=/work/nnunet_data/pred/{case}.nii.gz \
        --work /work/nnunet_data/scores --csv docs/nnunet/validation_per_case.csv --markdown docs/nnunet/validation_table.md

``--scored CSV`` adds the rows of methods this script scored before (an earlier --csv), as they are, where
their predictions are no longer at hand; they join the table after the --pred methods.

Each --pred is NAME=PATTERN, {case} standing for the case name (hn_201, ...). Every prediction is scored on the
reference's own grid (the data as distributed, not a model grid) by the evaluate command itself, which writes
WORK/NAME/CASE.json; an organ not contoured in a case (annotations.json) is not scored. The CSV holds one row per
method, case and scored organ; the table gives per organ the mean Dice, the median HD95 over the cases where the
organ was predicted at all (how many were empty), and the two-sided Wilcoxon p-values of the first method
against each other one, paired by case: Dice over all scored cases (an empty prediction has Dice 0), HD95 over
the cases where both predicted the organ (HD95 of an empty prediction is infinite, which has no rank).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "SDMOrganSeg"))

METRICS = ("dice", "hd", "hd95", "asd")


def parse_pred(text: str) -> tuple[str, str]:
    name, sep, pattern = text.partition("=")
    if not sep or not name or "{case}" not in pattern:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=PATTERN with {{case}} in PATTERN, e.g. nnU-Net=/preds/{{case}}.nii.gz")
    return name, pattern


def score(data: Path, cases: list[str], name: str, pattern: str, work: Path) -> dict[str, dict[str, dict]]:
    """``{case: {organ: metrics or status}}`` from the evaluate command's JSON, computed once per case."""
    from SDMOrganSegLib.cli import main as cli

    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    scores = {}
    for case in cases:
        pred = Path(pattern.format(case=case))
        if not pred.is_file():
            raise SystemExit(f"error: no prediction {pred} for {case} ({name}); predict every validation case first")
        target = folder / f"{case}.json"
        if not target.is_file():
            code = cli(["evaluate", str(pred), str(data / "labelsTr" / f"{case}.nii.gz"), "--labels", str(data / "labels.json"),
                        "--ignore-unannotated", str(data / "annotations.json"), "--json", str(target)])
            if code:
                raise SystemExit(f"error: evaluate failed on {pred} (exit {code})")
        scores[case] = json.loads(target.read_text())
    return scores


def as_number(value) -> float:
    return math.inf if value == "inf" else math.nan if value is None else float(value)


def rows(name: str, scores: dict[str, dict[str, dict]]) -> list[dict]:
    found = []
    for case, organs in scores.items():
        for organ, metrics in organs.items():
            if organ != "mean" and "status" not in metrics:
                found.append({"method": name, "case": case, "organ": organ, **{m: as_number(metrics[m]) for m in METRICS}})
    return found


def wilcoxon_p(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import wilcoxon

    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() == 0 or not np.any(a[keep] != b[keep]):
        return 1.0
    return float(wilcoxon(a[keep], b[keep]).pvalue)


def table(all_rows: list[dict], methods: list[str], organs: list[str]) -> str:
    def values(method: str, organ: str, metric: str) -> dict[str, float]:
        return {r["case"]: r[metric] for r in all_rows if r["method"] == method and r["organ"] == organ}

    head = "| organ | cases | method | Dice (mean ± std) | HD95 mm (median, empty) | HD95 mm (mean of finite) | p Dice / p HD95 (vs " + methods[0] + ") |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for organ in organs:
        reference = {m: values(methods[0], organ, m) for m in ("dice", "hd95")}
        cases = sorted(reference["dice"])
        for index, method in enumerate(methods):
            dice = values(method, organ, "dice")
            hd95 = values(method, organ, "hd95")
            if sorted(dice) != cases:
                raise SystemExit(f"error: {method} and {methods[0]} were scored on different cases for {organ}")
            d = np.array([dice[c] for c in cases])
            h = np.array([hd95[c] for c in cases])
            finite = h[np.isfinite(h)]
            median = f"{np.median(finite):.1f}" if finite.size else "—"
            mean = f"{np.mean(finite):.1f}" if finite.size else "—"
            if index == 0:
                p = "—"
            else:
                pd = wilcoxon_p(d, np.array([reference["dice"][c] for c in cases]))
                ph = wilcoxon_p(h, np.array([reference["hd95"][c] for c in cases]))
                p = f"{pd:.2g} / {ph:.2g}"
            label = (organ, str(len(cases))) if index == 0 else ("", "")
            lines.append(f"| {label[0]} | {label[1]} | {method} | {d.mean():.3f} ± {d.std():.3f} | {median} ({d.size - finite.size} empty) | {mean} | {p} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="the openkbp-hn folder")
    parser.add_argument("--pred", type=parse_pred, action="append", required=True, help="NAME=PATTERN, {case} in PATTERN; the first is the reference of the tests")
    parser.add_argument("--work", type=Path, required=True, help="folder for the evaluate command's per-case JSON (kept, reused)")
    parser.add_argument("--csv", type=Path, required=True, help="per-case metrics, one row per method, case and organ")
    parser.add_argument("--markdown", type=Path, help="also write the comparison table here")
    parser.add_argument("--scored", type=Path, help="an earlier --csv of this script: its methods' rows are added as they are")
    parser.add_argument("--partial", action="store_true", help="score only the validation cases that every method has predicted (and say how many), instead of refusing")
    args = parser.parse_args(argv)

    splits = args.data / "splits.json"
    if not splits.is_file():
        raise SystemExit(f"error: {args.data} has no splits.json; pass the openkbp-hn folder with --data")
    cases = json.loads(splits.read_text())["validation"]
    if args.partial:
        done = [c for c in cases if all(Path(pattern.format(case=c)).is_file() for _, pattern in args.pred)]
        print(f"scoring the {len(done)} of {len(cases)} validation cases that every method has predicted")
        cases = done
    organs = [name for _, name in sorted(json.loads((args.data / "labels.json").read_text())["labels"].items(), key=lambda i: int(i[0]))]
    all_rows = []
    for name, pattern in args.pred:
        all_rows += rows(name, score(args.data, cases, name, pattern, args.work))
    methods = [name for name, _ in args.pred]
    if args.scored:
        earlier = [r for r in csv.DictReader(args.scored.open()) if r["method"] not in methods and r["case"] in cases]
        all_rows += [{**r, **{m: as_number(r[m]) for m in METRICS}} for r in earlier]
        methods += list(dict.fromkeys(r["method"] for r in earlier))
    with open(args.csv, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["method", "case", "organ", *METRICS])
        writer.writeheader()
        for row in all_rows:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) and math.isfinite(v) else v) for k, v in row.items()})
    text = table(all_rows, methods, organs)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
