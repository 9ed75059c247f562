"""Training throughput on the CPU: data loading against the training step, steps per second, batch and patch.

    python benchmarks/bench_training.py            # both presets, 12 timed steps each configuration
    python benchmarks/bench_training.py --quick    # cpu preset, 3 timed steps each

Data: ``Testing/Data/hippocampus`` (6 small MRI cases, 2 organs), prepared once with
``dataset.load_cases`` (GT SDMs computed and cached, as the trainer does), sdm+dice loss, Adam.

1. The trainer itself: ``training.Trainer`` for 3 epochs of the cpu preset (batch 2, 32x48x32 patches),
   its ``log.csv`` ``data_share`` (time drawing batches / epoch time) and ``steps_per_s``.
2. Step anatomy, per preset and configuration: the time to draw a batch from ``PatchSampler`` (the
   reference: the data loading) against a whole training step (draw + forward + backward + Adam), after
   two warm-up steps, median of the timed steps; steps/s and patch voxels/s, for batch sizes 1, 2, 4 and
   for patch sizes 32x48x32 (the default) and 64^3. The paper preset pads any patch to a multiple of 64
   (6 downsamplings), so a 32x48x32 patch costs it as much as 64^3.
3. Layout: the cpu preset's step with the network and batch in channels-last layout, against the default
   (for information: faster, but PyTorch's channels-last GroupNorm on the CPU loses precision on nearly
   constant input, see bench_inference.py; training.py is not changed by this benchmark).
"""

from __future__ import annotations

import csv
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import torch  # noqa: E402

from SDMOrganSegLib.formats.dataset import find_cases, load_cases, read_label_names  # noqa: E402
from SDMOrganSegLib.method.losses import SDMSegmentationLoss  # noqa: E402
from SDMOrganSegLib.method.network import UNet3D, preset as make_preset  # noqa: E402
from SDMOrganSegLib.method.preprocessing import DEFAULT_INTENSITY  # noqa: E402
from SDMOrganSegLib.engines.training import PatchSampler, Trainer, TrainingConfig  # noqa: E402

DATA = _common.ROOT / "Testing" / "Data" / "hippocampus"


def prepared_cases(cache: Path):
    names = read_label_names(DATA)
    labels = sorted(names)
    started = time.perf_counter()
    cases = load_cases(find_cases(DATA), labels, DEFAULT_INTENSITY, None, cache)
    return cases, labels, time.perf_counter() - started


