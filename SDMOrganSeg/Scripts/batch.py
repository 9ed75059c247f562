#!/usr/bin/env python
"""Segment a folder or a list of volumes with SDMOrganSeg, writing one output folder per case.

Runs the same Logic as the Slicer module (``SDMOrganSegLib.mrmllogic``), either inside Slicer::

    Slicer --no-main-window --python-script SDMOrganSeg/Scripts/batch.py --input IMAGES --output OUT

or on plain Python with the ``slicer-core`` package (a headless MRML scene, see ``headless.py``)::

    python SDMOrganSeg/Scripts/batch.py --input IMAGES --output OUT [--model M] [--reference LABELS]

Per case, in ``OUT/<case>/``: ``<case>.seg.nrrd`` (one segment per organ, named and coloured as the model
card says), ``sdm_<organ>.nrrd``, ``contours/<organ>_<level>.vtk`` (LPS), ``metrics.csv`` with
``--reference``, ``<case>.png`` with ``--pictures``. At the top, ``summary.csv``: one row per case with its
status (ok/failed), the reason of a failure, per-organ volumes (ml), Dice/HD/HD95/ASD when references are
given, and the seconds it took. A case that fails is reported on one line and skipped; the exit code is 0
only when every case succeeded (1: some failed, 2: nothing could be run, including any unexpected error:
inside Slicer the application always exits with the code, so no window-less Slicer is left running).

Files are written under temporary names and renamed when complete; existing files are never replaced
without ``--overwrite``; case names are sanitised so nothing is written outside ``OUT``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

# SDMOrganSegLib sits beside Scripts/, both in the source tree and in an installed extension.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from SDMOrganSegLib.errors import SDMOrganSegError  # noqa: E402  (after the path set-up above)

EXIT_OK, EXIT_SOME_FAILED, EXIT_SETUP = 0, 1, 2
SUMMARY = "summary.csv"


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
    parser.add_argument("--levels", default="0,0.1,0.2,0.3", help="SDM iso-contour levels (default 0,0.1,0.2,0.3)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--pictures", action="store_true", help="also save <case>.png: axial, coronal and sagittal slices with the iso-contours")
    return parser


@dataclass
class CaseResult:
    case: str
    status: str = "failed"
    reason: str = ""
    seconds: float = 0.0
    volumes_ml: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)  # organ -> OrganMetrics


def find_cases(inputs: Sequence[str]) -> list[Path]:
    """Image files named on the command line or found (not recursively) in the folders named."""
    from SDMOrganSegLib.imageio import is_image_file

    cases: list[Path] = []
    for entry in inputs:
        path = Path(entry)
        if path.is_dir():
            images = sorted(p for p in path.iterdir() if is_image_file(p))
            cases.extend(images if images else [path])  # no image files: a DICOM series folder
        else:
            cases.append(path)  # a missing file is reported as a failed case
    return cases


def _case_files(case: str, organs: Sequence[Any], levels: Sequence[float], reference: bool, pictures: bool) -> list[str]:
    """Relative output paths of one case, in writing order."""
    from SDMOrganSegLib.contours import level_tag
    from SDMOrganSegLib.files import safe_name

    names = [f"{case}.seg.nrrd"] + [f"sdm_{safe_name(o.name)}.nrrd" for o in organs]
    names += [f"contours/{safe_name(o.name)}_{level_tag(level)}.vtk" for o in organs for level in levels]
    if reference:
        names.append("metrics.csv")
    if pictures:
        names.append(f"{case}.png")
    return names


def write_picture(image: Any, computed: Any, path: Path, title: str) -> None:
    """Axial, coronal and sagittal slices through the organs' centre, with the SDM iso-contours."""
    import numpy as np
    import SimpleITK as sitk
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from SDMOrganSegLib.contours import level_color, level_tag

    def oriented(img: Any) -> np.ndarray:
        # LPS-ordered axes: rows/columns then read as radiologists expect (patient left on the right).
        return sitk.GetArrayFromImage(sitk.DICOMOrient(img, "LPS"))

    volume = oriented(image).astype(np.float32)
    labels = oriented(computed.labels)
    sdms = {organ.name: oriented(computed.sdms[organ.name]) for organ in computed.organs}
    spacing = sitk.DICOMOrient(image, "LPS").GetSpacing()
    inside = np.argwhere(labels > 0)
    centre = inside.mean(axis=0).round().astype(int) if inside.size else np.array(volume.shape) // 2
    low, high = np.percentile(volume, [1, 99])
    views = [  # (name, 2D slice of an array, aspect = row spacing / column spacing, origin)
        ("axial", lambda a: a[centre[0]], spacing[1] / spacing[0], "upper"),
        ("coronal", lambda a: a[:, centre[1], :], spacing[2] / spacing[0], "lower"),
        ("sagittal", lambda a: a[:, :, centre[2]], spacing[2] / spacing[1], "lower"),
    ]
    figure = Figure(figsize=(12, 4.6), dpi=100)
    FigureCanvasAgg(figure)
    for index, (name, cut, aspect, origin) in enumerate(views):
        axes = figure.add_subplot(1, 3, index + 1)
        axes.imshow(cut(volume), cmap="gray", vmin=low, vmax=high, origin=origin, aspect=aspect, interpolation="bilinear")
        for sdm in sdms.values():
            plane = cut(sdm)
            for level in computed.levels:
                if plane.min() < level < plane.max():
                    axes.contour(plane, levels=[level], colors=[level_color(level)], linewidths=1.3, origin=origin)
        axes.set_title(name)
        axes.set_axis_off()
    handles = [Line2D([0], [0], color=level_color(level), lw=2, label=f"SDM {level_tag(level)}") for level in computed.levels]
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    figure.suptitle(title)
    figure.savefig(str(path), format="png")


