"""The network's runtimes: ONNX Runtime against PyTorch (issue 21).

    python benchmarks/bench_runtimes.py                 # all parts, as recorded in RESULTS.md
    python benchmarks/bench_runtimes.py --quick         # small CT volume, one round: a smoke run
    python benchmarks/bench_runtimes.py --part startup  # one part: startup, ct, bf16

1. ``startup``: the hippocampus case (``Testing/Data/hippocampus/imagesTr/hippocampus_003.nii.gz``) end to end
   as a whole process, ``sdmorganseg segment ... --quiet`` from interpreter start to exit, with
   ``--runtime onnxruntime`` and ``--runtime torch`` (alternating, best of N); also with the base install
   alone (``.venv-base``, which ``.ci/run`` makes: no PyTorch) when it exists. Plus ``import onnxruntime`` and
   ``import torch`` alone, and the installed size of both packages.
2. ``ct``: a CT-like 512 x 512 x 200 volume, a 9-organ ``cpu``-preset network (random weights, seed 0), 128^3
   windows, overlap 0.25, Gaussian blending: ``predict_array`` on ONNX Runtime (the network exported as
   ``export_onnx`` does) against MONAI's ``sliding_window_inference`` on the PyTorch network, and
   ``predict_array`` on PyTorch; each run in a fresh child process (its peak memory, VmHWM, is its own),
   alternating, best of ``--repeat``; the largest difference between the outputs.
3. ``bf16``: PyTorch under bfloat16 autocast on the CPU against float32, per 128^3 window and on the test
   fixtures of both shipped models (``segment_image``): seconds and the Dice of the label maps against the
   float32 ones (offered only where every organ agrees to Dice >= 0.999).
"""

from __future__ import annotations

import argparse
import contextlib
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
ROOT = _common.ROOT
CASE = ROOT / "Testing" / "Data" / "hippocampus" / "imagesTr" / "hippocampus_003.nii.gz"
FIXTURES = {
    "hippocampus": [ROOT / "Testing" / "Data" / "hippocampus" / "imagesTr" / f"hippocampus_00{i}.nii.gz" for i in (1, 3, 4, 6, 7)],
    "headneck-oar": [ROOT / "Testing" / "Data" / "openkbp-hn" / "imagesTr" / "hn_226.nii.gz"],
}
ORGANS = 9
OVERLAP = 0.25
WINDOW = (128, 128, 128)


def _segment_command(python: str, runtime: str | None, out: Path) -> list[str]:
    command = [python, "-m", "SDMOrganSegLib.cli", "segment", str(CASE), "--out", str(out), "--overwrite", "--quiet"]
    return command + (["--runtime", runtime] if runtime else [])


def _wall(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=env, cwd=str(ROOT))
    return time.perf_counter() - started


def _site_size_mb(python: str, package: str) -> float | None:
    code = f"import importlib.util, os; s = importlib.util.find_spec({package!r}); print(os.path.dirname(s.origin) if s else '')"
    folder = subprocess.run([python, "-c", code], capture_output=True, text=True).stdout.strip()
    if not folder:
        return None
    total = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
    return total / 1e6


def startup(repeat: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "SDMOrganSeg")}
    runs = {}
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        runs["onnxruntime (this venv)"] = _segment_command(sys.executable, "onnxruntime", out / "a")
        runs["torch (this venv)"] = _segment_command(sys.executable, "torch", out / "b")
        base = ROOT / ".venv-base" / "bin" / "python"
        if base.exists():
            runs["base install, no PyTorch (auto)"] = _segment_command(str(base), None, out / "c")
        for command in runs.values():  # warm the file cache
            _wall(command, env)
        best = _common.interleaved_best({name: (lambda c=command: _wall(c, env)) for name, command in runs.items()}, repeat)
    imports = _common.interleaved_best(
        {name: (lambda n=name: _wall([sys.executable, "-c", f"import {n}"], env)) for name in ("onnxruntime", "torch")}, repeat
    )
    python = _wall([sys.executable, "-c", "pass"], env)
    sizes = {name: _site_size_mb(sys.executable, name) for name in ("onnxruntime", "torch")}
    return {"segment_process_s": best, "import_process_s": imports, "bare_python_s": python, "installed_mb": sizes}


