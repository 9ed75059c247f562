"""One GPU session of training runs side by side, as run on a lent H200 (docs/gpu/README.md).

Reads data packs (``sdmorganseg pack``), starts every run of ``RUNS`` at once as its own process
(``sdmorganseg train`` with ``--time-budget``, one CPU thread each), evaluates each run's best model on its
validation split (Dice, HD95, ASD; with TTA where the run flipped), and writes under OUT the logs, a metrics
JSON per run, and the model folders named in ``--keep``.

It runs where SimpleITK is not installed: training from packs needs none of it, and a stand-in module
satisfies the library's imports (no SimpleITK function is called on this path).

    python docs/gpu/campaign.py --packs .gpu --out OUT --minutes 6 [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

HIPPO = ["--patch", "40,56,40", "--batch-size", "8", "--validate-every", "10", "--foreground-fraction", "0.33", "--name", "hippocampus",
         "--modality", "MR", "--field-of-view", "T1 MRI crop around one hippocampus (MSD Task04 style, about 35 x 50 x 36 mm)"]
#: The recipe (docs/ablation.md): Adam with nnU-Net's poly schedule, strong augmentation, 16 channels at full
#: resolution. Adam, not nnU-Net's SGD, because its steps do not grow with the number of organs that the
#: losses sum over (SGD is one of the hippocampus ablations).
RECIPE = ["--optimizer", "adam", "--lr", "5e-4", "--lr-schedule", "poly", "--augment", "strong", "--base-channels", "16", "--max-channels", "64"]
HIPPO_DICE = ["--mode", "dice", "--dice-reduction", "batch", "--ce-weight", "1"]
HIPPO_SDM = ["--mode", "sdm+dice", "--sdm-normalization", "clip", "--sdm-scale", "5", "--heaviside-k", "15"]  # the shipped recipe's loss
HIPPO_DUAL = ["--mode", "dual", "--sdm-normalization", "clip", "--sdm-scale", "5", "--sdm-weight", "1", "--dice-reduction", "batch", "--ce-weight", "1"]
CT = [
    "--spacing", "3.906,3.906,2.5", "--intensity", "window:-500,1000", "--patch", "96,96,64", "--batch-size", "4", "--validate-every", "5",
    "--foreground-fraction", "0.5", "--ce-balance", "organ", "--no-flip", "--sliding-window", "--dice-reduction", "batch", "--ce-weight", "1", "--modality", "CT",
    "--name", "headneck-oar", "--field-of-view", "head and neck planning CT (OpenKBP: brainstem to below the larynx)",
]
CT_SDM = ["--sdm-normalization", "clip", "--sdm-scale", "20"]

#: name -> (pack, arguments). Hippocampus: three modes x three seeds on the recipe, and the recipe's
#: elements taken out one at a time (seed 0, dual); head-and-neck CT: the three modes, and the old prior.
RUNS: dict[str, tuple[str, list[str]]] = {}
for seed in (0, 1, 2):
    RUNS[f"hippo-dice-s{seed}"] = ("hippo", HIPPO + RECIPE + HIPPO_DICE + ["--seed", str(seed)])
    RUNS[f"hippo-sdm-s{seed}"] = ("hippo", HIPPO + RECIPE + HIPPO_SDM + ["--seed", str(seed)])
    RUNS[f"hippo-dual-s{seed}"] = ("hippo", HIPPO + RECIPE + HIPPO_DUAL + ["--seed", str(seed)])
RUNS["hippo-dual-basicaug"] = ("hippo", HIPPO + RECIPE + HIPPO_DUAL + ["--augment", "basic"])
RUNS["hippo-dual-sgd"] = ("hippo", HIPPO + RECIPE + HIPPO_DUAL + ["--optimizer", "sgd", "--lr", "0.01"])
RUNS["hippo-dual-base8"] = ("hippo", HIPPO + RECIPE + HIPPO_DUAL + ["--base-channels", "8"])
# Wider, nnU-Net's 32 channels at full resolution (a GPU buys it), capped at 128 so the weights (27 MB) can ship.
RUNS["hippo-dual-base32"] = ("hippo", HIPPO + RECIPE + HIPPO_DUAL + ["--base-channels", "32", "--max-channels", "128"])
# Ship candidates on a lightly shared GPU (two processes): the CPU comparison's 32x48x32 patches, batch 4.
SHIP = ["--patch", "32,48,32", "--batch-size", "4"]
RUNS["hippo-dual-ship"] = ("hippo", HIPPO + RECIPE + HIPPO_DUAL + SHIP)
RUNS["hippo-sdm-ship"] = ("hippo", HIPPO + RECIPE + HIPPO_SDM + SHIP)
RUNS["hn-dice"] = ("hn", CT + RECIPE + ["--mode", "dice", "--output-bias", "soft-prior"])
RUNS["hn-sdm"] = ("hn", CT + RECIPE + CT_SDM + ["--mode", "sdm+dice", "--heaviside-k", "15", "--output-bias", "soft-prior"])
RUNS["hn-dual"] = ("hn", CT + RECIPE + CT_SDM + ["--mode", "dual", "--sdm-weight", "1", "--output-bias", "soft-prior"])
RUNS["hn-dual-prior"] = ("hn", CT + RECIPE + CT_SDM + ["--mode", "dual", "--sdm-weight", "1", "--output-bias", "prior"])


def stand_in_simpleitk() -> None:
    """A module named SimpleITK whose every attribute is a harmless stand-in, where the real one is missing."""
    try:
        import SimpleITK  # noqa: F401
        return
    except ImportError:
        pass

    class Anything:
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)  # no file, spec or other module machinery: inspect and importlib look
            return Anything()

        def __call__(self, *args, **kwargs):
            return Anything()

    module = types.ModuleType("SimpleITK")
    module.__getattr__ = Anything().__getattr__
    sys.modules["SimpleITK"] = module


def train_one(argv: list[str]) -> int:
    stand_in_simpleitk()
    from SDMOrganSegLib.cli import main

    return main(argv)


def evaluate_one(run_dir: Path, pack: Path, out: Path) -> None:
    """Per-case validation metrics of ``run_dir/best`` with and without TTA, and the SDM head's agreement."""
    stand_in_simpleitk()
    import numpy as np
    import torch

    from SDMOrganSegLib.method.architecture import split_heads
    from SDMOrganSegLib.engines.inference import predict_array, tta_axes
    from SDMOrganSegLib.formats.modelfiles import load_model
    from SDMOrganSegLib.method.sdm import sdms_to_label_map
    from SDMOrganSegLib.engines.training import evaluate_model_on_split, summarize

    model = load_model(run_dir / "best")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    record = {"card_metrics": model.card.metrics, "budget": {k: model.card.training.get(k) for k in ("precision", "steps", "training_time_s", "steps_per_s", "machine", "epochs_trained")}}
    for tta in (False, True):
        if tta and not tta_axes(model.card):
            continue
        results, prepared = evaluate_model_on_split(model, pack, None, device, tta)
        record["tta" if tta else "plain"] = {"summary": summarize(results), "per_case": results, "case_names": [c.name for c in prepared]}
    if model.card.architecture.heads == "dual":
        # How well the SDM head's zero level agrees with the segmentation head, per organ (Dice between them).
        agreement: dict[str, list[float]] = {o.name: [] for o in model.card.organs}
        window = tuple(reversed(model.card.window)) if model.card.window else None
        for case in prepared:
            output = predict_array(model.network, case.image, torch.device(device), window=window, overlap=0.25)
            sdm, logits = split_heads(output, model.card.architecture)
            a, b = sdms_to_label_map(sdm, model.card.label_values), sdms_to_label_map(logits, model.card.label_values)
            for organ in model.card.organs:
                x, y = a == organ.label, b == organ.label
                total = x.sum() + y.sum()
                if total:
                    agreement[organ.name].append(float(2 * (x & y).sum() / total))
        record["sdm_head_vs_segmentation_dice"] = {k: float(np.mean(v)) if v else None for k, v in agreement.items()}
    out.write_text(json.dumps(record, indent=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packs", required=True, help="folder with hippo.npz and hn.npz")
    parser.add_argument("--out", required=True)
    parser.add_argument("--minutes", type=float, default=6.0, help="training time budget of every run")
    parser.add_argument("--only", default="", help="comma-separated run names (default: all)")
    parser.add_argument("--smoke", action="store_true", help="a few cases and minutes, to check the script on a CPU")
    parser.add_argument("--train-one", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.add_argument("--evaluate-one", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train_one is not None:
        return train_one(args.train_one)
    if args.evaluate_one:
        evaluate_one(Path(args.evaluate_one[0]), Path(args.evaluate_one[1]), Path(args.evaluate_one[2]))
        return 0

    out, packs = Path(args.out), Path(args.packs)
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    chosen = [n for n in RUNS if not args.only or n in args.only.split(",")]
    started = time.time()
    device = "cpu" if args.smoke else "cuda"
    processes = {}
    for name in chosen:
        pack, arguments = RUNS[name]
        pack_path = str(packs / f"{pack}.npz")
        argv = ["train", pack_path, "--out", str(runs_dir / name), "--epochs", "3" if args.smoke else "5000", "--time-budget", str(args.minutes),
                "--device", device, "--threads", "1", "--precision", "auto"] + arguments
        if args.smoke:
            argv += ["--max-cases", "4", "--validate-every", "1", "--batch-size", "2", "--patch", "48,48,32" if pack == "hn" else "32,32,32"]
        log = open(runs_dir / f"{name}.log", "w")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        processes[name] = subprocess.Popen([sys.executable, __file__, "--packs", str(packs), "--out", str(out), "--train-one", *argv], stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = started + args.minutes * 60 * 1.1 + 60  # a backstop: the runs end themselves within 10 % of the budget
    while any(p.poll() is None for p in processes.values()):
        if time.time() > deadline:
            for name, p in processes.items():
                if p.poll() is None:
                    print(f"{name}: past the deadline, stopped", flush=True)
                    p.terminate()
            break
        time.sleep(5)
    for p in processes.values():
        p.wait()
    print(f"training done in {time.time() - started:.0f} s: " + ", ".join(f"{n} rc={p.returncode}" for n, p in processes.items()), flush=True)

    evaluations = {}
    for name in chosen:
        if (runs_dir / name / "best" / "model.json").is_file():
            pack = packs / f"{RUNS[name][0]}.npz"
            log = open(runs_dir / f"{name}.eval.log", "w")
            evaluations[name] = subprocess.Popen(
                [sys.executable, __file__, "--packs", str(packs), "--out", str(out), "--evaluate-one", str(runs_dir / name), str(pack), str(runs_dir / name / "metrics.json")],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
    evaluation_deadline = time.time() + 100
    for name, p in evaluations.items():
        try:
            p.wait(timeout=max(evaluation_deadline - time.time(), 1))
        except subprocess.TimeoutExpired:
            print(f"{name}: evaluation past its deadline, stopped", flush=True)
            p.kill()
    print(f"evaluation done at {time.time() - started:.0f} s", flush=True)
    summary = {}
    for name in chosen:
        metrics = runs_dir / name / "metrics.json"
        if metrics.is_file():
            record = json.loads(metrics.read_text())
            best = record.get("tta", record.get("plain"))
            summary[name] = {
                "dice": {organ: values.get("dice", {}).get("mean") for organ, values in best["summary"].items()},
                "hd95": {organ: values.get("hd95", {}).get("mean") for organ, values in best["summary"].items()},
                "budget": record["budget"], "agreement": record.get("sdm_head_vs_segmentation_dice"),
            }
    # The models worth bringing back: every head-and-neck run, and per hippocampus mode its best seed.
    keep = [n for n in summary if n.startswith("hn-")]
    for mode in ("dice", "sdm", "dual"):
        seeds = [n for n in summary if re.fullmatch(f"hippo-{mode}-s[0-9]+", n)]  # not hippo-sdm-ship
        if seeds:
            keep.append(max(seeds, key=lambda n: sum(summary[n]["dice"].values())))
    keep += [n for n in summary if n.endswith("-base32") or n.endswith("-ship")]
    (out / "models").mkdir(exist_ok=True)
    for name in keep:
        shutil.copytree(runs_dir / name / "best", out / "models" / name)
    summary["kept_models"] = keep
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
