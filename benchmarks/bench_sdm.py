"""Ground-truth SDM: ``sdm.normalized_sdm`` against the ``edt`` package's ``edt.sdf`` and SciPy's exact EDT.

    python benchmarks/bench_sdm.py            # 512x512x200 blob, best of 3 (SciPy best of 2), scaling plot
    python benchmarks/bench_sdm.py --quick    # 256x256x100, one round, no plot

The mask is an organ-sized blob (a bumpy ellipsoid with semi-axes of about 80 x 60 x 60 mm, roughly a
liver's 1.2 litres) in a 512 x 512 x 200 (x, y, z) volume of 0.8 x 0.8 x 2.5 mm voxels.

* ours: ``normalized_sdm(mask, spacing)``: exact signed distance in mm, normalised (what training caches);
* ``edt.sdf``: the edt package's signed distance (``edt(mask) - edt(~mask)``, both on the whole volume),
  without normalisation, with one thread as ours (its faster setting on the 2-core machine), and with
  ``parallel=2`` for the record;
* SciPy: ``distance_transform_edt`` of the outside and of the inside (two passes, float64, one thread),
  signed, without normalisation.

Exactness: our signed distance in mm (``signed_distance_mm``) against SciPy's, voxel by voxel (max abs
difference, mm); and our normalised SDM against SciPy's distances normalised the same way. With ``--plot``
(default in full mode) it also times growing volumes of the same shape and writes
``benchmarks/sdm_scaling.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import edt  # noqa: E402
from scipy import ndimage  # noqa: E402

from SDMOrganSegLib.method import sdm  # noqa: E402

SPACING_XYZ = _common.CT_SPACING_XYZ
PLOT = Path(__file__).resolve().parent / "sdm_scaling.png"
THREADS = 2


def blob(size_xyz, seed: int = 0) -> np.ndarray:
    """Bumpy ellipsoid off-centre in a ``(z, y, x)`` volume; semi-axes 80, 60, 60 mm (x, y, z) in the
    512 x 512 x 200 volume, scaled with the volume for the smaller ones of the scaling curve."""
    nx, ny, nz = size_xyz
    sx, sy, sz = SPACING_XYZ
    scale = nx / _common.CT_SIZE_XYZ[0]
    rng = np.random.default_rng(seed)
    z = (np.arange(nz, dtype=np.float32)[:, None, None] - 0.55 * nz) * sz / (60 * scale)
    y = (np.arange(ny, dtype=np.float32)[None, :, None] - 0.45 * ny) * sy / (60 * scale)
    x = (np.arange(nx, dtype=np.float32)[None, None, :] - 0.55 * nx) * sx / (80 * scale)
    a, b, c = rng.uniform(2, 5, 3)
    bumps = 0.08 * np.sin(a * x + 1.0) * np.cos(b * y) + 0.05 * np.sin(c * z + 2.0)
    return z * z + y * y + x * x < (1 + bumps) ** 2


def scipy_signed(mask: np.ndarray) -> np.ndarray:
    sampling = tuple(reversed(SPACING_XYZ))
    outside = ndimage.distance_transform_edt(~mask, sampling=sampling)
    inside = ndimage.distance_transform_edt(mask, sampling=sampling)
    return outside - inside


def edt_sdf(mask: np.ndarray, threads: int = 1) -> np.ndarray:
    return edt.sdf(mask, anisotropy=tuple(reversed(SPACING_XYZ)), parallel=threads)


def ours(mask: np.ndarray) -> np.ndarray:
    return sdm.normalized_sdm(mask, SPACING_XYZ)


def normalise(signed: np.ndarray) -> np.ndarray:
    out = signed.copy()
    out[signed < 0] /= -signed.min()
    out[signed > 0] /= signed.max()
    return out


PREVIOUS = _common.previous_module("SDMOrganSeg/SDMOrganSegLib/sdm.py")


def compare(size_xyz, repeat: int, scipy_repeat: int, previous: bool = True) -> dict:
    mask = blob(size_xyz)
    # edt.sdf at its faster setting here (1 thread: its parallel=2 was 1.9x slower on this 2-core machine),
    # and with 2 threads for the record.
    functions = {"ours (normalized_sdm)": lambda: ours(mask), "edt.sdf": lambda: edt_sdf(mask, 1)}
    if previous:
        functions["edt.sdf, parallel=2"] = lambda: edt_sdf(mask, THREADS)
    if previous and PREVIOUS is not None:
        functions[f"previous normalized_sdm ({_common.BASELINE_COMMIT})"] = lambda: PREVIOUS.normalized_sdm(mask, SPACING_XYZ)
    best = _common.interleaved_best(functions, repeat)
    if scipy_repeat:
        best.update(_common.interleaved_best({"scipy two-pass EDT": lambda: scipy_signed(mask)}, scipy_repeat))
    return {"mask": mask, "best": best}


def argmin_label_map(sdms: np.ndarray, values) -> np.ndarray:
    """The label map the plain numpy way (the previous ``sdms_to_label_map``)."""
    deepest = np.argmin(sdms, axis=0)
    labels = np.asarray(values, dtype=np.uint8)[deepest]
    labels[~(np.take_along_axis(sdms, deepest[None], axis=0)[0] < 0)] = 0
    return labels


def label_map_benchmark(size_xyz, repeat: int) -> dict:
    """``sdms_to_label_map`` of nine organs' SDMs (exact ones, of ellipsoids) against ``np.argmin``."""
    labels = _common.organ_masks(tuple(reversed(size_xyz)), 9)
    sdms = sdm.label_map_to_sdms(labels, list(range(1, 10)), SPACING_XYZ)
    values = list(range(1, 10))
    best = _common.interleaved_best({"ours (sdms_to_label_map)": lambda: sdm.sdms_to_label_map(sdms, values),
                                     "np.argmin over organs (previous)": lambda: argmin_label_map(sdms, values)}, repeat)
    same = bool(np.array_equal(sdm.sdms_to_label_map(sdms, values), argmin_label_map(sdms, values)))
    ours_s = best["ours (sdms_to_label_map)"]
    print(f"\n-- label map from 9 organs' SDMs ({'x'.join(map(str, size_xyz))}), best of {repeat}; identical: {same}")
    print(_common.table([{"": k, "seconds": v, "ratio to ours": v / ours_s} for k, v in best.items()], ["", "seconds", "ratio to ours"]))
    return {"best_s": best, "identical": same}


