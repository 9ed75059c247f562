"""Copy a finished run's best model into ``Resources/Models/NAME`` with its validation metrics measured as shipped.

    python docs/experiments/ship_model.py RUN --data DATA --to Resources/Models/NAME --command "..." [--command "..."]
                              [--tta-default] [--note TEXT] [--goal TEXT] [--folder best|last]

``--tta-default`` makes mirroring test-time augmentation the model's default inference (the card's
``inference.tta``; callers can still say ``--no-tta``). ``--labels-from sdm`` makes a dual model's label map
its SDM head's zero level (the card's ``inference.labels_from``; ``compare_label_sources.py`` measures both). The card's ``metrics`` are those of the default
inference (with or without TTA as the card says, no post-processing), which is what ``segment``, the batch
script and the panel give unless asked otherwise, so that ``Testing/Python/test_shipped_model.py`` and
``test_headneck_model.py`` can reproduce them per case. Where the model was trained with flips,
``metrics["other_tta_per_organ"]`` adds the summary with the other TTA setting, and
``metrics["largest_component_per_organ"]`` the default with ``--largest-component``.
``training.commands`` records the exact commands; the markdown table printed at the end goes into the
model's README (its human-readable card). The shipped folder gets ``model.onnx`` (the network for ONNX
Runtime, listed with its sha256 in the card; ``SDMOrganSegLib.engines.onnxmodel.export_model``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # this file is docs/experiments/<name>.py
sys.path.insert(0, str(REPO / "SDMOrganSeg"))


def metrics_table(per_organ: dict, cases_per_organ: dict[str, int] | None = None) -> str:
    """Markdown rows ``organ | n | Dice | HD | HD95 | ASD`` (mean ± std) of a ``summarize`` result."""
    rows = ["| organ | cases | Dice | HD (mm) | HD95 (mm) | ASD (mm) |", "|---|---|---|---|---|---|"]
    for organ, metrics in per_organ.items():
        cells = [f"{metrics[m]['mean']:.3f} ± {metrics[m]['std']:.3f}" if m in metrics else "–" for m in ("dice", "hd", "hd95", "asd")]
        count = metrics["dice"]["n"] if "dice" in metrics else 0
        rows.append(f"| {organ} | {count} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def ship(
    run: Path, data: Path, target: Path, commands: list[str], note: str, goal: str, tta_default: bool = False,
    modality: str | None = None, field_of_view: str = "", description: str = "", labels_from: str = "segmentation",
    folder: str = "best",
) -> None:
    from SDMOrganSegLib.engines.inference import tta_axes
    from SDMOrganSegLib.formats.modelfiles import load_model, save_model
    from SDMOrganSegLib.engines.onnxmodel import export_model
    from SDMOrganSegLib.engines.training import evaluate_model_on_split, split_metrics_record, summarize

    model = load_model(run / folder, runtime="torch")
    card = model.card
    card.modality = modality or card.modality
    card.field_of_view = field_of_view or card.field_of_view
    card.description = description or card.description
    mirrored = bool(tta_axes(card))  # trained with flips: TTA has something to mirror
    tta = tta_default and mirrored
    card.inference = {"tta": True} if tta else {}
    if labels_from != "segmentation":
        card.inference["labels_from"] = labels_from
    results, prepared = evaluate_model_on_split(model, data, run / "cache", "cpu", tta=tta)
    epoch = card.metrics.get("epoch") or card.training.get("epochs_trained")
    card.metrics = split_metrics_record(
        results, prepared, card.organs, epoch, tta,
        "metrics at the model spacing on whole validation volumes (organs only where annotated), default "
        f"inference ({'with' if tta else 'no'} mirroring test-time augmentation, no post-processing); HD/HD95/ASD in mm",
    )
    # The two inference options, each alone, for the card's README.
    lcc_results, _ = evaluate_model_on_split(model, data, run / "cache", "cpu", tta=tta, largest_component=True)
    card.metrics["largest_component_per_organ"] = summarize(lcc_results)
    if mirrored:
        other_results, _ = evaluate_model_on_split(model, data, run / "cache", "cpu", tta=not tta)
        card.metrics["other_tta_per_organ"] = summarize(other_results)
    if goal:
        card.metrics["goal"] = goal
    card.training["commands"] = commands
    if note:
        card.training["note"] = note
    # Written beside the target and swapped in, so a failure leaves the shipped model as it was.
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        save_model(model.network, card, staging / "model", overwrite=True)
        export_model(staging / "model")
        if (target / "README.md").is_file():
            shutil.copy2(target / "README.md", staging / "model" / "README.md")
        if target.exists():
            shutil.rmtree(target)
        (staging / "model").rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"shipped {run / folder} (epoch {epoch}) to {target}\n")
    print(f"Default inference ({'with' if tta else 'no'} TTA):\n" + metrics_table(card.metrics["per_organ"]))
    print("\nWith --largest-component:\n" + metrics_table(card.metrics["largest_component_per_organ"]))
    if "other_tta_per_organ" in card.metrics:
        print(f"\nWith {'--no-tta' if tta else '--tta'}:\n" + metrics_table(card.metrics["other_tta_per_organ"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="run folder (best/ and cache/)")
    parser.add_argument("--data", type=Path, required=True, help="the data folder it was trained on")
    parser.add_argument("--to", type=Path, required=True, help="model folder to (re)write, e.g. Resources/Models/hippocampus")
    parser.add_argument("--command", action="append", default=[], help="an exact command that made the run (repeat for several)")
    parser.add_argument("--note", default="", help="training note for the card")
    parser.add_argument("--tta-default", action="store_true", help="make mirroring test-time augmentation the model's default inference")
    parser.add_argument("--modality", choices=["CT", "MR"], help="set the card's modality (when the run did not)")
    parser.add_argument("--field-of-view", default="", help="set the card's field of view, in words (when the run did not)")
    parser.add_argument("--description", default="", help="replace the card's one-line description (what the model is, its limits)")
    parser.add_argument("--labels-from", default="segmentation", choices=["segmentation", "sdm"], help="a dual model's label map: its segmentation head or its SDM head's zero level")
    parser.add_argument("--goal", default="", help="the goal the metrics are measured against, and whether it was met")
    parser.add_argument("--folder", default="best", choices=["best", "last"], help="the run's model to ship: best/ (the best validation Dice) or last/ (the last epoch, where Dice is not what decides, e.g. an SDM head trained to a distance)")
    args = parser.parse_args()
    ship(args.run, args.data, args.to, args.command, args.note, args.goal, args.tta_default, args.modality, args.field_of_view, args.description, args.labels_from, args.folder)


if __name__ == "__main__":
    main()
