"""Fuzz the image readers: mutated bytes of small real NIfTI / NRRD / MetaImage files into ``read_volume``.

``imageio.read_volume`` must turn every bad file into an ``SDMOrganSegError``; any other exception is a
finding, and so is a crash of the process (ITK is C++). The fuzzer is atheris (libFuzzer, coverage-guided
on the Python side) when installed, else a seeded random byte mutator.

    python benchmarks/fuzz_readers.py --seconds 120 --out /tmp/fuzz-readers

Writes ``stats.json`` (inputs run, findings by kind) to ``--out`` and each finding's input under
``--out/findings/``. The first byte of a fuzz input picks the file name suffix (which selects ITK's
reader); the rest is the file.
"""

from __future__ import annotations

import argparse
import atexit
import faulthandler
import hashlib
import json
import os
import random
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SDMOrganSeg"))

SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")

STATE: dict = {"inputs": 0, "by_outcome": {}, "findings": {}, "started": time.time()}
OUT = Path(tempfile.gettempdir()) / "fuzz-readers"
WORK = Path(tempfile.mkdtemp(prefix="fuzz-readers-"))


def seed_files() -> list[bytes]:
    """Small real files of every reader, tagged with their suffix byte: a tiny random volume written as
    NIfTI (gzip and raw), NRRD (raw and gzip encoding) and MetaImage (raw and compressed), plus a crop
    of the hippocampus test case."""
    rng = np.random.default_rng(0)
    volumes = [
        sitk.GetImageFromArray(rng.normal(size=(4, 5, 6)).astype(np.float32)),
        sitk.GetImageFromArray(rng.integers(-50, 200, size=(3, 4, 5)).astype(np.int16)),
    ]
    data = Path(__file__).resolve().parents[1] / "Testing" / "Data" / "hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"
    if data.is_file():
        volumes.append(sitk.ReadImage(str(data))[10:16, 10:15, 10:14])
    volumes[0].SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    seeds = []
    for image in volumes:
        for tag, suffix in enumerate(SUFFIXES):
            for compress in (False, True):
                path = WORK / f"seed{suffix}"
                sitk.WriteImage(image, str(path), useCompression=compress)
                seeds.append(bytes([tag]) + path.read_bytes())
    return seeds


def save_stats() -> None:
    STATE["seconds"] = round(time.time() - STATE["started"], 1)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "stats.json").write_text(json.dumps(STATE, indent=1, default=str) + "\n")


def run_one(data: bytes) -> None:
    """One fuzz input through ``read_volume``; records the outcome, never raises."""
    from SDMOrganSegLib.common.errors import SDMOrganSegError
    from SDMOrganSegLib.images.imageio import read_volume

    if not data:
        return
    path = WORK / f"input{SUFFIXES[data[0] % len(SUFFIXES)]}"
    path.write_bytes(data[1:])
    # What a crash of the process leaves behind: the last inputs, since C++ memory corruption may only
    # crash a later read (replay them with --replay).
    (OUT / "recent").mkdir(exist_ok=True)
    (OUT / "recent" / f"{STATE['inputs'] % 64:02d}").write_bytes(data)
    (OUT / "last_input").write_bytes(data)
    STATE["inputs"] += 1
    try:
        read_volume(path)
        outcome = "read"
    except SDMOrganSegError as error:
        # Grouped by the kind of message: the path and the numbers in it taken out.
        outcome = "refused: " + re.sub(r"-?\d+", "#", str(error).replace(str(path), "FILE").split(";")[0])[:70]
    except Exception as error:  # anything else is a finding
        frame = traceback.extract_tb(error.__traceback__)[-1]
        key = f"{type(error).__name__} at {Path(frame.filename).name}:{frame.lineno}"
        outcome = "finding"
        if key not in STATE["findings"]:
            STATE["findings"][key] = {"count": 0, "message": str(error)[:300], "example": ""}
            name = hashlib.sha1(data).hexdigest()[:12]
            (OUT / "findings").mkdir(parents=True, exist_ok=True)
            (OUT / "findings" / name).write_bytes(data)
            STATE["findings"][key]["example"] = f"findings/{name}"
        STATE["findings"][key]["count"] += 1
    STATE["by_outcome"][outcome] = STATE["by_outcome"].get(outcome, 0) + 1
    if STATE["inputs"] % 200 == 0:
        save_stats()


