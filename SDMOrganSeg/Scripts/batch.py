#!/usr/bin/env python
"""Segment a folder or a list of volumes with SDMOrganSeg, writing one output folder per case.

Runs the same Logic as the Slicer module, either inside Slicer::

    Slicer --no-main-window --python-script SDMOrganSeg/Scripts/batch.py --input IMAGES --output OUT

or on plain Python with the ``slicer-core`` package (a headless MRML scene)::

    python SDMOrganSeg/Scripts/batch.py --input IMAGES --output OUT [--model M] [--reference LABELS]

or on several processes, one per GPU, with PyTorch's launcher (multi-node: ``--nnodes``, ``--rdzv-endpoint``)::

    torchrun --standalone --nproc-per-node=8 SDMOrganSeg/Scripts/batch.py --input IMAGES --output OUT --device cuda

This script parses the command line and calls :func:`SDMOrganSegLib.mrml.batch.main`; that module's docstring
lists the files a run writes (per case the files of ``sdmorganseg segment`` plus ``<case>.seg.nrrd``; at the top
``summary.csv`` and, with ``--pictures``, ``overview.png``) and how a rerun keeps the cases already done. The
exit code is 0 only when every case succeeded (1: some failed, 2: nothing could be run, including any
unexpected error: inside Slicer the application always exits with the code, so no window-less Slicer is
left running).

Slicer reads this script with the locale's encoding, so it is pure ASCII; and every import other than the
standard library's happens inside :func:`run`'s guard, so that a missing or broken package is one line and
an exit code, never an exception that leaves a window-less Slicer running.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

# SDMOrganSegLib sits beside Scripts/, both in the source tree and in an installed extension. It is imported
# in main(), under run()'s guard (see the module docstring).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# SDMOrganSegLib.mrml.batch's codes, repeated: run() needs them when the library itself fails to import.
EXIT_OK, EXIT_SETUP = 0, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batch.py",
        description="Segment many volumes with SDMOrganSeg (organ segmentation by signed distance maps).",
    )
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="image files (NIfTI/NRRD/MetaImage) and/or folders of them; a folder without image files is read as one DICOM series")
    parser.add_argument("--output", required=True, help="output folder (created if needed)")
    parser.add_argument("--model", default=None, help="model folder or shipped model name (default: the shipped model)")
    parser.add_argument("--reference", default=None, metavar="FOLDER",
                        help="folder of reference label maps with the same file names as the inputs: adds metrics.csv and metrics to summary.csv")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the network runs (default auto)")
    parser.add_argument("--runtime", default="auto", choices=["auto", "onnxruntime", "torch"],
                        help="what runs the network: ONNX Runtime (the model's model.onnx) or PyTorch; auto = ONNX Runtime when it is installed and the model has model.onnx, else PyTorch (default auto)")
    parser.add_argument("--levels", default="0,0.1,0.2,0.3", help="SDM iso-contour levels (default 0,0.1,0.2,0.3)")
    parser.add_argument("--format", default="nifti", metavar="nifti|nrrd[,dicom-seg][,rtstruct]",
                        help="image output format (default nifti); dicom-seg / rtstruct add seg.dcm / rtstruct.dcm for DICOM series inputs")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None, help="mirroring test-time augmentation (twice the network time); default: as the model card says")
    parser.add_argument("--largest-component", action="store_true", help="keep only the largest connected component of each organ in the label map")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--force", action="store_true", help="segment cases that are not of the model's modality (e.g. an MR given to a CT model), which are otherwise failed before the network runs")
    parser.add_argument("--pictures", action="store_true",
                        help="also save <case>.png (slices with the outlines, SDM levels, reference and Dice) and overview.png (all cases, worst Dice first)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the batch (:func:`SDMOrganSegLib.mrml.batch.main`); returns the exit code."""
    args = build_parser().parse_args(argv)
    from SDMOrganSegLib.mrml import batch

    return batch.main(args)


def _one_line(error: BaseException) -> str:
    # By class name, not isinstance: this also reports the library failing to import.
    if any(cls.__name__ == "SDMOrganSegError" for cls in type(error).__mro__):
        return " ".join(str(error).split())
    return f"internal error ({type(error).__name__}: {' '.join(str(error).split())})"


def run(argv: Sequence[str]) -> int:
    """:func:`main` that always comes back with an exit code: for usage errors and ``--help`` (argparse's
    SystemExit), Ctrl+C and any unexpected exception (one line on stderr; the traceback only with
    ``SDMORGANSEG_DEBUG=1``). Under ``Slicer --no-main-window`` an exception escaping the script would
    leave a window-less Slicer running for ever."""
    try:
        return main(argv)
    except SystemExit as request:
        code = request.code
        return code if isinstance(code, int) else (EXIT_OK if code is None else EXIT_SETUP)
    except BaseException as error:  # KeyboardInterrupt too: the application must still exit
        if os.environ.get("SDMORGANSEG_DEBUG"):
            import traceback

            traceback.print_exc()
        reason = "interrupted" if isinstance(error, KeyboardInterrupt) else _one_line(error)
        if not getattr(error, "reported", False):  # under torchrun, all_or_none printed it already
            print(f"error: {reason}", file=sys.stderr, flush=True)
        return EXIT_SETUP


def _exit(code: int) -> None:
    import slicer

    if getattr(slicer, "app", None) is not None:
        slicer.util.exit(code)  # inside Slicer: leave the application with this status
    else:
        sys.exit(code)


if __name__ == "__main__":
    import importlib.util

    if importlib.util.find_spec("slicer") is None:
        print("sdmorganseg: error: batch.py needs Slicer or the slicer-core package; pip install slicer-core", file=sys.stderr)
        sys.exit(EXIT_SETUP)
    _exit(run(sys.argv[1:]))