def build_network(organs: int = ORGANS):
    import torch

    from SDMOrganSegLib.method.network import UNet3D, preset

    torch.manual_seed(0)
    return UNet3D(preset("cpu", 1, organs)).eval()


def normalised_volume(size_xyz) -> np.ndarray:
    volume = _common.ct_like_volume(size_xyz)
    return np.clip((volume + 500.0) / 750.0 - 1.0, -1.0, 1.0).astype(np.float32)  # window -500..1000 HU to [-1, 1]


def child(args: argparse.Namespace) -> None:
    """One whole-volume run in this (fresh) process; prints a JSON line."""
    from SDMOrganSegLib.engines import inference

    size = tuple(int(v) for v in args.size.split(","))
    volume = normalised_volume(size)
    before = _common.current_rss_bytes()
    if args.child == "onnxruntime":
        from SDMOrganSegLib.method.architecture import preset
        from SDMOrganSegLib.engines.onnxmodel import OnnxNetwork

        network = OnnxNetwork(args.onnx, "cpu", preset("cpu", 1, ORGANS))
        started = time.perf_counter()
        output = inference.predict_array(network, volume, None, WINDOW, OVERLAP)
    else:
        import torch

        network = build_network()
        started = time.perf_counter()
        if args.child == "monai":
            from monai.inferers import sliding_window_inference

            with torch.inference_mode():
                output = sliding_window_inference(
                    torch.from_numpy(volume)[None, None], roi_size=WINDOW, sw_batch_size=1, predictor=network, overlap=OVERLAP,
                    mode="gaussian", sigma_scale=0.125,
                )[0].numpy()
        else:
            output = inference.predict_array(network, volume, torch.device("cpu"), WINDOW, OVERLAP)
    seconds = time.perf_counter() - started
    if args.save:
        np.save(args.save, np.ascontiguousarray(output[:, ::4, ::4, ::4]))
    _common.child_report({"seconds": seconds, "rss_before_gb": before / 1e9, "tiles": len(inference.tiles(volume.shape, WINDOW, OVERLAP))})


def ct(size_xyz, repeat: int) -> dict:
    from SDMOrganSegLib.engines.onnxmodel import export_onnx

    results: dict = {}
    with tempfile.TemporaryDirectory() as scratch:
        onnx = Path(scratch) / "ct.onnx"
        started = time.perf_counter()
        export_onnx(build_network(), onnx)
        results["export_s"] = time.perf_counter() - started
        size = ",".join(map(str, size_xyz))
        names = ["onnxruntime", "monai", "torch"]
        best: dict = {}
        for round_index in range(repeat):
            for name in names if round_index % 2 == 0 else reversed(names):
                saved = str(Path(scratch) / f"{name}.npy")
                run = _common.run_child(HERE, ["--child", name, "--size", size, "--onnx", str(onnx), "--save", saved])
                print(f"   round {round_index + 1} {name:12s} {run['seconds']:7.1f} s  peak {run['peak_rss_gb']:.2f} GB", flush=True)
                if name not in best or run["seconds"] < best[name]["seconds"]:
                    best[name] = run
        outputs = {name: np.load(Path(scratch) / f"{name}.npy") for name in names}
        results["runs"] = best
        results["max_difference_vs_monai"] = {name: float(np.abs(outputs[name] - outputs["monai"]).max()) for name in ("onnxruntime", "torch")}
        results["max_difference_onnxruntime_vs_torch"] = float(np.abs(outputs["onnxruntime"] - outputs["torch"]).max())
    return results


@contextlib.contextmanager
def _bf16_autocast():
    """PyTorch's CPU autocast to bfloat16; predict_array's oneDNN routing (float32 only) is switched off so
    that the convolutions do run in bfloat16."""
    import torch

    from SDMOrganSegLib.engines import inference

    inference.ONEDNN_ON_CPU = False
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    finally:
        inference.ONEDNN_ON_CPU = True


