"""Sliding-window inference: ``inference.predict_array`` against MONAI's ``sliding_window_inference``.

    python benchmarks/bench_inference.py              # cpu preset on 512x512x200, paper preset on 192x192x128
    python benchmarks/bench_inference.py --quick      # small volumes, one round: a smoke run
    python benchmarks/bench_inference.py --preset cpu --repeat 2

Same network (random weights, seed 0, 9 output channels), same volume (a CT-like 512 x 512 x 200 array
normalised to [-1, 1]), same window and overlap (0.25), Gaussian blending in both (sigma = window / 8).
The ``paper`` preset (6 downsamplings, 24-384 channels) needs about 0.8 TFLOP per 128^3 window, minutes
per volume on two cores, so it runs on a 192 x 192 x 128 volume (four 128^3 windows), and its time for
the full CT volume is extrapolated from its seconds per window.

Three parts:

1. Convolution throughput: FLOPs of the network's convolutions per window (counted with
   ``torch.utils.flop_counter.FlopCounterMode`` on the meta device) and the machine's measured peak for
   3D convolutions (a large 64 -> 64 channel conv3d, best layout), so the achieved GFLOP/s can be put in
   proportion.
2. Per-window ablation, in this process, alternating: the network with PyTorch's own convolution
   kernels (one tile per call, as MONAI runs it), as ``predict_array`` runs it (every convolution in
   oneDNN, the 1x1x1 head as a matrix product), with two tiles per call (rejected: it paid 1.4-1.8x on a
   loaded machine, nothing on an idle one, for 0.45 GB more), and channels-last with two tiles per call
   (rejected: PyTorch's channels-last GroupNorm loses digits on nearly constant input), each with its
   largest error against a float64 run of the network.
3. Tiling and blending alone: the same sliding-window run with a stand-in network that costs next to
   nothing, ours against the previous ``predict_array`` (numpy blend) and MONAI, best of N in this process.
4. Whole volume, each run in a fresh child process (so its peak memory, VmHWM, is its own), alternating
   ours and MONAI, best of ``--repeat`` rounds: seconds, peak memory, ratio, and the largest difference
   between the two outputs (they differ only in the blending weights' floor and float rounding).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

HERE = Path(__file__).resolve()
ORGANS = 9
OVERLAP = 0.25
#: (volume size x, y, z; window z, y, x) per preset, full and --quick.
SETUPS = {
    "cpu": {"full": ((512, 512, 200), (128, 128, 128)), "quick": ((192, 192, 96), (96, 96, 96))},
    "paper": {"full": ((192, 192, 128), (128, 128, 128)), "quick": ((128, 128, 64), (64, 64, 64))},
}


def build_network(preset: str):
    import torch

    from SDMOrganSegLib.method.network import UNet3D, preset as make_preset

    torch.manual_seed(0)
    return UNet3D(make_preset(preset, 1, ORGANS)).eval()


def normalised_volume(size_xyz) -> np.ndarray:
    from SDMOrganSegLib.method.preprocessing import normalize_intensity

    return normalize_intensity(_common.ct_like_volume(size_xyz), {"method": "window", "low": -200, "high": 300})


def conv_flops_per_window(preset: str, window) -> float:
    """FLOPs of one network call on one window (multiply-add = 2 FLOPs), counted without computing."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from SDMOrganSegLib.method.network import UNet3D, preset as make_preset

    with torch.device("meta"):
        network = UNet3D(make_preset(preset, 1, ORGANS))
        tile = torch.empty((1, 1, *window))
    with FlopCounterMode(display=False) as counter:
        network(tile)
    return float(counter.get_total_flops())


