"""Writing a segmentation run to a folder under stable names, all-or-nothing.

Names (scripts rely on them): ``labels.nii.gz`` (or ``.nrrd``), ``sdm_<organ>.nii.gz`` (or ``.nrrd``),
``contours/<organ>_<level>.vtp`` (LPS mm), ``summary.json``; callers add their own files (``seg.dcm``,
``rtstruct.dcm``, the batch script's ``<case>.seg.nrrd``...) through ``extra_files``. Everything is first written into a hidden
staging folder inside the output folder and moved into place only when all files are complete, so a
failed or cancelled run leaves no partial files; existing files are replaced only with ``overwrite``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed, wait
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from .. import __version__
from ..images.contours import DEFAULT_LEVELS, iso_surfaces, level_tag, write_polydata
from ..common.errors import CancelCheck, SDMOrganSegError, check_cancel
from ..common.files import check_writable, inside, safe_name, worker_threads
from ..images.imageio import error_line
from ..images.imagewriting import write_image
from .inference import SegmentationResult
from ..formats.modelfiles import Organ

FORMATS = {"nifti": ".nii.gz", "nrrd": ".nrrd"}
#: ``--format`` values that add a DICOM file to the run (for a DICOM input) -> that file's name.
DICOM_FILES = {"dicom-seg": "seg.dcm", "rtstruct": "rtstruct.dcm"}


def parse_formats(text: str) -> tuple[str, tuple[str, ...]]:
    """``--format`` text, e.g. ``nrrd,dicom-seg``: the volume format (``nifti`` unless ``nrrd`` is named) and the
    DICOM outputs asked for; ValueError naming a value that is neither."""
    volume, dicom = "nifti", []
    for value in (v.strip().lower() for v in text.split(",") if v.strip()):
        if value in FORMATS:
            volume = value
        elif value in DICOM_FILES:
            dicom.append(value)
        else:
            raise ValueError(f"unknown format {value!r}; use nifti or nrrd, and/or dicom-seg, rtstruct (comma-separated)")
    return volume, tuple(dict.fromkeys(dicom))


def _levels_in_mm(sdm: dict[str, Any], levels: Sequence[float]) -> dict[str, Any]:
    """``summary.json``'s ``sdm_normalization`` and ``sdm_levels_mm`` (each level's signed distance from the
    surface), where the model's normalisation gives its levels a fixed distance."""
    from ..method.sdm import level_distance_mm

    normalization, scale = sdm.get("normalization"), sdm.get("scale_mm")
    distances = {f"{level:g}": level_distance_mm(level, normalization, float(scale)) for level in levels} if scale else {}
    if not distances or None in distances.values():
        return {}
    return {"sdm_normalization": {"normalization": normalization, "scale_mm": float(scale)},
            "sdm_levels_mm": {level: round(d, 2) for level, d in distances.items()}}


def output_names(organ_names: Iterable[str], levels: Iterable[float], fmt: str = "nifti") -> list[str]:
    """Relative paths a run writes, in a stable order."""
    suffix = FORMATS[fmt]
    organ_names = list(organ_names)
    names = [f"labels{suffix}"] + [f"sdm_{safe_name(o)}{suffix}" for o in organ_names]
    names += [f"contours/{safe_name(o)}_{level_tag(l)}.vtp" for o in organ_names for l in levels]
    return names + ["summary.json"]


def _commit(staging: Path, names: list[str], targets: dict[str, Path], out_dir: Path, overwrite: bool) -> None:
    """Move the staged files onto their targets, all or none: files they replace are set aside in the
    staging folder first, and put back, with the new files removed, if any move fails or is interrupted."""
    set_aside: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    contours = out_dir / "contours"
    made_contours = not contours.exists()
    try:
        contours.mkdir(exist_ok=True)
        (staging / ".replaced").mkdir()
        for index, name in enumerate(names):
            target = targets[name]
            if target.is_dir() and not target.is_symlink():
                raise SDMOrganSegError(f"{target} is a folder where an output file must go; move it away or choose another output folder")
            if target.exists() or target.is_symlink():
                if not overwrite:
                    raise SDMOrganSegError(f"{target} already exists; choose another output or pass --overwrite to replace it")
                backup = staging / ".replaced" / str(index)
                os.replace(target, backup)
                set_aside.append((target, backup))
            os.replace(staging / name, target)
            placed.append(target)
    except BaseException as error:
        for target in placed:
            target.unlink(missing_ok=True)
        try:
            for target, backup in reversed(set_aside):
                os.replace(backup, target)
        except OSError:
            raise SDMOrganSegError(
                f"writing the outputs in {out_dir} failed and the files it replaced could not all be put back; "
                f"they are kept in {staging / '.replaced'} (numbered in the order of summary.json's outputs)"
            ) from None
        if made_contours:
            with contextlib.suppress(OSError):
                contours.rmdir()
        if isinstance(error, OSError):
            raise SDMOrganSegError(f"cannot write the outputs in {out_dir}: {error.strerror or error}; nothing was changed there") from None
        raise


class _WriteFailed(Exception):
    """A file of the run could not be written: ``name`` is its relative name, ``error`` what ITK/VTK/the OS said."""

    def __init__(self, name: str, error: BaseException) -> None:
        super().__init__(name)
        self.name, self.error = name, error


def _named(name: str, write: Callable[[], None]) -> None:
    try:
        write()
    except (RuntimeError, OSError) as error:
        raise _WriteFailed(name, error) from None