def bf16(repeat: int) -> dict:
    import SimpleITK as sitk
    import torch

    from SDMOrganSegLib.engines.inference import predict_array, segment_image
    from SDMOrganSegLib.formats.modelfiles import load_model

    network = build_network()
    tile = normalised_volume((160, 160, 160))[:128, :128, :128].copy()

    def window(precision: str) -> None:
        with _bf16_autocast() if precision == "bf16" else contextlib.nullcontext():
            predict_array(network, tile, torch.device("cpu"))

    per_window = _common.interleaved_best({"float32": lambda: window("float32"), "bf16": lambda: window("bf16")}, repeat, warmup=True)
    fixtures = {}
    for name, cases in FIXTURES.items():
        model = load_model(ROOT / "Resources" / "Models" / name, runtime="torch")
        worst, seconds = 1.0, {"float32": 0.0, "bf16": 0.0}
        for case in cases:
            image = sitk.ReadImage(str(case))
            labels = {}
            for precision in ("float32", "bf16"):
                started = time.perf_counter()
                with _bf16_autocast() if precision == "bf16" else contextlib.nullcontext():
                    labels[precision] = sitk.GetArrayFromImage(segment_image(image, model, "cpu").labels)
                seconds[precision] += time.perf_counter() - started
            for organ in model.card.organs:
                a, b = labels["float32"] == organ.label, labels["bf16"] == organ.label
                if a.any() or b.any():
                    worst = min(worst, 2 * float(np.sum(a & b)) / float(np.sum(a) + np.sum(b)))
        fixtures[name] = {"cases": len(cases), "worst_organ_dice_bf16_vs_float32": worst, "seconds": seconds}
    return {"per_128_window_s": per_window, "fixtures": fixtures}


def main() -> int:
    parser = _common.argument_parser(__doc__, "small CT volume, one round")
    parser.add_argument("--part", choices=["startup", "ct", "bf16", "all"], default="all")
    parser.add_argument("--repeat", type=int, default=None, help="rounds (default: startup 5, ct 1, bf16 3; quick 1)")
    parser.add_argument("--child", choices=["onnxruntime", "monai", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--onnx", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    info = _common.print_machine("bench_runtimes")
    import onnxruntime

    info["onnxruntime"] = onnxruntime.__version__
    report: dict = {"machine": info}
    parts = ["startup", "ct", "bf16"] if args.part == "all" else [args.part]
    if "startup" in parts:
        print("\n-- hippocampus_003 end to end, whole process (best of N, alternating)")
        report["startup"] = result = startup(args.repeat or (1 if args.quick else 5))
        for name, seconds in result["segment_process_s"].items():
            print(f"   segment, {name:34s} {seconds:6.2f} s")
        for name, seconds in result["import_process_s"].items():
            print(f"   python -c 'import {name}' {seconds:6.2f} s (bare interpreter {result['bare_python_s']:.2f} s); installed {result['installed_mb'][name]:.0f} MB")
    if "ct" in parts:
        size = (192, 192, 96) if args.quick else _common.CT_SIZE_XYZ
        print(f"\n-- CT-like {'x'.join(map(str, size))}, cpu preset, {ORGANS} organs, window 128^3, overlap {OVERLAP}: fresh process per run")
        report["ct"] = result = ct(size, args.repeat or 1)
        monai = result["runs"]["monai"]
        for name, run in result["runs"].items():
            print(f"   {name:12s} {run['seconds']:7.1f} s  peak {run['peak_rss_gb']:.2f} GB  x{monai['seconds'] / run['seconds']:.2f} vs MONAI")
        print(f"   max |difference| vs MONAI: {result['max_difference_vs_monai']}; ONNX Runtime vs PyTorch: {result['max_difference_onnxruntime_vs_torch']:.1e}")
    if "bf16" in parts:
        print("\n-- bf16 autocast (PyTorch, CPU) against float32")
        report["bf16"] = result = bf16(args.repeat or (1 if args.quick else 3))
        print(f"   per 128^3 window: {result['per_128_window_s']}")
        for name, values in result["fixtures"].items():
            print(f"   {name}: {values}")
    _common.save_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