def peak_conv_gflops(repeat: int) -> dict[str, float]:
    """Measured GFLOP/s of single conv3d calls: a large 64 -> 64 one (the machine's practical peak for
    this op) in both layouts, and the first-level convolutions of the two presets."""
    import torch

    results = {}
    shapes = {"64->64 @ 64^3": (64, 64, 64), "8->8 @ 128^3 (cpu level 0)": (8, 8, 128), "24->24 @ 128^3 (paper level 0)": (24, 24, 128)}
    with torch.inference_mode():
        for name, (cin, cout, size) in shapes.items():
            conv = torch.nn.Conv3d(cin, cout, 3, padding=1, bias=False)
            x = torch.randn(1, cin, size, size, size)
            flops = 2.0 * 27 * cin * cout * size**3
            conv_cl = torch.nn.Conv3d(cin, cout, 3, padding=1, bias=False).to(memory_format=torch.channels_last_3d)
            x_cl = x.contiguous(memory_format=torch.channels_last_3d)
            best = _common.interleaved_best({"ncdhw": lambda: conv(x), "ndhwc": lambda: conv_cl(x_cl)}, repeat, warmup=True)
            for layout, seconds in best.items():
                results[f"{name} {layout}"] = flops / seconds / 1e9
    return results


def window_ablation(preset: str, window, repeat: int) -> dict[str, dict[str, float]]:
    """Seconds per window of the network in the batchings and layouts predict_array could use, and each
    one's largest error against a float64 run of the same network (on two 64^3 CT-like tiles, one of
    them mostly air, the case where a one-pass variance in group norm loses digits)."""
    import copy

    import torch

    from SDMOrganSegLib.engines import inference

    network = build_network(preset)
    network_cl = copy.deepcopy(network).to(memory_format=torch.channels_last_3d)
    cpu = torch.device("cpu")

    def routed(t):
        with inference._cpu_convolutions(network, cpu):
            return network(t)
    volume = normalised_volume((256, 256, max(window[0], 64)))
    one = torch.from_numpy(np.ascontiguousarray(volume[None, None, : window[0], : window[1], : window[2]]))
    two = torch.from_numpy(np.stack([volume[: window[0], : window[1], : window[2]], volume[: window[0], -window[1]:, -window[2]:]])[:, None])
    two_cl = two.contiguous(memory_format=torch.channels_last_3d)
    variants = {
        "PyTorch's kernel choice, 1 tile/call (MONAI)": (lambda t: network(t), lambda: network(one), 1),
        "every conv in oneDNN, 1 tile/call (ours)": (routed, lambda: routed(one), 1),
        "PyTorch's choice, 2 tiles/call (rejected)": (lambda t: network(t), lambda: network(two), 2),
        "channels-last, 2 tiles/call (rejected)": (
            lambda t: network_cl(t.contiguous(memory_format=torch.channels_last_3d)), lambda: network_cl(two_cl), 2),
    }
    with torch.inference_mode():
        best = _common.interleaved_best({name: v[1] for name, v in variants.items()}, repeat, warmup=True)
        small = torch.from_numpy(np.stack([volume[:64, :64, :64], volume[:64, 96:160, 96:160]])[:, None])
        double = copy.deepcopy(network).double()
        reference = double(small.double())
        errors = {}
        for name, (run, _, batch) in variants.items():
            result = torch.cat([run(small[i : i + batch]) for i in range(0, 2, batch)])
            errors[name] = float((result.double() - reference).abs().max())
    return {name: {"s_per_window": best[name] / variants[name][2], "max_error_vs_float64": errors[name]} for name in variants}


class CheapNetwork:
    """A stand-in for the UNet that costs next to nothing (tanh of the tile, one channel per organ), so
    that a sliding-window run times only the tiling and blending around the network."""

    def __init__(self, organs: int) -> None:
        import torch

        self.config = type("Config", (), {"out_channels": organs, "depth": 0, "base_channels": 1})()
        self.organs = organs
        self.torch = torch

    def to(self, device):
        return self

    def __call__(self, tile):
        return self.torch.tanh(tile).repeat(1, self.organs, 1, 1, 1)


