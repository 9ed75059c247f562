"""Time SDMOrganSegLib.method.metrics.organ_metrics against google-deepmind/surface-distance and MONAI.

    python benchmarks/bench_metrics.py [--quick]     # two cases, table of times, ratios and differences
    python benchmarks/bench_metrics.py --sizes       # growing cubes, ours vs surface-distance, PNG plot

Cases (spacing (x, y, z) = (0.8, 0.8, 2.5) mm):

* ``blob``: 160x160x96 (x, y, z) Gaussian-smoothed noise thresholded, against a perturbed copy (several
  irregular components, a large surface for its volume);
* ``ct``: 512x512x200 (x, y, z) with a liver-sized ellipsoid (about 200x160x150 mm) with bumps, against a
  shifted ellipsoid with other bumps.

All three libraries run in this process on the same masks; each time is the best of 3 runs (1 with
``--quick``). surface-distance's HD95 and HD come from ``compute_robust_hausdorff`` (95 and 100), its ASD is
the area-weighted mean of both directions (ours' definition) from ``compute_surface_distances``' arrays.
MONAI measures on edge voxels without surfel areas (HD95 is an unweighted percentile, ASD an unweighted
mean), so its differences from surface-distance are differences of definition, shown for information.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SDMOrganSeg"))

from SDMOrganSegLib.method.metrics import organ_metrics  # noqa: E402

SPACING_XYZ = (0.8, 0.8, 2.5)
PLOT = Path(__file__).resolve().parent / "metrics_scaling.png"


def blob_pair(shape_zyx: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal(shape_zyx, dtype=np.float32), sigma=(2, 5, 5))
    field /= field.std()
    noise = ndimage.gaussian_filter(rng.standard_normal(shape_zyx, dtype=np.float32), sigma=(1, 3, 3))
    noise /= noise.std()
    return field > 0.5, field + 0.3 * noise > 0.5


def liver_pair(shape_zyx: tuple[int, int, int] = (200, 512, 512)) -> tuple[np.ndarray, np.ndarray]:
    """Two bumpy ellipsoids of liver size (semi-axes about 100, 80, 75 mm), offset by a few mm."""
    sx, sy, sz = SPACING_XYZ
    z, y, x = (np.arange(n, dtype=np.float32) for n in shape_zyx)
    z, y, x = z[:, None, None] * sz, y[None, :, None] * sy, x[None, None, :] * sx
    centre = np.array([shape_zyx[0] * sz / 2, shape_zyx[1] * sy / 2, shape_zyx[2] * sx / 2], dtype=np.float32)

    def ellipsoid(shift: tuple[float, float, float], phase: float) -> np.ndarray:
        dz, dy, dx = (z - centre[0] - shift[0]) / 75, (y - centre[1] - shift[1]) / 80, (x - centre[2] - shift[2]) / 100
        bumps = 0.06 * np.sin(3 * dx + phase) * np.cos(4 * dy - phase) + 0.04 * np.sin(5 * dz + 2 * phase)
        return dz * dz + dy * dy + dx * dx < (1 + bumps) ** 2

    return ellipsoid((0.0, 0.0, 0.0), 0.0), ellipsoid((3.0, -4.0, 5.0), 0.7)


def best_time(function: Callable[[], dict[str, float]], repeats: int) -> tuple[float, dict[str, float]]:
    best, result = np.inf, {}
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def ours(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    return organ_metrics(pred, ref, SPACING_XYZ).to_dict()


def deepmind(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    import surface_distance as sd

    surfaces = sd.compute_surface_distances(ref, pred, SPACING_XYZ[::-1])
    areas_ref, areas_pred = surfaces["surfel_areas_gt"], surfaces["surfel_areas_pred"]
    weighted = surfaces["distances_gt_to_pred"] @ areas_ref + surfaces["distances_pred_to_gt"] @ areas_pred
    return {
        "dice": float(sd.compute_dice_coefficient(ref, pred)),
        "hd": float(sd.compute_robust_hausdorff(surfaces, 100)),
        "hd95": float(sd.compute_robust_hausdorff(surfaces, 95)),
        "asd": float(weighted / (areas_ref.sum() + areas_pred.sum())),
    }


def monai(pred_tensor, ref_tensor) -> dict[str, float]:
    from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance

    spacing = SPACING_XYZ[::-1]
    return {
        "dice": float(compute_dice(pred_tensor, ref_tensor, include_background=True)),
        "hd": float(compute_hausdorff_distance(pred_tensor, ref_tensor, include_background=True, spacing=spacing)),
        "hd95": float(
            compute_hausdorff_distance(pred_tensor, ref_tensor, include_background=True, percentile=95, spacing=spacing)
        ),
        "asd": float(
            compute_average_surface_distance(pred_tensor, ref_tensor, include_background=True, symmetric=True, spacing=spacing)
        ),
    }


def warm_up() -> None:
    """Imports and one-time set-up (ours builds its surfel-area table once per spacing) stay out of the times."""
    pred = np.zeros((12, 12, 12), bool)
    pred[3:8, 4:9, 2:7] = True
    ref = np.roll(pred, 1, axis=2)
    ours(pred, ref)
    deepmind(pred, ref)


def compare(quick: bool) -> None:
    import torch

    torch.set_num_threads(2)
    repeats = 1 if quick else 3
    warm_up()
    cases = [("blob 160x160x96", blob_pair((96, 160, 160))), ("ct 512x512x200", liver_pair())]
    rows = []
    for name, (pred, ref) in cases:
        # MONAI takes one-hot (batch, channel, z, y, x) tensors; the conversion is left out of its time.
        pred_tensor = torch.from_numpy(pred)[None, None].float()
        ref_tensor = torch.from_numpy(ref)[None, None].float()
        ours_s, ours_m = best_time(lambda: ours(pred, ref), repeats)
        dm_s, dm_m = best_time(lambda: deepmind(pred, ref), repeats)
        mo_s, mo_m = best_time(lambda: monai(pred_tensor, ref_tensor), repeats)
        rows.append((name, int(pred.sum()), ours_s, dm_s, mo_s, ours_m, dm_m, mo_m))
        print(f"done {name}", file=sys.stderr)

    print(f"spacing (x, y, z) = {SPACING_XYZ} mm; best of {repeats} run(s); times in seconds")
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end (other work slows all three alike)")
    print()
    print(f"{'case':<17}{'ours s':>9}{'surf-dist s':>13}{'MONAI s':>10}{'sd/ours':>9}{'MONAI/ours':>12}")
    for name, _, ours_s, dm_s, mo_s, *_ in rows:
        print(f"{name:<17}{ours_s:>9.3f}{dm_s:>13.3f}{mo_s:>10.3f}{dm_s / ours_s:>9.1f}{mo_s / ours_s:>12.1f}")
    print()
    print("max |difference| vs surface-distance (dice; hd, hd95, asd in mm)")
    print(f"{'case':<17}{'who':<7}{'dice':>10}{'hd':>10}{'hd95':>10}{'asd':>10}   values (surface-distance)")
    for name, _, _, _, _, ours_m, dm_m, mo_m in rows:
        for who, values in (("ours", ours_m), ("MONAI", mo_m)):
            diffs = "".join(f"{abs(values[k] - dm_m[k]):>10.2e}" for k in ("dice", "hd", "hd95", "asd"))
            reference = ", ".join(f"{k} {dm_m[k]:.4f}" for k in ("dice", "hd", "hd95", "asd")) if who == "ours" else ""
            print(f"{name:<17}{who:<7}{diffs}   {reference}")


def sizes(quick: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = [32, 48, 64, 96, 128] if quick else [32, 48, 64, 96, 128, 160, 192]
    repeats = 1 if quick else 2
    warm_up()
    voxels, ours_t, dm_t = [], [], []
    print(f"{'cube':>6}{'voxels':>12}{'ours s':>9}{'surf-dist s':>13}{'ratio':>8}")
    for edge in edges:
        pred, ref = blob_pair((edge, edge, edge), seed=edge)
        ours_s, _ = best_time(lambda: ours(pred, ref), repeats)
        dm_s, _ = best_time(lambda: deepmind(pred, ref), repeats)
        voxels.append(edge**3)
        ours_t.append(ours_s)
        dm_t.append(dm_s)
        print(f"{edge:>6}{edge**3:>12}{ours_s:>9.3f}{dm_s:>13.3f}{dm_s / ours_s:>8.1f}")
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.loglog(voxels, ours_t, "o-", label="SDMOrganSeg organ_metrics")
    axes.loglog(voxels, dm_t, "s-", label="surface-distance (+ HD95, HD, ASD, Dice)")
    axes.set_xlabel("voxels (smooth random blob pair in a cube)")
    axes.set_ylabel("seconds (best of runs)")
    axes.set_title(f"Surface metrics, spacing {SPACING_XYZ} mm")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(PLOT, dpi=120)
    print(f"plot written to {PLOT}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one run per library (fewer cube sizes with --sizes)")
    parser.add_argument("--sizes", action="store_true", help="time ours and surface-distance over growing cubes; save a PNG")
    arguments = parser.parse_args()
    # surface-distance 0.1 calls scipy.ndimage.filters, deprecated in recent SciPy.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if arguments.sizes:
        sizes(arguments.quick)
    else:
        compare(arguments.quick)


if __name__ == "__main__":
    main()
