"""Training on several CPU processes (torchrun, gloo, DistributedDataParallel) against one process.

    python benchmarks/bench_distributed.py            # 3 rounds of 4 epochs per configuration
    python benchmarks/bench_distributed.py --quick    # 1 round of 2 epochs

Data: ``Testing/Data/hippocampus`` (5 training cases, 2 organs), the trainer's defaults (cpu preset, sdm+dice,
batch 2, 32x48x32 patches), so an epoch is 3 steps, the last one with one patch. Each configuration is the
real command, ``sdmorganseg train`` or ``torchrun --standalone --nproc-per-node=2 --no-python sdmorganseg
train``, with the same global batch and seed:

* 1 process, 1 thread (the reference);
* 2 processes, 1 thread each (DDP: each takes half of every batch, gradients all-reduced over gloo);
* 1 process, 2 threads (the same two cores used by PyTorch's own threads instead).

The step time is an epoch's ``epoch_s`` from ``log.csv`` (rank 0's steps, validation excluded) over its
steps, best epoch after the first (warm-up), best round; rounds alternate the order of the configurations so
that other processes' load hits all of them alike. Also printed: how far each run's epoch losses are from
the reference's (the paper's loss amplifies any change in the order of sums, see RESULTS.md), and the wall
time of a whole command (start-up of the processes and the data included). Last, the time of one gloo
all-reduce of the network's gradients between the 2 processes, the communication DDP adds to every step.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

DATA = _common.ROOT / "Testing" / "Data" / "hippocampus"
CONFIGURATIONS = {"1 process, 1 thread": (1, 1), "2 processes, 1 thread each": (2, 1), "1 process, 2 threads": (1, 2)}


def command(processes: int) -> list[str]:
    script = Path(sys.executable).with_name("sdmorganseg")
    program = [str(script)] if script.is_file() else [sys.executable, "-m", "SDMOrganSegLib.cli"]
    if processes == 1:
        return program
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    return launcher + (["--no-python"] + program if script.is_file() else program[1:])


def train(out: Path, processes: int, threads: int, epochs: int) -> tuple[list[dict[str, str]], float]:
    arguments = ["train", str(DATA), "--out", str(out), "--epochs", str(epochs), "--validate-every", str(epochs),
                 "--threads", str(threads), "--device", "cpu", "--seed", "0", "--name", "bench"]
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads),
                   "PYTHONPATH": os.pathsep.join([str(_common.ROOT / "SDMOrganSeg"), os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    done = subprocess.run(command(processes) + arguments, capture_output=True, text=True, env=environment, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{processes} process(es) failed:\n{done.stderr[-3000:]}")
    with open(out / "log.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle)), wall


_ALL_REDUCE = """
import sys, time, torch
sys.path.insert(0, {library!r})
from SDMOrganSegLib.engines import distributed
from SDMOrganSegLib.method.network import UNet3D, preset

with distributed.process_group("gloo") as ranks:
    gradients = torch.ones(sum(p.numel() for p in UNet3D(preset("cpu", 1, 2)).parameters()))
    times = []
    for _ in range(12):
        distributed.barrier(ranks)
        started = time.perf_counter()
        torch.distributed.all_reduce(gradients)
        times.append(time.perf_counter() - started)
    if ranks.main:
        print(gradients.numel(), min(times[2:]))
"""


def all_reduce_seconds() -> tuple[int, float]:
    """Best time of one gloo all-reduce of the cpu preset's gradients (float32) between 2 processes."""
    with tempfile.TemporaryDirectory(prefix="bench_allreduce_") as scratch:
        script = Path(scratch) / "all_reduce.py"
        script.write_text(_ALL_REDUCE.format(library=str(_common.ROOT / "SDMOrganSeg")), encoding="utf-8")
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)],
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
    count, seconds = done.stdout.split()[-2:]
    return int(count), float(seconds)


def main() -> None:
    parser = _common.argument_parser(__doc__, "1 round of 2 epochs per configuration")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per configuration (default 3, 1 with --quick)")
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    epochs = 2 if args.quick else 4
    info = _common.print_machine("bench_distributed: training steps on 1 and 2 CPU processes")
    steps = {name: float("inf") for name in CONFIGURATIONS}
    walls = {name: float("inf") for name in CONFIGURATIONS}
    losses: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_distributed_") as scratch:
        for round_index in range(rounds):
            names = list(CONFIGURATIONS) if round_index % 2 == 0 else list(reversed(CONFIGURATIONS))
            for name in names:
                processes, threads = CONFIGURATIONS[name]
                rows, wall = train(Path(scratch) / f"{round_index}-{processes}x{threads}", processes, threads, epochs)
                per_step = [float(row["epoch_s"]) / 3 for row in rows[1:]]  # 5 cases in batches of 2: 3 steps
                steps[name] = min(steps[name], min(per_step))
                walls[name] = min(walls[name], wall)
                losses[name] = [float(row["loss"]) for row in rows]
                print(f"   round {round_index + 1}, {name}: {min(per_step):.3f} s/step, command {wall:.1f} s, "
                      f"load {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    reference = "1 process, 1 thread"
    table = []
    for name in CONFIGURATIONS:
        difference = max(abs(a - b) / abs(b) for a, b in zip(losses[name], losses[reference]))
        table.append({"configuration": name, "s/step": steps[name], "steps/s": 1 / steps[name],
                      "speed-up": steps[reference] / steps[name], "command s": walls[name], "max rel. epoch-loss diff": f"{difference:.1e}"})
    print(_common.table(table, ["configuration", "s/step", "steps/s", "speed-up", "command s", "max rel. epoch-loss diff"]))
    count, seconds = all_reduce_seconds()
    print(f"   gloo all-reduce of the gradients ({count:,} float32, {count * 4 / 1e6:.1f} MB) between 2 processes: {seconds * 1000:.1f} ms")
    print(f"   load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    _common.save_json(args.json, {"machine": info, "epochs": epochs, "rounds": rounds, "results": table, "all_reduce_s": seconds})


if __name__ == "__main__":
    main()
