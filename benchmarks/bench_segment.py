"""The whole ``sdmorganseg segment`` command: a hippocampus case, and a CT-sized volume's time budget.

    python benchmarks/bench_segment.py            # hippocampus best of 5, CT-like 512x512x200 once
    python benchmarks/bench_segment.py --quick    # hippocampus best of 2, CT-like 256x256x100

1. Start-up: a fresh Python importing what ``segment`` needs (torch, SimpleITK, VTK, the library), best
   of N, in a subprocess each time.
2. Hippocampus (``Testing/Data/hippocampus/imagesTr/hippocampus_003.nii.gz``, 34 x 52 x 35 voxels) with
   ``Resources/Models/hippocampus`` if it exists, else a random-weight ``cpu``-preset model (2 organs)
   saved with ``modelfiles.save_model``: the command in a subprocess (start-up included), and the same
   command through ``cli.main`` in this process once the imports are done (after start-up), best of N,
   against the 2 s goal. All outputs are written: label map, SDMs (.nii.gz), 8 contour files, summary.
3. CT-like volume (512 x 512 x 200 voxels of 0.8 x 0.8 x 2.5 mm, int16 .nii.gz), random-weight
   ``cpu``-preset model with 9 organs at 1 x 1 x 2.5 mm (so the volume is resampled in and the SDMs out),
   128^3 window: the command's steps as ``cli.run_segment`` runs them, in a child process (for its own
   peak memory), with the share of the time spent outside the network (goal < 20 %); then, in the same
   child, a breakdown of the writing: SDMs as .nii.gz (the default), as .nrrd, and the contours. A
   random network's SDMs are noise (iso-surfaces everywhere, incompressible files), so the outputs are
   written with realistic content: exact SDMs of nine ellipsoid organs on the same grid replace the
   network's before ``write_result`` (made untimed; the network, resampling and label map are timed on
   the network's own output).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

HERE = Path(__file__).resolve()
HIPPOCAMPUS = _common.ROOT / "Testing" / "Data" / "hippocampus" / "imagesTr" / "hippocampus_003.nii.gz"
SHIPPED = _common.ROOT / "Resources" / "Models" / "hippocampus"
GOAL_S = 2.0
CT_MODEL_SPACING = (1.0, 1.0, 2.5)
CT_WINDOW = (128, 128, 128)
IMPORTS = "import SDMOrganSegLib.cli, SDMOrganSegLib.images.imageio, SDMOrganSegLib.engines.inference, SDMOrganSegLib.formats.modelfiles, SDMOrganSegLib.engines.outputs"


def random_model(directory: Path, organs: dict[int, str], spacing=None, window=None, seed: int = 0) -> Path:
    import torch

    from SDMOrganSegLib.formats.modelfiles import ModelCard, organs_from_labels, save_model
    from SDMOrganSegLib.method.network import UNet3D, preset

    torch.manual_seed(seed)
    network = UNet3D(preset("cpu", 1, len(organs)))
    card = ModelCard(name="random-cpu", architecture=network.config, organs=organs_from_labels(organs), spacing=spacing,
                     window=window, description="random weights, for benchmarks")
    save_model(network, card, directory, overwrite=True)
    return directory


def startup_seconds(repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", IMPORTS], check=True)
        best = min(best, time.perf_counter() - started)
    return best


def hippocampus(repeat: int, scratch: Path) -> dict:
    from SDMOrganSegLib import cli

    if (SHIPPED / "model.json").is_file():
        model, model_note = SHIPPED, f"shipped model {SHIPPED.relative_to(_common.ROOT)}"
    else:
        model = random_model(scratch / "hippocampus-model", {1: "anterior hippocampus", 2: "posterior hippocampus"})
        model_note = "random-weight cpu-preset model (Resources/Models/hippocampus does not exist)"
    counter = iter(range(10_000))

    def command() -> list[str]:
        return ["segment", str(HIPPOCAMPUS), "--model", str(model), "--out", str(scratch / f"out{next(counter)}"), "--quiet", "--device", "cpu"]

    def in_process() -> None:
        with open(os.devnull, "w") as sink:
            stdout, sys.stdout = sys.stdout, sink
            try:
                assert cli.main(command()) == 0
            finally:
                sys.stdout = stdout

    def subprocess_run() -> None:
        subprocess.run([sys.executable, "-m", "SDMOrganSegLib.cli", *command()], check=True, stdout=subprocess.DEVNULL)

    in_process()  # warm-up: first-call costs (oneDNN kernels, lazy imports) belong to start-up
    best = _common.interleaved_best({"in process": in_process, "subprocess": subprocess_run}, repeat)
    summary = json.loads((scratch / "out0" / "summary.json").read_text())
    return {"model": model_note, "best": best, "timings": summary.get("timings_s", {}), "files": len(summary.get("outputs", []))}


def realistic_sdms(result, image) -> None:
    """Replace ``result``'s SDMs and label map by exact ones of nine ellipsoid organs on ``image``'s grid, and
    the model-grid SDMs the contours come from (``SegmentationResult.contour_sdm``) by those resampled."""
    import SimpleITK as sitk

    from SDMOrganSegLib.images.imageio import image_from_array
    from SDMOrganSegLib.method.preprocessing import resample_like
    from SDMOrganSegLib.method.sdm import normalized_sdm

    labels = _common.organ_masks(sitk.GetArrayViewFromImage(image).shape, len(result.organs))
    for organ in result.organs:
        result.sdms[organ.name] = image_from_array(normalized_sdm(labels == organ.label, image.GetSpacing()), image)
        if organ.name in result.model_grid_sdms:
            result.model_grid_sdms[organ.name] = resample_like(result.sdms[organ.name], result.model_grid_sdms[organ.name], sitk.sitkLinear, default=1.0)
    result.labels = image_from_array(labels, image)


def ct_child(args: argparse.Namespace) -> None:
    """The CT-like run, in a fresh process: cli.run_segment's steps, timed, then the writing breakdown."""
    import SimpleITK as sitk
    import torch

    from SDMOrganSegLib.images import contours
    from SDMOrganSegLib.common.files import safe_name
    from SDMOrganSegLib.images.imageio import read_image
    from SDMOrganSegLib.images.imagewriting import write_image
    from SDMOrganSegLib.engines.inference import segment_image
    from SDMOrganSegLib.formats.modelfiles import load_model
    from SDMOrganSegLib.engines.outputs import write_result

    scratch = Path(args.scratch)
    timings: dict[str, float] = {}
    cpu: dict[str, float] = {}  # CPU seconds of all threads, to see how well a step uses the cores
    marks: dict[str, float] = {}

    def progress(fraction: float, message: str) -> None:
        if message.startswith("mapping the SDMs back") or message == "done":
            marks[message.split()[0]] = time.process_time()

    started = time.perf_counter()
    model = load_model(scratch / "ct-model")
    timings["load model"] = time.perf_counter() - started
    tick, cpu_tick = time.perf_counter(), time.process_time()
    image = read_image(scratch / "ct.nii.gz")
    timings["read image"], cpu["read image"] = time.perf_counter() - tick, time.process_time() - cpu_tick
    tick, cpu_tick = time.perf_counter(), time.process_time()
    result = segment_image(image, model, "cpu", window=None, overlap=0.25, progress=progress)
    timings["segment_image"], cpu["segment_image"] = time.perf_counter() - tick, time.process_time() - cpu_tick
    cpu["  postprocess"] = marks["done"] - marks["mapping"]
    peak_segment = _common.peak_rss_bytes()
    for key, value in result.timings.items():
        if key != "total_s":
            timings[f"  {key.removesuffix('_s')}"] = value
    # A random network's SDMs are noise, whose iso-surfaces fill the volume and whose files hardly
    # compress; the writing is timed on realistic content instead: exact SDMs of nine ellipsoid organs
    # on the same grid (made here, untimed), in place of the network's.
    realistic_sdms(result, image)
    tick, cpu_tick = time.perf_counter(), time.process_time()
    write_result(result, scratch / "ct-out", "nifti")
    timings["write_result (nifti)"], cpu["write_result (nifti)"] = time.perf_counter() - tick, time.process_time() - cpu_tick
    timings["total"] = sum(v for k, v in timings.items() if not k.startswith("  "))
    peak = _common.peak_rss_bytes()

    # Breakdown of the writing (not part of the command's time above).
    breakdown: dict[str, float] = {}
    folder = scratch / "breakdown"
    folder.mkdir()
    # Ours (imagewriting.write_image: ITK writes raw, ISA-L gzips) against ITK's own compression.
    writers = (
        ("SDMs .nii.gz, ours (ISA-L)", ".nii.gz", lambda image, path: write_image(image, path)),
        ("SDMs .nii.gz, ITK (zlib)", ".nii.gz", lambda image, path: sitk.WriteImage(image, str(path), useCompression=True)),
        ("SDMs .nrrd, ours (ISA-L)", ".nrrd", lambda image, path: write_image(image, path)),
        ("SDMs .nrrd, ITK (zlib)", ".nrrd", lambda image, path: sitk.WriteImage(image, str(path), useCompression=True)),
        ("SDMs .nii, no compression", ".nii", lambda image, path: sitk.WriteImage(image, str(path), useCompression=False)),
    )
    for name, suffix, writer in writers:
        tick = time.perf_counter()
        for organ, sdm in result.sdms.items():
            writer(sdm, folder / f"{safe_name(organ)}{suffix}")
        breakdown[name] = time.perf_counter() - tick
        breakdown[name + " MB"] = sum(f.stat().st_size for f in folder.glob(f"*{suffix}")) / 1e6
        for f in folder.glob(f"*{suffix}"):
            f.unlink()
    tick = time.perf_counter()
    surfaces = {organ: contours.iso_surfaces(result.contour_sdm(organ)) for organ in result.sdms}
    breakdown["contours (iso_surfaces)"] = time.perf_counter() - tick
    tick = time.perf_counter()
    for organ, by_level in surfaces.items():
        for level, polydata in by_level.items():
            contours.write_polydata(polydata, str(folder / f"{safe_name(organ)}_{level}.vtp"))
    breakdown["contours (.vtp writing)"] = time.perf_counter() - tick
    _common.child_report({"timings": timings, "cpu_s": cpu, "breakdown": breakdown, "peak_rss_gb": peak / 1e9, "peak_segment_image_gb": peak_segment / 1e9, "threads": torch.get_num_threads()})


