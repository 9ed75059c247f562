"""Paired comparison of two model folders from the per-case validation metrics in their cards.

    python docs/experiments/compare_cards.py NEW_MODEL OLD_MODEL

Both cards must hold ``metrics.per_case`` (``ship_model.py`` writes them with the model's default inference);
each organ is compared on the validation cases where both cards measured it (partially annotated data sets
list them in ``organ_case_names``). Prints, per organ and metric, both means, the mean paired difference and the
two-sided Wilcoxon signed-rank p-value: the "paired test before better" of a re-ship.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from experiments import wilcoxon_p  # noqa: E402


def per_case(model_dir: Path) -> dict[str, dict[str, dict[str, float]]]:
    """organ -> case -> metric -> value (cases where the organ is annotated, as the card lists them)."""
    metrics = json.loads((model_dir / "model.json").read_text())["metrics"]
    names = metrics.get("organ_case_names") or {organ: metrics["case_names"] for organ in metrics["per_case"]}
    return {
        organ: {case: {m: values[m][i] for m in values} for i, case in enumerate(names[organ])}
        for organ, values in metrics["per_case"].items()
    }


def main() -> int:
    new_dir, old_dir = Path(sys.argv[1]), Path(sys.argv[2])
    new, old = per_case(new_dir), per_case(old_dir)
    print(f"new = {new_dir}, old = {old_dir}; per organ, the validation cases both cards measured it on\n")
    print("| organ | cases | metric | new | old | mean difference (new - old) | p (Wilcoxon) |")
    print("|---|---|---|---|---|---|---|")
    for organ in new:
        cases = [c for c in new[organ] if c in old.get(organ, {})]
        if not cases:
            continue
        for metric in ("dice", "hd95", "asd"):
            a = np.asarray([new[organ][c].get(metric, np.nan) for c in cases], float)
            b = np.asarray([old[organ][c].get(metric, np.nan) for c in cases], float)
            print(f"| {organ} | {len(cases)} | {metric} | {np.nanmean(a):.3f} | {np.nanmean(b):.3f} | {np.nanmean(a - b):+.3f} | {wilcoxon_p(a, b):.2g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