def blend_overhead(size_xyz, window, repeat: int) -> dict[str, float]:
    """Seconds of a whole sliding-window run with :class:`CheapNetwork`: ours, the previous
    predict_array (numpy blend) and MONAI, alternating, best of ``repeat``."""
    import torch
    from monai.inferers import sliding_window_inference

    from SDMOrganSegLib.engines import inference

    volume = normalised_volume(size_xyz)
    network = CheapNetwork(ORGANS)
    runs = {"ours (predict_array)": lambda: inference.predict_array(network, volume, torch.device("cpu"), window, OVERLAP)}
    previous = _common.previous_module("SDMOrganSeg/SDMOrganSegLib/inference.py")
    if previous is not None:
        runs[f"previous predict_array ({_common.BASELINE_COMMIT})"] = lambda: previous.predict_array(network, volume, torch.device("cpu"), window, OVERLAP)

    def monai() -> None:
        with torch.inference_mode():
            sliding_window_inference(torch.from_numpy(volume)[None, None], roi_size=window, sw_batch_size=1, predictor=network,
                                     overlap=OVERLAP, mode="gaussian", sigma_scale=0.125)

    runs["MONAI sliding_window_inference"] = monai
    return _common.interleaved_best(runs, repeat, warmup=True)


def child(args: argparse.Namespace) -> None:
    """One whole-volume run in this (fresh) process; prints a JSON line."""
    import torch

    from SDMOrganSegLib.engines import inference

    size = tuple(int(v) for v in args.size.split(","))
    window = tuple(int(v) for v in args.window.split(","))
    volume = normalised_volume(size)
    network = build_network(args.preset)
    before = _common.current_rss_bytes()
    started = time.perf_counter()
    if args.child == "monai":
        from monai.inferers import sliding_window_inference

        inputs = torch.from_numpy(volume)[None, None]
        batch = args.sw_batch
        with torch.inference_mode():
            output = sliding_window_inference(
                inputs, roi_size=window, sw_batch_size=batch, predictor=network, overlap=OVERLAP, mode="gaussian", sigma_scale=0.125,
            )[0].numpy()
    else:
        output = inference.predict_array(network, volume, torch.device("cpu"), window, OVERLAP)
    seconds = time.perf_counter() - started
    if args.save:
        np.save(args.save, np.ascontiguousarray(output[:, ::4, ::4, ::4]))
    tiles = len(inference.tiles(volume.shape, window, OVERLAP))
    _common.child_report({"seconds": seconds, "rss_before_gb": before / 1e9, "tiles": tiles, "threads": torch.get_num_threads()})