def ct_like(size_xyz, scratch: Path) -> dict:
    import SimpleITK as sitk

    volume = _common.ct_like_volume(size_xyz)
    image = sitk.GetImageFromArray(np.round(volume).astype(np.int16))
    image.SetSpacing(_common.CT_SPACING_XYZ)
    image.SetOrigin((-204.8, -204.8, -250.0))
    sitk.WriteImage(image, str(scratch / "ct.nii.gz"), useCompression=True)
    del volume, image
    organs = {value: f"organ {value}" for value in range(1, 10)}
    random_model(scratch / "ct-model", organs, spacing=CT_MODEL_SPACING, window=CT_WINDOW)
    return _common.run_child(HERE, ["--ct-child", "--scratch", str(scratch)])


def main() -> int:
    parser = _common.argument_parser(__doc__, "fewer rounds, CT-like volume 256x256x100")
    parser.add_argument("--repeat", type=int, default=None, help="rounds for start-up and hippocampus (default 5, quick 2)")
    parser.add_argument("--skip-ct", action="store_true", help="only start-up and hippocampus")
    parser.add_argument("--ct-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ct_child:
        ct_child(args)
        return 0
    repeat = args.repeat or (2 if args.quick else 5)
    info = _common.print_machine("bench_segment")
    report: dict = {"machine": info}
    with tempfile.TemporaryDirectory(prefix="bench-segment-") as folder:
        scratch = Path(folder)
        startup = startup_seconds(repeat)
        hippo = hippocampus(repeat, scratch)
        in_process, whole = hippo["best"]["in process"], hippo["best"]["subprocess"]
        print(f"\n-- hippocampus_003 (34x52x35), {hippo['model']}; {hippo['files']} output files; best of {repeat}")
        rows = [
            {"": "start-up (imports, fresh process)", "seconds": startup},
            {"": "segment command after start-up (cli.main in process)", "seconds": in_process, "goal (s)": GOAL_S, "goal / ours": GOAL_S / in_process},
            {"": "segment command, fresh process (start-up included)", "seconds": whole},
        ]
        print(_common.table(rows, ["", "seconds", "goal (s)", "goal / ours"]))
        print(f"   summary.json timings (s): {hippo['timings']}")
        report["startup_s"], report["hippocampus"] = startup, hippo

        if not args.skip_ct:
            size = (256, 256, 100) if args.quick else _common.CT_SIZE_XYZ
            print(f"\n-- CT-like {'x'.join(map(str, size))} (x, y, z), 0.8x0.8x2.5 mm -> model grid {CT_MODEL_SPACING} mm, "
                  f"9 organs, cpu preset, window {CT_WINDOW[0]}^3 (fresh process)", flush=True)
            ct = ct_like(size, scratch)
            timings = ct["timings"]
            network = timings["  network"]
            total = timings["total"]
            rows = [{"step": name, "seconds": value, "% of total": 100 * value / total, "CPU s (all threads)": ct["cpu_s"].get(name, "")}
                    for name, value in timings.items()]
            print(_common.table(rows, ["step", "seconds", "% of total", "CPU s (all threads)"]))
            outside = total - network
            print(f"   network {network:.1f} s, everything else {outside:.1f} s = {100 * outside / total:.1f} % of the run (goal < 20 %); "
                  f"peak memory {ct['peak_segment_image_gb']:.2f} GB after segment_image, {ct['peak_rss_gb']:.2f} GB after writing")
            print("   writing breakdown (outside the run above):")
            for name, value in ct["breakdown"].items():
                print(f"     {name:32s} {value:8.2f}" + (" MB" if name.endswith("MB") else " s"))
            report["ct"] = ct
    _common.save_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