def main() -> int:
    parser = _common.argument_parser(__doc__, "256x256x100, one round, no plot")
    parser.add_argument("--repeat", type=int, default=None, help="rounds for ours and edt.sdf (default 3, quick 1)")
    parser.add_argument("--scipy-repeat", type=int, default=None, help="rounds for SciPy (default 2, quick 1)")
    parser.add_argument("--plot", action=argparse.BooleanOptionalAction, default=None, help="time growing volumes and write sdm_scaling.png (default: on unless --quick)")
    args = parser.parse_args()
    repeat = args.repeat or (1 if args.quick else 3)
    scipy_repeat = args.scipy_repeat or (1 if args.quick else 2)
    plot = (not args.quick) if args.plot is None else args.plot
    size = (256, 256, 100) if args.quick else _common.CT_SIZE_XYZ

    info = _common.print_machine("bench_sdm")
    result = compare(size, repeat, scipy_repeat)
    mask, best = result["mask"], result["best"]
    print(f"\n-- {'x'.join(map(str, size))} (x, y, z), spacing {SPACING_XYZ} mm, organ {mask.mean() * 100:.2f} % of the volume "
          f"({mask.sum() * np.prod(SPACING_XYZ) / 1e6:.2f} l); best of {repeat} (SciPy {scipy_repeat})")
    ours_s = best["ours (normalized_sdm)"]
    rows = [{"": name, "seconds": seconds, "ratio to ours": seconds / ours_s} for name, seconds in best.items()]
    print(_common.table(rows, ["", "seconds", "ratio to ours"]))

    reference = scipy_signed(mask)
    signed = sdm.signed_distance_mm(mask, SPACING_XYZ)
    difference_mm = float(np.abs(signed.astype(np.float64) - reference).max())
    normalised_difference = float(np.abs(ours(mask).astype(np.float64) - normalise(reference)).max())
    edt_difference = float(np.abs(edt_sdf(mask).astype(np.float64) + reference).max())  # edt.sdf is positive inside
    print(f"   exactness: max |ours - SciPy| = {difference_mm:.2e} mm (signed), {normalised_difference:.2e} (normalised); "
          f"max |edt.sdf - SciPy| = {edt_difference:.2e} mm; largest distance {np.abs(reference).max():.1f} mm")
    print(f"   ours is x{best['edt.sdf'] / ours_s:.2f} as fast as edt.sdf and x{best.get('scipy two-pass EDT', np.nan) / ours_s:.1f} as fast as SciPy")
    report = {"machine": info, "size_xyz": size, "best_s": best, "max_abs_difference_mm": difference_mm,
              "max_abs_difference_normalised": normalised_difference}
    del reference, signed

    report["label_map"] = label_map_benchmark(size, repeat)

    if plot:
        scales = [0.25, 0.375, 0.5, 0.75, 1.0]
        curve = []
        for scale in scales:
            grown = tuple(int(round(s * scale)) for s in _common.CT_SIZE_XYZ)
            if scale == 1.0:
                timing = best
            else:
                timing = compare(grown, repeat, 1, previous=False)["best"]
            curve.append({"size": "x".join(map(str, grown)), "voxels": int(np.prod(grown)), **timing})
            print(f"   {curve[-1]['size']:>12s}: " + ", ".join(f"{k} {v:.3f} s" for k, v in timing.items()), flush=True)
        report["scaling"] = curve
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(6, 4))
        for name, marker in (("ours (normalized_sdm)", "o"), ("edt.sdf", "s"), ("scipy two-pass EDT", "^")):
            axis.plot([c["voxels"] / 1e6 for c in curve], [c[name] for c in curve], marker=marker, label=name)
        for c in curve:
            c.pop(f"previous normalized_sdm ({_common.BASELINE_COMMIT})", None)
        axis.set_xscale("log"), axis.set_yscale("log")
        axis.set_xlabel("voxels (millions); volume shape of 512x512x200 scaled")
        axis.set_ylabel("seconds (best of runs)")
        axis.set_title(f"Signed distance map of an organ blob, {info['cpu']}, {info['cores']} cores", fontsize=9)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
        figure.tight_layout()
        figure.savefig(PLOT, dpi=100)
        print(f"   wrote {PLOT}")
    _common.save_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
