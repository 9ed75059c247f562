"""The batch run behind ``Scripts/batch.py``: many volumes segmented with the panel's Logic
(:class:`.mrmllogic.SDMSegmentationLogic`) in a headless MRML scene (:mod:`.headless`: Slicer's own, or the
``slicer-core`` package), one output folder per case, optionally on several processes under torchrun.

The script parses the command line (its ``--help`` is the reference) and calls :func:`main`; this module
does the rest. It is on the Slicer side because every case goes through the MRML scene, exactly as in the
panel.

Per case, in ``OUT/<case>/``, the files ``sdmorganseg segment`` writes, under the same names:
``labels.nii.gz`` (``.nrrd`` with ``--format nrrd``), ``sdm_<organ>.nii.gz``, ``contours/<organ>_<level>.vtp``
(LPS), ``summary.json``; plus ``<case>.seg.nrrd`` (a Slicer segmentation, one segment per organ, named and
coloured as the model card says), ``seg.dcm`` / ``rtstruct.dcm`` for a DICOM series with ``--format
dicom-seg`` / ``rtstruct``, ``metrics.csv`` when the case has a reference, ``<case>.png`` with ``--pictures``.
At the top, ``summary.csv``: one row per case with its status (ok/failed), the reason of a failure, notes
(e.g. a missing reference: the case is segmented, only its metrics are skipped), per-organ volumes (ml),
Dice/HD/HD95/ASD when references are given, and the seconds it took; with ``--pictures`` also
``overview.png``, every case's axial view sorted by its worst Dice. A case that fails is reported on one
line (``sdmorganseg: error: ...`` on stderr, like the command line) and skipped; the exit code is 0 only when
every case succeeded (1: some failed, 2: nothing could be run).

Under torchrun each rank segments its share of the cases (:func:`SDMOrganSegLib.engines.distributed.shard`,
by input size) on ``cuda:LOCAL_RANK``, exactly as one process would; rank 0 gathers the rows and writes the
summary files.

Files are written under temporary names and renamed when complete; existing files are never replaced
without ``--overwrite``; case names are sanitised so nothing is written outside ``OUT``. A rerun after a
crash (no ``summary.csv`` yet) keeps the cases an earlier run with the same settings completed
(:func:`done_earlier`) and does the others.

The library's modules are imported inside the functions, as the script did: refusing to overwrite an
earlier run is checked before the slow imports (SimpleITK, VTK, the MRML scene).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

#: Exit codes: every case succeeded; some failed; nothing could be run (the set-up failed).
EXIT_OK, EXIT_SOME_FAILED, EXIT_SETUP = 0, 1, 2
SUMMARY = "summary.csv"
OVERVIEW = "overview.png"


@dataclass
class CaseResult:
    case: str
    status: str = "failed"
    reason: str = ""
    seconds: float = 0.0
    volumes_ml: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)  # organ -> OrganMetrics
    notes: list[str] = field(default_factory=list)
    thumbnail: Any = None  # pictures.Thumbnail with --pictures
    earlier: bool = False  # complete from an earlier run, not segmented again


def find_cases(inputs: Sequence[str]) -> list[Path]:
    """Image files named on the command line or found (not recursively) in the folders named."""
    from ..images.imageio import is_image_file

    cases: list[Path] = []
    for entry in inputs:
        path = Path(entry)
        if path.is_dir():
            images = sorted(p for p in path.iterdir() if is_image_file(p))
            cases.extend(images if images else [path])  # no image files: a DICOM series folder
        else:
            cases.append(path)  # a missing file is reported as a failed case
    return cases


def _reference_for(path: Path, args: argparse.Namespace, result: CaseResult) -> Path | None:
    """The case's reference label map, or None (with a note) when --reference has none for it."""
    if args.reference is None:
        return None
    reference = Path(args.reference) / path.name
    if reference.is_file() or reference.is_dir():
        return reference
    result.notes.append(f"no reference label map {reference} (references need the input's file name): metrics skipped")
    return None