def trainer_run(scratch: Path, epochs: int) -> list[dict]:
    config = TrainingConfig(data_dir=str(DATA), out_dir=str(scratch / "run"), preset="cpu", epochs=epochs, batch_size=2,
                            validate_every=1000, seed=0, device="cpu", model_name="bench")
    import contextlib
    import os

    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):  # the trainer's progress bars
        Trainer(config, progress=lambda text: None).run()
    with open(scratch / "run" / "log.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def step_timings(preset: str, cases, labels, batch: int, patch_xyz, steps: int, channels_last: bool = False) -> dict:
    torch.manual_seed(0)
    network = UNet3D(make_preset(preset, 1, len(labels)))
    layout = torch.channels_last_3d if channels_last else torch.contiguous_format
    network = network.to(memory_format=layout).train()
    optimizer = torch.optim.Adam(network.parameters(), lr=5e-4)
    loss_function = SDMSegmentationLoss("sdm+dice", 10.0)
    sampler = PatchSampler(cases, labels, patch_xyz, flip=True)
    rng = np.random.default_rng(0)
    batches = sampler.batches(batch, rng)
    data_times, step_times = [], []
    for index in range(steps + 2):
        started = time.perf_counter()
        try:
            images, target_sdm, target_mask, _ = next(batches)
        except StopIteration:
            batches = sampler.batches(batch, rng)
            images, target_sdm, target_mask, _ = next(batches)
        if images.shape[0] < batch:  # the epoch's last, short batch: take a full one
            batches = sampler.batches(batch, rng)
            images, target_sdm, target_mask, _ = next(batches)
        images = images.contiguous(memory_format=layout)
        drawn = time.perf_counter()
        prediction = network(images)
        loss, _ = loss_function(prediction, target_sdm, target_mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if index >= 2:
            data_times.append(drawn - started)
            step_times.append(time.perf_counter() - started)
    step = float(np.median(step_times))
    data = float(np.median(data_times))
    voxels = batch * int(np.prod(patch_xyz))
    return {"step_s": step, "data_s": data, "data_share": data / step, "steps_per_s": 1 / step, "patch_voxels_per_s": voxels / step}


def main() -> int:
    parser = _common.argument_parser(__doc__, "cpu preset only, 3 timed steps, 2 trainer epochs")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 12, quick 3)")
    args = parser.parse_args()
    steps = args.steps or (3 if args.quick else 12)
    info = _common.print_machine("bench_training")
    report: dict = {"machine": info}
    with tempfile.TemporaryDirectory(prefix="bench-training-") as folder:
        scratch = Path(folder)
        cases, labels, prepare_s = prepared_cases(scratch / "cache")
        _, _, cached_s = prepared_cases(scratch / "cache")
        print(f"\n-- {len(cases)} hippocampus cases: prepared (GT SDMs computed) in {prepare_s:.2f} s, from the cache in {cached_s:.3f} s")

        epochs = 2 if args.quick else 3
        log = trainer_run(scratch, epochs)
        steps_per_epoch = round(float(log[0]["epoch_s"]) * float(log[0]["steps_per_s"]))
        print(f"-- Trainer, cpu preset, batch 2, 32x48x32, {epochs} epochs of {steps_per_epoch} steps (log.csv):")
        rows = [{"epoch": r["epoch"], "epoch_s": float(r["epoch_s"]), "steps_per_s": float(r["steps_per_s"]), "data_share": float(r["data_share"])} for r in log]
        print(_common.table(rows, ["epoch", "epoch_s", "steps_per_s", "data_share"]))
        report["trainer_log"] = rows

        configurations = [("cpu", 1, (32, 48, 32)), ("cpu", 2, (32, 48, 32)), ("cpu", 4, (32, 48, 32)), ("cpu", 2, (64, 64, 64))]
        if not args.quick:
            configurations += [("paper", 1, (32, 48, 32)), ("paper", 2, (32, 48, 32)), ("paper", 1, (64, 64, 64)), ("paper", 2, (64, 64, 64))]
        rows = []
        for preset, batch, patch in configurations:
            result = step_timings(preset, cases, labels, batch, patch, steps if preset == "cpu" else max(2, steps // 4))
            rows.append({"preset": preset, "batch": batch, "patch (x,y,z)": "x".join(map(str, patch)), **result,
                         "data / step": f"{100 * result['data_share']:.2f} %"})
            print(f"   {preset} batch {batch} patch {rows[-1]['patch (x,y,z)']}: {result['step_s']:.3f} s/step", flush=True)
        print(f"\n-- step anatomy (median of {steps} timed steps; paper {max(2, steps // 4)}), data = drawing the batch (reference), step = data + forward + backward + Adam")
        print(_common.table(rows, ["preset", "batch", "patch (x,y,z)", "data_s", "step_s", "data / step", "steps_per_s", "patch_voxels_per_s"]))
        report["steps"] = rows

        layout: dict[str, dict] = {}
        for round_index in range(2):  # alternating, the better of two rounds each
            variants = (("contiguous (training.py)", False), ("channels-last (not recommended: GroupNorm precision)", True))
            for name, channels_last in variants[:: 1 if round_index == 0 else -1]:
                result = step_timings("cpu", cases, labels, 2, (32, 48, 32), steps, channels_last=channels_last)
                if name not in layout or result["step_s"] < layout[name]["step_s"]:
                    layout[name] = result
        print("\n-- cpu preset, batch 2, 32x48x32: layout of the training step")
        print(_common.table([{"layout": k, **v} for k, v in layout.items()], ["layout", "step_s", "steps_per_s"]))
        report["layout"] = layout
    _common.save_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
