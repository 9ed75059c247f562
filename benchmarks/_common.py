"""Shared helpers of the benchmarks: machine description, interleaved best-of-N timing, peak memory of a
child process, and the synthetic CT-like volume.

Timings on a shared machine are noisy, so every benchmark times our code and its reference in the same
run, alternating between them, and keeps the best of N runs of each: the best run is the one least
disturbed by other processes, and alternating exposes both sides to the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SDMOrganSeg"))

#: CT-like test geometry: 512 x 512 x 200 voxels (x, y, z) of 0.8 x 0.8 x 2.5 mm.
CT_SIZE_XYZ = (512, 512, 200)
CT_SPACING_XYZ = (0.8, 0.8, 2.5)


def machine() -> dict[str, Any]:
    """CPU model and core count (as lscpu reports them), load average, date, library versions."""
    model, cores = platform.processor() or "unknown", os.cpu_count()
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                model = value.strip()
            elif key.strip() == "CPU(s)":
                cores = int(value.strip())
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": model,
        "cores": cores,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average": " ".join(f"{v:.2f}" for v in os.getloadavg()),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    try:
        import torch

        info["torch"] = f"{torch.__version__} ({torch.get_num_threads()} threads)"
    except ImportError:
        pass
    return info


def print_machine(title: str) -> dict[str, Any]:
    info = machine()
    print(f"== {title}")
    print("   " + ", ".join(f"{k}: {v}" for k, v in info.items()))
    return info


def interleaved_best(functions: dict[str, Callable[[], Any]], repeat: int, warmup: bool = False) -> dict[str, float]:
    """Best wall time (s) of each function over ``repeat`` rounds; every round runs each function once, in
    turn (the order alternating between rounds), so the load hits all of them alike."""
    names = list(functions)
    if warmup:
        for name in names:
            functions[name]()
    best = {name: float("inf") for name in names}
    for round_index in range(repeat):
        for name in names if round_index % 2 == 0 else reversed(names):
            started = time.perf_counter()
            functions[name]()
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM), in bytes."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def run_child(script: Path, arguments: Sequence[str], timeout: float | None = None) -> dict[str, Any]:
    """Run ``python script arguments`` in a fresh process; it must print one JSON line last. The child's peak
    memory (VmHWM) is added as ``peak_rss_gb`` if it did not report one."""
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, str(script), *arguments], capture_output=True, text=True, timeout=timeout, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(f"child {script.name} {' '.join(arguments)} failed:\n{completed.stderr[-3000:]}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    result.setdefault("process_s", time.perf_counter() - started)
    return result


def child_report(values: dict[str, Any]) -> None:
    """Print a child's result as the one JSON line :func:`run_child` reads, with its peak memory (unless
    ``values`` holds one already)."""
    values = {"peak_rss_gb": peak_rss_bytes() / 1e9, **values}
    print(json.dumps(values), flush=True)


def ct_like_volume(size_xyz: Sequence[int] = CT_SIZE_XYZ, seed: int = 0) -> np.ndarray:
    """A float32 ``(z, y, x)`` array in Hounsfield units that looks like an abdominal CT to a histogram: air
    around an elliptic body of soft tissue with noise, a spine of bone, fat and nine organ-like ellipsoids."""
    nx, ny, nz = (int(s) for s in size_xyz)
    rng = np.random.default_rng(seed)
    z = np.linspace(-1, 1, nz, dtype=np.float32)[:, None, None]
    y = np.linspace(-1, 1, ny, dtype=np.float32)[None, :, None]
    x = np.linspace(-1, 1, nx, dtype=np.float32)[None, None, :]
    volume = rng.normal(40.0, 25.0, size=(nz, ny, nx)).astype(np.float32)
    ellipse = (x / 0.9) ** 2 + (y / 0.7) ** 2  # (1, y, x): the body's cross-section, the same on every slice
    volume[:, (ellipse > 0.8**2)[0]] -= 140.0  # a rim of fat
    volume[:, (ellipse >= 1.0)[0]] = -1000.0  # air around the body
    volume[:, ((x / 0.08) ** 2 + ((y - 0.45) / 0.1) ** 2 < 1.0)[0]] += 500.0  # the spine
    for organ in range(9):
        centre = rng.uniform(-0.45, 0.45, size=3).astype(np.float32)
        radii = rng.uniform(0.08, 0.3, size=3).astype(np.float32)
        inside = ((z - centre[0]) / radii[0] / 1.5) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((x - centre[2]) / radii[2]) ** 2 < 1
        volume[inside] += float(rng.uniform(-30, 60))
    return volume


def organ_masks(shape_zyx: Sequence[int], organs: int = 9, seed: int = 1) -> np.ndarray:
    """A uint8 label map ``(z, y, x)`` with ``organs`` non-overlapping-ish ellipsoids (later ones win)."""
    nz, ny, nx = (int(s) for s in shape_zyx)
    rng = np.random.default_rng(seed)
    z = np.linspace(-1, 1, nz, dtype=np.float32)[:, None, None]
    y = np.linspace(-1, 1, ny, dtype=np.float32)[None, :, None]
    x = np.linspace(-1, 1, nx, dtype=np.float32)[None, None, :]
    labels = np.zeros((nz, ny, nx), np.uint8)
    for organ in range(1, organs + 1):
        centre = rng.uniform(-0.5, 0.5, size=3).astype(np.float32)
        radii = rng.uniform(0.1, 0.3, size=3).astype(np.float32)
        labels[((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((x - centre[2]) / radii[2]) ** 2 < 1] = organ
    return labels


def argument_parser(doc: str, quick_help: str) -> argparse.ArgumentParser:
    """The options every benchmark takes: ``--quick`` (a smoke run) and ``--json FILE``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--json", help="also write the results to this JSON file")
    return parser


def save_json(path: str | None, report: dict[str, Any]) -> None:
    """Write ``report`` to ``path`` (a script's ``--json FILE``); nothing when ``path`` is None."""
    if path:
        Path(path).write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")


def table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table of ``rows`` with the given columns (floats to 3 significant digits)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


#: The commit before the issue-5 optimisations: benchmarks load modules from it as "previous" rows.
BASELINE_COMMIT = "041031c"


def previous_module(relative_path: str, commit: str = BASELINE_COMMIT):
    """The library module ``relative_path`` (e.g. ``SDMOrganSeg/SDMOrganSegLib/sdm.py``) as it was at
    ``commit``, imported under a private name inside the package (its relative imports resolve to the
    current package); None when git or the commit is not available."""
    import importlib.util
    import types

    try:
        source = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:{relative_path}"], capture_output=True,
                                text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    name = "SDMOrganSegLib._previous_" + Path(relative_path).stem
    module = types.ModuleType(name)
    module.__package__ = "SDMOrganSegLib"
    module.__file__ = f"{commit}:{relative_path}"
    importlib.import_module("SDMOrganSegLib")
    sys.modules[name] = module
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module