def _plan(path: Path, case: str, args: argparse.Namespace, context: dict[str, Any], result: CaseResult) -> tuple[list[str], tuple[str, ...], Path | None]:
    """The files a case gets (relative to its folder, summary.json last), its DICOM formats and its
    reference; notes in ``result`` say what it does not get."""
    from ..engines.outputs import DICOM_FILES, output_names

    volume_format, dicom_formats = context["formats"]
    if dicom_formats and not path.is_dir():
        result.notes.append(f"not a DICOM series, so no {' or '.join(DICOM_FILES[f] for f in dicom_formats)}")
        dicom_formats = ()
    reference = _reference_for(path, args, result)
    extra_names = [f"{case}.seg.nrrd"] + [DICOM_FILES[f] for f in dicom_formats]
    extra_names += ["metrics.csv"] if reference is not None else []
    extra_names += [f"{case}.png"] if args.pictures else []
    names = output_names([o.name for o in context["organs"]], context["levels"], volume_format)
    return names[:-1] + extra_names + names[-1:], dicom_formats, reference


def _settings(path: Path, args: argparse.Namespace, context: dict[str, Any], reference: Path | None) -> dict[str, Any]:
    """What a case's summary.json records of the run that made it, beyond its file names."""
    return {
        "input": str(path), "model_folder": str(context["model_dir"]), "reference": str(reference) if reference else None,
        "tta": args.tta, "largest_component": bool(args.largest_component), "sdm_levels": list(context["levels"]),
    }