def write_result(
    result: SegmentationResult,
    out_dir: str | Path,
    fmt: str = "nifti",
    levels: Iterable[float] = DEFAULT_LEVELS,
    overwrite: bool = False,
    extra_summary: dict[str, Any] | None = None,
    *,
    cancel: CancelCheck | None = None,
    extra_files: Mapping[str, Callable[[Path], None]] | None = None,
    surfaces: Mapping[str, Mapping[float, Any]] | None = None,
) -> dict[str, Path]:
    """Write labels, SDMs, contours and summary; returns relative name -> final path.

    ``extra_files`` maps more file names (in the output folder) to functions that write such a file at the
    path given; they run on this thread, into the same staging folder. ``surfaces`` (organ -> level ->
    polydata) are contours computed already; by default they are computed from the SDMs here.

    All or nothing: on an error or a cancel (``cancel``, checked between files) the output folder is left
    as it was. Existing files are replaced only with ``overwrite``.
    """
    if fmt not in FORMATS:
        raise SDMOrganSegError(f"unknown output format {fmt!r}; use nifti or nrrd")
    levels = tuple(levels)
    out_dir = Path(out_dir)
    extra_files = dict(extra_files or {})
    names = output_names([o.name for o in result.organs], levels, fmt)
    names[-1:-1] = list(extra_files)  # summary.json stays last
    if len(set(names)) != len(names):
        raise SDMOrganSegError("two organs of the model map to the same output file name; rename them in the model card")
    targets = {name: inside(out_dir, name) for name in names}
    for path in targets.values():
        check_writable(path, overwrite)
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".sdmorganseg-", dir=out_dir))
    except OSError as error:
        raise SDMOrganSegError(f"cannot write to {out_dir}: {error.strerror or error}; check the folder and its permissions") from None
    committed = False

    def check(name: str) -> Path:
        check_cancel(cancel)
        return staging / name

    def write_sdm(organ: Organ) -> None:
        name = f"sdm_{safe_name(organ.name)}{suffix}"
        _named(name, lambda: write_image(result.sdms[organ.name], check(name)))

    def write_contours(organ: Organ) -> None:
        stem = safe_name(organ.name)
        computed = surfaces[organ.name] if surfaces is not None else iso_surfaces(result.contour_sdm(organ.name), levels)
        for level, surface in computed.items():
            name = f"contours/{stem}_{level_tag(level)}.vtp"
            _named(name, lambda: write_polydata(surface, str(check(name))))

    try:
        started = time.perf_counter()
        suffix = FORMATS[fmt]
        (staging / "contours").mkdir()
        # Tasks for the label map and for each organ's SDM and surfaces, on a few threads: ITK, ISA-L and VTK
        # all release the GIL, so the files are written side by side.
        with ThreadPoolExecutor(max_workers=worker_threads(), thread_name_prefix="sdmorganseg-write") as pool:
            tasks = [pool.submit(_named, f"labels{suffix}", lambda: write_image(result.labels, check(f"labels{suffix}")))]
            tasks += [pool.submit(task, organ) for organ in result.organs for task in (write_sdm, write_contours)]
            try:
                for name, writer in extra_files.items():  # here, while the pool writes the volumes
                    _named(name, lambda: writer(check(name)))
                for task in as_completed(tasks):
                    task.result()
            except BaseException:
                for task in tasks:
                    task.cancel()
                wait(tasks)  # nothing may still write into the staging folder when it is removed
                raise
        timings = dict(result.timings, write_s=time.perf_counter() - started)
        summary = {
            "software": f"SDMOrganSeg {__version__}",
            "model": result.model_name,
            "device": result.device,
            "runtime": getattr(result, "runtime", "torch"),
            "provider": getattr(result, "provider", ""),
            "coordinate_system": "LPS",
            "sdm_levels": list(levels),
            **_levels_in_mm(getattr(result, "sdm_normalization", {}), levels),
            "organs": {
                organ.name: {"label": organ.label, "color": list(organ.color), "volume_ml": round(volume, 4)}
                for organ, volume in zip(result.organs, result.organ_volumes_ml().values())
            },
            "geometry": {
                "size": list(result.labels.GetSize()), "spacing": list(result.labels.GetSpacing()),
                "origin": list(result.labels.GetOrigin()), "direction": list(result.labels.GetDirection()),
            },
            "timings_s": {k.removesuffix("_s"): round(v, 4) for k, v in timings.items()},
            "notes": result.notes,
            **getattr(result, "settings", {}),
            "outputs": names,
            **(extra_summary or {}),
        }
        text = json.dumps(summary, indent=2) + "\n"
        _named("summary.json", lambda: check("summary.json").write_text(text, encoding="utf-8"))
        check_cancel(cancel)
        # All files exist: move them into place (renames within one folder are atomic).
        _commit(staging, names, targets, out_dir, overwrite)
        committed = True
    except (_WriteFailed, RuntimeError, OSError) as error:
        name, cause = (error.name, error.error) if isinstance(error, _WriteFailed) else ("the outputs", error)
        raise SDMOrganSegError(
            f"cannot write {name} in {out_dir}: {error_line(cause).replace(str(staging), str(out_dir))}; "
            "check free disk space and permissions (nothing was changed there)"
        ) from None
    finally:
        # Keep the staging folder only if it holds replaced files that could not be put back.
        kept = staging / ".replaced"
        if committed or not kept.is_dir() or not any(kept.iterdir()):
            shutil.rmtree(staging, ignore_errors=True)
        if created and not committed:
            with contextlib.suppress(OSError):
                out_dir.rmdir()  # only if empty: the folder this call made, left as it found it
    return {name: targets[name] for name in names}