def mutate(data: bytes, rng: random.Random) -> bytes:
    """A few random edits of the kinds that break readers: bit flips, interesting integers in headers,
    truncation, inserted or deleted runs, header text edits."""
    buffer = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if len(buffer) < 2:
            break
        choice = rng.random()
        position = rng.randrange(1, len(buffer))
        if choice < 0.3:
            buffer[position] ^= 1 << rng.randrange(8)
        elif choice < 0.5:
            value = rng.choice([0, 1, 2, 3, 7, 8, 127, 128, 255, 0x7FFF, 0x8000, 0xFFFF, 2**31 - 1, 2**31, 2**32 - 1])
            width = rng.choice([1, 2, 4])
            buffer[position : position + width] = value.to_bytes(8, "little")[:width]
        elif choice < 0.65:
            del buffer[rng.randrange(1, len(buffer)) :]
        elif choice < 0.8:
            buffer[position:position] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif choice < 0.9:
            del buffer[position : position + rng.randint(1, 32)]
        else:
            text = rng.choice([b"sizes: 0 5 6", b"sizes: 99999 99999 99999", b"dimension: 4", b"type: double", b"encoding: bzip2",
                               b"NDims = 2", b"DimSize = 0 0 0", b"ElementType = MET_DOUBLE", b"space directions: (0,0,0) (0,1,0) (0,0,1)",
                               b"ElementDataFile = x%03d.raw 1 2 1", b"ElementDataFile = x%s%n.raw 1 2 1", b"data file: x%s%n%d.raw 1 2 1"])
            buffer[position:position] = b"\n" + text + b"\n"
    return bytes(buffer)


def fuzz_random(seconds: float, seed: int) -> None:
    rng = random.Random(seed)
    seeds = seed_files()
    stop = time.time() + seconds
    while time.time() < stop:
        run_one(mutate(rng.choice(seeds), rng))


def fuzz_atheris(seconds: float) -> None:
    import atheris

    seeds = seed_files()
    corpus = OUT / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for index, data in enumerate(seeds):
        (corpus / f"seed{index:02d}").write_bytes(data)

    def mutator(data: bytes, max_size: int, seed: int) -> bytes:
        # ITK's C++ readers give no coverage feedback, so the corpus would shrink to the few inputs that
        # differ on the Python side; keep mutating whole real files as well as libFuzzer's choices.
        rng = random.Random(seed)
        if len(data) < 64 or rng.random() < 0.3:
            data = rng.choice(seeds)
        if rng.random() < 0.5:
            return atheris.Mutate(data, max_size)
        return mutate(data, rng)[:max_size]

    atheris.Setup(
        [sys.argv[0], f"-max_total_time={int(seconds)}", "-max_len=8192", "-len_control=0", "-timeout=20",
         "-rss_limit_mb=3072", f"-artifact_prefix={OUT}/", str(corpus)],
        run_one,
        custom_mutator=mutator,
    )
    atheris.Fuzz()


def main() -> None:
    global OUT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--engine", choices=["auto", "atheris", "random"], default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replay", nargs="*", help="run these saved inputs (files) one after the other and report each outcome")
    args = parser.parse_args()
    OUT = Path(args.out)
    OUT.mkdir(parents=True, exist_ok=True)
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401

            engine = "atheris"
        except ImportError:
            engine = "random"
    if engine == "atheris":
        import atheris

        with atheris.instrument_imports(include=["SDMOrganSegLib"]):
            from SDMOrganSegLib.images import imageio
    else:
        from SDMOrganSegLib.images import imageio
    imageio.capture_native_messages = True  # as the command line runs it
    # stderr is captured during reads, so crash stacks go to a file of their own.
    faulthandler.enable(file=open(OUT / "crash_stack.txt", "w"))  # noqa: SIM115 (open until exit)
    if args.replay is not None:
        for name in args.replay:
            before = dict(STATE["by_outcome"])
            run_one(Path(name).read_bytes())
            print(name, [k for k in STATE["by_outcome"] if STATE["by_outcome"][k] != before.get(k)], flush=True)
        return
    STATE["engine"] = engine
    atexit.register(save_stats)
    if engine == "atheris":
        fuzz_atheris(args.seconds)
    else:
        fuzz_random(args.seconds, args.seed)
    save_stats()
    print(json.dumps({k: STATE[k] for k in ("engine", "inputs", "findings")}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
