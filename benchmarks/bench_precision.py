"""Training step speed in float32 against bf16 autocast (``train --precision``), on this machine's CPU.

    python benchmarks/bench_precision.py            # both presets, both data sets, 8 timed steps each
    python benchmarks/bench_precision.py --quick    # cpu preset only, 3 timed steps

A training step as ``Trainer`` runs it (draw a batch, forward, losses in float32, backward, Adam), after two
warm-up steps, median of the timed steps, with the same batches and initial weights in both precisions:

* hippocampus (``Testing/Data/hippocampus``, 2 organs, sdm+dice): cpu preset batch 2 at 32x48x32, paper
  preset batch 1 at 64^3 (it pads to multiples of 64);
* head-and-neck CT (``Testing/Data/openkbp-hn``, 7 organs, dual heads): cpu preset batch 2 at 64x64x48, paper
  preset batch 1 at 64x64x64.

It prints whether the CPU has native bf16 (AVX-512 BF16 or AMX: ``train --precision auto`` picks bf16 only
there), the steps/s of each, the ratio bf16 / float32, and the relative difference of the first step's loss.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import torch  # noqa: E402

from SDMOrganSegLib.formats.dataset import find_cases, load_cases, read_label_names  # noqa: E402
from SDMOrganSegLib.method.losses import SDMSegmentationLoss  # noqa: E402
from SDMOrganSegLib.method.network import UNet3D, preset as make_preset  # noqa: E402
from SDMOrganSegLib.engines.training import PatchSampler, cpu_has_bf16  # noqa: E402

DATA = {
    "hippocampus": (_common.ROOT / "Testing" / "Data" / "hippocampus", None, {"method": "percentile", "lower": 0.5, "upper": 99.5}, "sdm+dice"),
    "openkbp-hn": (_common.ROOT / "Testing" / "Data" / "openkbp-hn", (3.906, 3.906, 2.5), {"method": "window", "low": -500.0, "high": 1000.0}, "dual"),
}


def timed_steps(preset: str, mode: str, cases, labels, batch: int, patch_xyz, steps: int, bf16: bool) -> tuple[float, float]:
    torch.manual_seed(0)
    network = UNet3D(make_preset(preset, 1, len(labels), output_activation="none" if mode == "dice" else "tanh", heads="dual" if mode == "dual" else "single")).train()
    optimizer = torch.optim.Adam(network.parameters(), lr=5e-4)
    loss_function = SDMSegmentationLoss(mode, 1.0 if mode == "dual" else 10.0, k=15.0, ce_weight=1.0 if mode == "dual" else 0.0)
    sampler = PatchSampler(cases, labels, patch_xyz, flip=True, foreground_fraction=0.5)
    rng = np.random.default_rng(0)
    times, first_loss = [], None
    batches = sampler.batches(batch, rng)
    for index in range(steps + 2):
        started = time.perf_counter()
        try:
            images, target_sdm, target_mask, _ = next(batches)
        except StopIteration:
            batches = sampler.batches(batch, rng)
            images, target_sdm, target_mask, _ = next(batches)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            prediction = network(images)
        loss, _ = loss_function(prediction, target_sdm, target_mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if first_loss is None:
            first_loss = float(loss.detach())
        if index >= 2:
            times.append(time.perf_counter() - started)
    return float(np.median(times)), first_loss


def main() -> int:
    parser = _common.argument_parser(__doc__, "cpu preset only, 3 timed steps")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    steps = args.steps or (3 if args.quick else 8)
    info = _common.print_machine("bench_precision")
    print(f"native bf16 on this CPU (avx512_bf16 / amx_bf16): {cpu_has_bf16()}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    rows = []
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-precision-") as cache:
        for name, (folder, spacing, intensity, mode) in DATA.items():
            labels = sorted(read_label_names(folder))
            cases = load_cases(find_cases(folder), labels, intensity, spacing, Path(cache), {"normalization": "clip", "scale_mm": 5.0})
            settings = [("cpu", 2, (32, 48, 32) if name == "hippocampus" else (64, 64, 48))]
            if not args.quick:
                settings.append(("paper", 1, (64, 64, 64)))
            for preset, batch, patch in settings:
                fp32_s, fp32_loss = timed_steps(preset, mode, cases, labels, batch, patch, steps, bf16=False)
                bf16_s, bf16_loss = timed_steps(preset, mode, cases, labels, batch, patch, steps, bf16=True)
                rows.append({
                    "data": name, "preset": preset, "batch": batch, "patch (x,y,z)": "x".join(map(str, patch)),
                    "fp32 steps/s": 1 / fp32_s, "bf16 steps/s": 1 / bf16_s, "bf16 / fp32": fp32_s / bf16_s,
                    "first loss rel. diff": abs(bf16_loss - fp32_loss) / abs(fp32_loss),
                })
                print(f"   {name} {preset}: fp32 {1 / fp32_s:.3f} steps/s, bf16 {1 / bf16_s:.3f} steps/s", flush=True)
    print(f"\n-- training steps (median of {steps}), forward in the given precision, losses float32")
    print(_common.table(rows, ["data", "preset", "batch", "patch (x,y,z)", "fp32 steps/s", "bf16 steps/s", "bf16 / fp32", "first loss rel. diff"]))
    _common.save_json(args.json, {"machine": info, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