def _write_metrics(results: dict[str, Any], path: Path) -> None:
    from SDMOrganSegLib.metrics import write_metrics_csv

    write_metrics_csv(results, path, overwrite=True)


def process_case(path: Path, case: str, args: argparse.Namespace, context: dict[str, Any]) -> CaseResult:
    """Segment one case and write its files; raises SDMOrganSegError with a one-line reason on failure."""
    from SDMOrganSegLib import headless, mrmllogic
    from SDMOrganSegLib.files import check_writable, inside
    from SDMOrganSegLib.imageio import read_volume

    result = CaseResult(case)
    output = Path(args.output)
    case_dir = inside(output, case)
    names = _case_files(case, context["organs"], context["levels"], args.reference is not None, args.pictures)
    targets = {name: inside(case_dir, name) for name in names}
    for target in targets.values():
        check_writable(target, args.overwrite)
    image = read_volume(path, "image")
    reference = None
    if args.reference is not None:
        reference = Path(args.reference) / path.name
        if not reference.is_file():
            raise SDMOrganSegError(f"no reference label map {reference} (references need the input's file name)")
    scene = context["scene"]
    logic: mrmllogic.SDMSegmentationLogic = context["logic"]
    volume = mrmllogic.sitk_to_volume_node(image, case, scene)
    try:
        outputs = logic.segment_volume(volume, context["model_dir"], args.device, context["levels"], show2D=False, show3D=False)
        try:
            computed = outputs.computed
            result.volumes_ml = outputs.organ_volumes_ml()
            case_dir.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=case_dir))
            try:
                from SDMOrganSegLib.contours import level_tag
                from SDMOrganSegLib.files import safe_name, worker_threads
                from SDMOrganSegLib.imageio import error_line
                from SDMOrganSegLib.imagewriting import write_image

                # The SDM volumes are the computed images the nodes show, written by imagewriting (ITK's NRRD,
                # ISA-L gzip: 0.43 s for a CT SDM against 1.9 s through Slicer's storage node) on worker
                # threads while the segmentation and the surfaces go through Slicer's storage nodes here.
                with ThreadPoolExecutor(worker_threads()) as pool:
                    sdm_files = {
                        organ.name: pool.submit(write_image, computed.sdms[organ.name], staging / f"sdm_{safe_name(organ.name)}.nrrd")
                        for organ in computed.organs
                    }
                    headless.save_node(outputs.segmentation, staging / f"{case}.seg.nrrd", overwrite=True)
                    for organ in computed.organs:
                        for level, model in outputs.contours[organ.name].items():
                            (staging / "contours").mkdir(exist_ok=True)
                            headless.save_node(model, staging / "contours" / f"{safe_name(organ.name)}_{level_tag(level)}.vtk", overwrite=True)
                    for organ_name, written in sdm_files.items():
                        try:
                            written.result()
                        except (RuntimeError, OSError) as error:
                            raise SDMOrganSegError(f"cannot write the SDM of {organ_name}: {error_line(error)}; check free disk space and permissions") from None
                if reference is not None:
                    from SDMOrganSegLib.imageio import read_image
                    from SDMOrganSegLib.metrics import evaluate_images

                    organs = {organ.label: organ.name for organ in computed.organs}
                    result.metrics = evaluate_images(computed.labels, read_image(reference, "reference label map"), organs)
                    _write_metrics(result.metrics, staging / "metrics.csv")
                if args.pictures:
                    write_picture(image, computed, staging / f"{case}.png", f"{case} — {computed.model_name}")
                # Everything is complete: move into place (each rename is atomic).
                for name, target in targets.items():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(staging / name, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        finally:
            logic.remove_outputs(outputs)
    finally:
        if scene.IsNodePresent(volume):
            scene.RemoveNode(volume)
    result.status = "ok"
    return result


def summary_csv(results: Sequence[CaseResult], organs: Sequence[Any], with_metrics: bool) -> str:
    """The summary table: case, status, reason, seconds, per-organ volumes and (optionally) metrics."""
    from SDMOrganSegLib.files import safe_name

    header = ["case", "status", "reason", "seconds"] + [f"volume_ml_{safe_name(o.name)}" for o in organs]
    metric_fields = (("dice", "dice"), ("hd_mm", "hd"), ("hd95_mm", "hd95"), ("asd_mm", "asd"))
    if with_metrics:
        header += [f"{column}_{safe_name(o.name)}" for o in organs for column, _ in metric_fields]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for result in results:
        row = [result.case, result.status, result.reason, f"{result.seconds:.2f}"]
        row += [f"{result.volumes_ml[o.name]:.4f}" if o.name in result.volumes_ml else "" for o in organs]
        if with_metrics:
            for organ in organs:
                metrics = result.metrics.get(organ.name)
                row += [repr(float(getattr(metrics, attribute))) if metrics is not None else "" for _, attribute in metric_fields]
        writer.writerow(row)
    return buffer.getvalue()


def missing_packages(reference: bool, pictures: bool) -> list[str]:
    """pip names of the packages this run needs that cannot be imported (checked before any work)."""
    import importlib.util

    wanted = {"torch": "torch", "safetensors": "safetensors", "edt": "edt", "SimpleITK": "SimpleITK"}
    if reference:
        wanted["scipy"] = "scipy"
    if pictures:
        wanted["matplotlib"] = "matplotlib"
    return [name for module, name in wanted.items() if importlib.util.find_spec(module) is None]


def _one_line(error: BaseException) -> str:
    if isinstance(error, SDMOrganSegError):
        return " ".join(str(error).split())
    return f"internal error ({type(error).__name__}: {' '.join(str(error).split())})"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    output = Path(args.output)
    summary_path = output / SUMMARY
    try:
        # Checked first, before the slow imports: refusing to overwrite should be instant.
        if summary_path.exists() and not args.overwrite:
            raise SDMOrganSegError(f"{summary_path} already exists (an earlier run); pass --overwrite to replace its outputs or choose another --output")
        from SDMOrganSegLib import headless, mrmllogic
        from SDMOrganSegLib.files import safe_name, write_text_atomic
        from SDMOrganSegLib.imageio import case_name

        levels = mrmllogic.as_levels(args.levels)
        if args.reference is not None and not Path(args.reference).is_dir():
            raise SDMOrganSegError(f"--reference {args.reference} is not a folder")
        missing = missing_packages(reference=args.reference is not None, pictures=args.pictures)
        if missing:
            raise SDMOrganSegError(
                f"Python packages missing: {', '.join(missing)}; install them (pip install {' '.join(missing)}), "
                "or in Slicer open the SDM Organ Segmentation module once and let it install them"
            )
        from SDMOrganSegLib import modelfiles  # PyTorch: only now that it is known to be there
        from SDMOrganSegLib.inference import resolve_device

        resolve_device(args.device)  # e.g. --device cuda without a GPU: say so once, not for every case
        model_dir = modelfiles.resolve_model(args.model)
        card = modelfiles.read_card(model_dir)
        cases = find_cases(args.input)
        if not cases:
            raise SDMOrganSegError("no input images found; give image files or folders holding them")
        session = headless.start()
        context = {
            "scene": session.scene, "logic": mrmllogic.SDMSegmentationLogic(session.scene), "model_dir": model_dir,
            "organs": card.organs, "levels": levels,
        }
        output.mkdir(parents=True, exist_ok=True)
    except SDMOrganSegError as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return EXIT_SETUP

    print(f"SDMOrganSeg batch: {len(cases)} case(s), model {card.name} ({model_dir}), device {args.device}", flush=True)
    results: list[CaseResult] = []
    seen: set[str] = set()
    for number, path in enumerate(cases, start=1):
        case = safe_name(case_name(path))
        started = time.perf_counter()
        try:
            if case in seen:
                raise SDMOrganSegError(f"another input is also named {case!r}; case names must be unique")
            seen.add(case)
            result = process_case(path, case, args, context)
        except Exception as error:  # one bad case must not stop the others
            result = CaseResult(case, "failed", _one_line(error))
            with contextlib.suppress(OSError):
                (Path(args.output) / case).rmdir()  # only if the failed case left it empty
            if os.environ.get("SDMORGANSEG_DEBUG"):
                import traceback

                traceback.print_exc()
        result.seconds = time.perf_counter() - started
        results.append(result)
        verdict = f"ok ({result.seconds:.1f} s)" if result.status == "ok" else f"FAILED: {result.reason}"
        print(f"[{number}/{len(cases)}] {case}: {verdict}", flush=True)

    try:
        write_text_atomic(summary_path, summary_csv(results, card.organs, args.reference is not None), overwrite=True)
    except OSError as error:
        print(f"error: could not write {summary_path}: {error}", file=sys.stderr)
        return EXIT_SETUP
    succeeded = sum(result.status == "ok" for result in results)
    print(f"{succeeded} of {len(results)} case(s) succeeded; summary: {summary_path}", flush=True)
    return EXIT_OK if succeeded == len(results) else EXIT_SOME_FAILED


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
        print("error: batch.py needs Slicer or the slicer-core package (pip install slicer-core)", file=sys.stderr)
        sys.exit(EXIT_SETUP)
    _exit(run(sys.argv[1:]))