def done_earlier(path: Path, case: str, args: argparse.Namespace, context: dict[str, Any]) -> CaseResult | None:
    """The result of a case whose outputs an earlier run with the same settings completed, else None.

    Complete means: ``summary.json`` exists, lists this run's file names and settings, and every file it
    lists exists. A case's files are moved into place from a staging folder only once all are written,
    summary.json last, so a run killed at any point leaves either no summary.json or a complete case."""
    import json

    from ..common.files import inside

    case_dir = inside(Path(args.output), case)
    try:
        summary = json.loads((case_dir / "summary.json").read_text(encoding="utf-8"))
        result = CaseResult(case, "ok", earlier=True)
        names, _, reference = _plan(path, case, args, context, result)
        same = all(summary.get(key) == value for key, value in _settings(path, args, context, reference).items())
        if not same or sorted(summary["outputs"]) != sorted(names) or not all((case_dir / name).is_file() for name in names):
            return None
        result.notes = list(summary["notes"]) + ["complete from an earlier run: not segmented again"]
        result.volumes_ml = {name: float(values["volume_ml"]) for name, values in summary["organs"].items()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        return None  # no summary, or not one of ours: the case is run, and refuses to replace files without --overwrite
    if reference is not None:
        from ..method.metrics import read_metrics_csv

        result.metrics = read_metrics_csv(case_dir / "metrics.csv")
    if args.pictures:
        result.thumbnail = _thumbnail_of(path, case_dir, context, reference, result)
    return result


def _thumbnail_of(path: Path, case_dir: Path, context: dict[str, Any], reference: Path | None, result: CaseResult) -> Any:
    """The overview thumbnail of a case done earlier, drawn again from its files."""
    from ..common.files import safe_name
    from ..images.imageio import read_image, read_volume
    from ..engines.outputs import FORMATS
    from ..images.pictures import case_thumbnail

    suffix = FORMATS[context["formats"][0]]
    organs = context["organs"]
    sdms = {o.name: read_image(case_dir / f"sdm_{safe_name(o.name)}{suffix}", "SDM") for o in organs}
    dice = {name: float(metrics.dice) for name, metrics in result.metrics.items()} if reference is not None else None
    return case_thumbnail(
        result.case, read_volume(path, "image"), read_image(case_dir / f"labels{suffix}", "label map"), sdms, organs, context["levels"],
        reference=read_image(reference, "reference label map") if reference is not None else None, dice=dice,
        window=context.get("window"),
    )


def process_case(path: Path, case: str, args: argparse.Namespace, context: dict[str, Any]) -> CaseResult:
    """Segment one case and write its files; raises SDMOrganSegError with a one-line reason on failure."""
    import functools

    from . import headless, mrmllogic
    from ..common.files import check_writable, inside
    from ..images.imageio import read_image, read_volume
    from ..engines.outputs import DICOM_FILES, write_result

    result = CaseResult(case)
    case_dir = inside(Path(args.output), case)
    volume_format = context["formats"][0]
    names, dicom_formats, reference = _plan(path, case, args, context, result)
    organs = context["organs"]
    for name in names:
        check_writable(inside(case_dir, name), args.overwrite)
    image = read_volume(path, "image")
    series = None
    if dicom_formats:
        from ..formats.dicomout import series_of

        series = series_of(path, image)
    scene = context["scene"]
    logic: mrmllogic.SDMSegmentationLogic = context["logic"]
    volume = mrmllogic.sitk_to_volume_node(image, case, scene)
    try:
        outputs = logic.segment_volume(
            volume, context["model_dir"], context["device"], context["levels"], show2D=False, show3D=False,
            tta=args.tta, largest_component=args.largest_component, force=args.force, runtime=context["runtime"],
        )
        try:
            computed = outputs.computed
            computed.notes.extend(result.notes)
            result.notes = list(computed.notes)
            result.volumes_ml = outputs.organ_volumes_ml()
            reference_image = None
            if reference is not None:
                from ..method.metrics import evaluate_images

                reference_image = read_image(reference, "reference label map")
                result.metrics = evaluate_images(computed.labels, reference_image, {o.label: o.name for o in organs})
            files = {f"{case}.seg.nrrd": lambda target: headless.save_node(outputs.segmentation, target, overwrite=True)}
            if series is not None:
                from ..formats.dicomout import WRITERS, empty_organs_note

                note = empty_organs_note(computed.labels, organs, [DICOM_FILES[f] for f in dicom_formats])
                if note:
                    computed.notes.append(note)
                    result.notes.append(note)
                for fmt in dicom_formats:
                    files[DICOM_FILES[fmt]] = functools.partial(WRITERS[fmt], computed.labels, organs, series, model_name=computed.model_name)
            if reference is not None:
                from ..method.metrics import write_metrics_csv

                files["metrics.csv"] = lambda target: write_metrics_csv(result.metrics, target, overwrite=True)
            if args.pictures:
                files[f"{case}.png"] = lambda target: _picture(target, case, image, computed, reference_image, result, context["window"])
            write_result(
                computed, case_dir, volume_format, context["levels"], args.overwrite,
                extra_summary={**_settings(path, args, context, reference), "rank": context["rank"], "world_size": context["world_size"]},
                extra_files=files, surfaces=computed.surfaces,
            )
        finally:
            logic.remove_outputs(outputs)
    finally:
        if scene.IsNodePresent(volume):
            scene.RemoveNode(volume)
    result.status = "ok"
    return result


def _picture(target: Path, case: str, image: Any, computed: Any, reference: Any, result: CaseResult, window: Any = None) -> None:
    from ..images.pictures import case_picture

    dice = {name: float(metrics.dice) for name, metrics in result.metrics.items()} if reference is not None else None
    result.thumbnail = case_picture(
        target, case, image, computed.labels, computed.sdms, computed.organs, computed.levels, f"{case}, model {computed.model_name}",
        reference=reference, dice=dice, window=window,
    )


def summary_csv(results: Sequence[CaseResult], organs: Sequence[Any], with_metrics: bool) -> str:
    """The summary table: case, status, reason, seconds, per-organ volumes and (optionally) metrics."""
    from ..common.files import safe_name

    header = ["case", "status", "reason", "notes", "seconds"] + [f"volume_ml_{safe_name(o.name)}" for o in organs]
    metric_fields = (("dice", "dice"), ("hd_mm", "hd"), ("hd95_mm", "hd95"), ("asd_mm", "asd"))
    if with_metrics:
        header += [f"{column}_{safe_name(o.name)}" for o in organs for column, _ in metric_fields]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for result in results:
        row = [result.case, result.status, result.reason, "; ".join(result.notes), f"{result.seconds:.2f}"]
        row += [f"{result.volumes_ml[o.name]:.4f}" if o.name in result.volumes_ml else "" for o in organs]
        if with_metrics:
            for organ in organs:
                metrics = result.metrics.get(organ.name)
                scored = metrics is not None and metrics.scored  # an organ absent from both maps has no metrics
                row += [repr(float(getattr(metrics, attribute))) if scored else "" for _, attribute in metric_fields]
        writer.writerow(row)
    return buffer.getvalue()


def write_overview(path: Path, results: Sequence[CaseResult]) -> None:
    """overview.png: the cases' thumbnails, worst Dice first (written atomically)."""
    from ..common.files import atomic_path
    from ..images.pictures import overview_picture

    thumbnails = [result.thumbnail for result in results if result.thumbnail is not None]
    with atomic_path(path, overwrite=True) as temporary:
        overview_picture(temporary, thumbnails, failed=[result.case for result in results if result.status != "ok"])


def _formats(text: str) -> tuple[str, tuple[str, ...]]:
    from ..common.errors import SDMOrganSegError
    from ..engines.outputs import parse_formats

    try:
        return parse_formats(text)
    except ValueError as error:
        raise SDMOrganSegError(f"--format: {error}") from None


def missing_packages(reference: bool, pictures: bool, dicom: bool = False) -> list[str]:
    """pip names of the packages this run needs that cannot be imported (checked before any work); the
    network's runtime (ONNX Runtime or PyTorch) is checked with the model (``modelfiles.choose_runtime``)."""
    import importlib.util

    wanted = {"safetensors": "safetensors", "edt": "edt", "SimpleITK": "SimpleITK"}
    if reference:
        wanted["scipy"] = "scipy"
    if pictures:
        wanted["matplotlib"] = "matplotlib"
    if dicom:
        wanted.update({"highdicom": "highdicom", "pydicom": "pydicom"})
    return [name for module, name in wanted.items() if importlib.util.find_spec(module) is None]


def one_line(error: BaseException) -> str:
    """An error as one line: a user error's message, anything else as an internal error with its class."""
    if any(cls.__name__ == "SDMOrganSegError" for cls in type(error).__mro__):
        return " ".join(str(error).split())
    return f"internal error ({type(error).__name__}: {' '.join(str(error).split())})"


def main(args: argparse.Namespace) -> int:
    """Segment the cases ``args`` names (the options of ``Scripts/batch.py``, parsed there) and write the
    run's files; returns the exit code. Under torchrun, every rank calls this with the same arguments."""
    from ..common.errors import SDMOrganSegError
    from ..engines import distributed

    try:
        # Under torchrun, one rank of several: gloo only carries the set-up check and the gathered results.
        with distributed.process_group("gloo") as ranks:
            return _segment_cases(args, ranks)
    except SDMOrganSegError as error:  # joining the other ranks failed, or another rank failed in the set-up
        if not getattr(error, "reported", False):
            print(f"sdmorganseg: error: {one_line(error)}", file=sys.stderr)
        distributed.record_failure(f"sdmorganseg: error: {one_line(error)}")
        return EXIT_SETUP


def _input_bytes(path: Path) -> int:
    """Size of an input on disk (a DICOM folder: its files), to share the cases out evenly; 0 if unreadable."""
    try:
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file()) if path.is_dir() else path.stat().st_size
    except OSError:
        return 0