def main() -> int:
    parser = _common.argument_parser(__doc__, "small volumes, one round")
    parser.add_argument("--preset", default="all", choices=["cpu", "paper", "all"])
    parser.add_argument("--repeat", type=int, default=None, help="rounds of the whole-volume runs (default 1; they take minutes)")
    parser.add_argument("--ablation-repeat", type=int, default=None, help="rounds of the per-window ablation (default 3, quick 1)")
    parser.add_argument("--monai-batch", type=int, default=1, help="MONAI sw_batch_size (default 1, its default)")
    parser.add_argument("--child", choices=["ours", "monai"], help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--window", help=argparse.SUPPRESS)
    parser.add_argument("--sw-batch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0

    info = _common.print_machine("bench_inference")
    mode = "quick" if args.quick else "full"
    repeat = args.repeat or 1
    ablation_repeat = args.ablation_repeat or (1 if args.quick else 3)
    presets = ["cpu", "paper"] if args.preset == "all" else [args.preset]
    report: dict = {"machine": info, "mode": mode, "presets": {}}

    print("\n-- convolution peak (GFLOP/s, best of 3, single conv3d calls)")
    peaks = peak_conv_gflops(1 if args.quick else 3)
    for name, value in peaks.items():
        print(f"   {name:45s} {value:7.1f}")
    peak = max(v for k, v in peaks.items() if k.startswith("64->64"))
    report["conv_peak_gflops"] = peaks

    for preset in presets:
        size, window = SETUPS[preset][mode]
        flops = conv_flops_per_window(preset, window)
        print(f"\n-- {preset} preset: {ORGANS} organs, volume {'x'.join(map(str, size))} (x, y, z), window {window[0]}^3, overlap {OVERLAP}")
        print(f"   convolutions: {flops / 1e9:.1f} GFLOP per window")
        ablation = window_ablation(preset, window, ablation_repeat)
        base = ablation["PyTorch's kernel choice, 1 tile/call (MONAI)"]["s_per_window"]
        print(f"   per-window ablation (best of {ablation_repeat}; error: max |float32 - float64| on two 64^3 tiles):")
        for name, values in ablation.items():
            seconds = values["s_per_window"]
            print(f"     {name:48s} {seconds:7.2f} s/window  {flops / seconds / 1e9:6.1f} GFLOP/s  x{base / seconds:.2f}  "
                  f"error {values['max_error_vs_float64']:.1e}")

        overhead = blend_overhead(size, window, ablation_repeat)
        print(f"   tiling and blending alone (a stand-in network costing next to nothing; best of {ablation_repeat}):")
        for name, seconds in overhead.items():
            print(f"     {name:48s} {seconds:7.2f} s  ratio to ours {seconds / overhead['ours (predict_array)']:.2f}")

        runs: dict[str, list[dict]] = {"ours": [], "monai": []}
        with tempfile.TemporaryDirectory() as scratch:
            saved = {name: str(Path(scratch) / f"{name}.npy") for name in runs}
            for round_index in range(repeat):
                order = list(runs) if round_index % 2 == 0 else list(reversed(runs))
                for name in order:
                    arguments = ["--child", name, "--preset", preset, "--size", ",".join(map(str, size)),
                                 "--window", ",".join(map(str, window)), "--sw-batch", str(args.monai_batch), "--save", saved[name]]
                    result = _common.run_child(HERE, arguments)
                    runs[name].append(result)
                    print(f"   round {round_index + 1} {name:6s} {result['seconds']:8.1f} s  peak {result['peak_rss_gb']:.2f} GB", flush=True)
            ours_out, monai_out = np.load(saved["ours"]), np.load(saved["monai"])
            difference = float(np.abs(ours_out - monai_out).max())
            sign_agreement = float(np.mean((ours_out < 0) == (monai_out < 0)))
        best = {name: min(r["seconds"] for r in results) for name, results in runs.items()}
        memory = {name: min(r["peak_rss_gb"] for r in results) for name, results in runs.items()}
        tiles = runs["ours"][0]["tiles"]
        rows = []
        labels = {"ours": "ours (predict_array)", "monai": f"MONAI sliding_window_inference (sw_batch_size={args.monai_batch})"}
        for name in runs:
            rows.append({
                "": labels[name],
                "seconds (best)": best[name], "s/window": best[name] / tiles,
                "conv GFLOP/s": flops * tiles / best[name] / 1e9, "% of peak": 100 * flops * tiles / best[name] / 1e9 / peak,
                "peak GB": memory[name], "GB before run": runs[name][0]["rss_before_gb"],
            })
        print(_common.table(rows, ["", "seconds (best)", "s/window", "conv GFLOP/s", "% of peak", "peak GB", "GB before run"]))
        print(f"   ratio MONAI/ours: x{best['monai'] / best['ours']:.2f} (>1: ours faster); tiles {tiles}; "
              f"max |ours - MONAI| {difference:.2e} (on every 4th voxel), sign agreement {sign_agreement:.6f}")
        entry = {
            "size_xyz": size, "window": window, "tiles": tiles, "gflop_per_window": flops / 1e9, "ablation_s_per_window": ablation,
            "blend_overhead_s": overhead,
            "best_s": best, "peak_gb": memory, "ratio_monai_over_ours": best["monai"] / best["ours"],
            "max_abs_difference": difference, "sign_agreement": sign_agreement, "runs": runs,
        }
        if preset == "paper" or size != _common.CT_SIZE_XYZ:
            from SDMOrganSegLib.engines.inference import tiles as make_tiles

            full_tiles = len(make_tiles(tuple(reversed(_common.CT_SIZE_XYZ)), window, OVERLAP))
            entry["extrapolated_full_ct_s"] = best["ours"] / tiles * full_tiles
            print(f"   extrapolated to 512x512x200 ({full_tiles} windows): about {entry['extrapolated_full_ct_s']:.0f} s")
        report["presets"][preset] = entry
    _common.save_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
