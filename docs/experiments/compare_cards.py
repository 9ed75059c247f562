"""Paired comparison of two model folders from the per-case validation metrics in their cards.

    python docs/experiments/compare_cards.py NEW_MODEL OLD_MODEL

Both cards must hold ``metrics.per_case`` over the same validation cases (``ship_model.py`` writes them with
the model's default inference). Prints, per organ and metric, both means, the mean paired difference and the
two-sided Wilcoxon signed-rank p-value: the "paired test before better" of a re-ship.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from experiments import wilcoxon_p  # noqa: E402


def per_case(model_dir: Path) -> tuple[list[str], dict[str, dict[str, list[float]]]]:
    metrics = json.loads((model_dir / "model.json").read_text())["metrics"]
    return metrics["case_names"], metrics["per_case"]


def main() -> int:
    new_dir, old_dir = Path(sys.argv[1]), Path(sys.argv[2])
    new_cases, new = per_case(new_dir)
    old_cases, old = per_case(old_dir)
    if new_cases != old_cases:
        raise SystemExit("the two cards were measured on different validation cases: not a paired comparison")
    print(f"{len(new_cases)} validation cases; new = {new_dir}, old = {old_dir}\n")
    print("| organ | metric | new | old | mean difference (new - old) | p (Wilcoxon) |")
    print("|---|---|---|---|---|---|")
    for organ in new:
        for metric in ("dice", "hd95", "asd"):
            a, b = np.asarray(new[organ][metric], float), np.asarray(old[organ][metric], float)
            print(f"| {organ} | {metric} | {np.nanmean(a):.3f} | {np.nanmean(b):.3f} | {np.nanmean(a - b):+.3f} | {wilcoxon_p(a, b):.2g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