def _segment_cases(args: argparse.Namespace, ranks: Any) -> int:
    from ..engines import distributed
    from ..common.errors import SDMOrganSegError

    output = Path(args.output)
    summary_path = output / SUMMARY
    with distributed.all_or_none(ranks):
        # Checked first, before the slow imports: refusing to overwrite should be instant.
        for earlier in (summary_path, output / OVERVIEW) if args.pictures else (summary_path,):
            if earlier.exists() and not args.overwrite:
                raise SDMOrganSegError(f"{earlier} already exists (an earlier run); pass --overwrite to replace its outputs or choose another --output")
        from . import headless, mrmllogic
        from ..common.files import safe_name, write_text_atomic
        from ..images.imageio import case_name

        levels = mrmllogic.as_levels(args.levels)
        formats = _formats(args.format)
        if args.reference is not None and not Path(args.reference).is_dir():
            raise SDMOrganSegError(f"--reference {args.reference} is not a folder")
        missing = missing_packages(reference=args.reference is not None, pictures=args.pictures, dicom=bool(formats[1]))
        if missing:
            raise SDMOrganSegError(
                f"Python packages missing: {', '.join(missing)}; install them (pip install {' '.join(missing)}), "
                "or in Slicer open the SDM Organ Segmentation module once and let it install them"
            )
        from ..formats import modelfiles

        model_dir = modelfiles.resolve_model(args.model)
        card = modelfiles.read_card(model_dir)
        # Said once, not for every case: a runtime that cannot run this model here (the files' checksums are
        # checked with each case's load).
        runtime, _notes = modelfiles.choose_runtime(args.runtime, card, model_dir, bool(card.onnx))
        if runtime == "torch":
            # e.g. --device cuda without a GPU; under torchrun, GPU LOCAL_RANK
            device = distributed.rank_device(args.device, ranks)
        else:  # ONNX Runtime: its CUDA provider on GPU LOCAL_RANK under torchrun (checked when the network is built)
            device = f"cuda:{ranks.local_rank}" if args.device == "cuda" and ranks.distributed else args.device
        cases = find_cases(args.input)
        if not cases:
            raise SDMOrganSegError("no input images found; give image files or folders holding them")
        if formats[1] and not any(path.is_dir() for path in cases):
            raise SDMOrganSegError(
                f"--format {','.join(formats[1])} writes DICOM that refers to the input's slices, but no input is a DICOM series folder; "
                "give DICOM series folders, or use --format nifti or nrrd"
            )
        if args.tta is None:  # the card's default, recorded as what was done
            args.tta = bool(card.inference.get("tta", False))
        session = headless.start()
        from ..images.pictures import display_window

        context = {
            "scene": session.scene, "logic": mrmllogic.SDMSegmentationLogic(session.scene), "model_dir": model_dir,
            "organs": card.organs, "levels": levels, "formats": formats, "device": str(device), "window": display_window(card),
            "runtime": runtime,
            "rank": ranks.rank, "world_size": ranks.world_size,
        }
        output.mkdir(parents=True, exist_ok=True)

    names = [safe_name(case_name(path)) for path in cases]
    first = {}
    for index, case in enumerate(names):
        first.setdefault(case, index)
    # Every rank deals the same cases the same way; each takes its share, in input order.
    mine = distributed.shard([_input_bytes(path) for path in cases], ranks.world_size)[ranks.rank] if ranks.distributed else range(len(cases))
    if ranks.main:
        spread = f", {ranks.world_size} processes" if ranks.distributed else ""
        print(f"SDMOrganSeg batch: {len(cases)} case(s), model {card.name} ({model_dir}), device {args.device}{spread}", flush=True)
    results: list[tuple[int, CaseResult]] = []
    for index in mine:
        path, case = cases[index], names[index]
        started = time.perf_counter()
        result = None
        try:
            if first[case] != index:
                raise SDMOrganSegError(f"another input is also named {case!r}; case names must be unique")
            result = None if args.overwrite else done_earlier(path, case, args, context)
            if result is None:
                result = process_case(path, case, args, context)
                result.seconds = time.perf_counter() - started
        except Exception as error:  # one bad case must not stop the others
            result = CaseResult(case, "failed", one_line(error))
            result.seconds = time.perf_counter() - started
            print(f"sdmorganseg: error: {case}: {result.reason}", file=sys.stderr, flush=True)
            with contextlib.suppress(OSError):
                (Path(args.output) / case).rmdir()  # only if the failed case left it empty
            if os.environ.get("SDMORGANSEG_DEBUG"):
                import traceback

                traceback.print_exc()
        results.append((index, result))
        if result.status != "ok":
            verdict = f"FAILED: {result.reason}"
        else:
            verdict = "complete from an earlier run, skipped" if result.earlier else f"ok ({result.seconds:.1f} s)"
        print(f"[{index + 1}/{len(cases)}] {case}: {verdict}{f' (rank {ranks.rank})' if ranks.distributed else ''}", flush=True)
        for note in result.notes:
            print(f"note: {case}: {note}", file=sys.stderr, flush=True)

    gathered = distributed.gather(ranks, results)
    code = EXIT_SETUP
    if ranks.main:
        everything = [result for _, result in sorted((pair for share in gathered for pair in share), key=lambda pair: pair[0])]
        try:
            write_text_atomic(summary_path, summary_csv(everything, card.organs, args.reference is not None), overwrite=True)
            if args.pictures:
                write_overview(output / OVERVIEW, everything)
            succeeded = sum(result.status == "ok" for result in everything)
            print(f"{succeeded} of {len(everything)} case(s) succeeded; summary: {summary_path}", flush=True)
            code = EXIT_OK if succeeded == len(everything) else EXIT_SOME_FAILED
        except (OSError, SDMOrganSegError) as error:
            print(f"sdmorganseg: error: could not write the run's summary in {output}: {one_line(error)}", file=sys.stderr, flush=True)
    # Every rank exits with the run's code, once rank 0 has written and said everything.
    code = distributed.broadcast(ranks, code)
    if code != EXIT_OK:
        distributed.record_failure(f"sdmorganseg: {'some cases failed' if code == EXIT_SOME_FAILED else 'the summary could not be written'}: see {summary_path}")
    return code
