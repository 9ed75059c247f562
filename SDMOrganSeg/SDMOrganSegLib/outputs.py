"""Writing a segmentation run to a folder under stable names, all-or-nothing.

Names (scripts rely on them): ``labels.nii.gz`` (or ``.nrrd``), ``sdm_<organ>.nii.gz`` (or ``.nrrd``),
``contours/<organ>_<level>.vtp`` (LPS mm), ``summary.json``. Everything is first written into a hidden
staging folder inside the output folder and moved into place only when all files are complete, so a
failed or cancelled run leaves no partial files; existing files are replaced only with ``overwrite``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import SimpleITK as sitk

from . import __version__
from .contours import DEFAULT_LEVELS, iso_surfaces, level_tag, write_polydata
from .errors import SDMOrganSegError
from .files import check_writable, inside, safe_name
from .inference import SegmentationResult

FORMATS = {"nifti": ".nii.gz", "nrrd": ".nrrd"}


def output_names(organ_names: Iterable[str], levels: Iterable[float], fmt: str = "nifti") -> list[str]:
    """Relative paths a run writes, in a stable order."""
    suffix = FORMATS[fmt]
    organ_names = list(organ_names)
    names = [f"labels{suffix}"] + [f"sdm_{safe_name(o)}{suffix}" for o in organ_names]
    names += [f"contours/{safe_name(o)}_{level_tag(l)}.vtp" for o in organ_names for l in levels]
    return names + ["summary.json"]


def write_result(
    result: SegmentationResult,
    out_dir: str | Path,
    fmt: str = "nifti",
    levels: Iterable[float] = DEFAULT_LEVELS,
    overwrite: bool = False,
    extra_summary: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write labels, SDMs, contours and summary; returns relative name -> final path."""
    if fmt not in FORMATS:
        raise SDMOrganSegError(f"unknown output format {fmt!r}; use nifti or nrrd")
    levels = tuple(levels)
    out_dir = Path(out_dir)
    names = output_names([o.name for o in result.organs], levels, fmt)
    targets = {name: inside(out_dir, name) for name in names}
    for path in targets.values():
        check_writable(path, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".sdmorganseg-", dir=out_dir))
    try:
        started = time.perf_counter()
        suffix = FORMATS[fmt]
        sitk.WriteImage(result.labels, str(staging / f"labels{suffix}"), useCompression=True)
        (staging / "contours").mkdir()
        for organ in result.organs:
            sdm = result.sdms[organ.name]
            sitk.WriteImage(sdm, str(staging / f"sdm_{safe_name(organ.name)}{suffix}"), useCompression=True)
            for level, surface in iso_surfaces(sdm, levels).items():
                write_polydata(surface, str(staging / "contours" / f"{safe_name(organ.name)}_{level_tag(level)}.vtp"))
        timings = dict(result.timings, write_s=time.perf_counter() - started)
        summary = {
            "software": f"SDMOrganSeg {__version__}",
            "model": result.model_name,
            "device": result.device,
            "coordinate_system": "LPS",
            "sdm_levels": list(levels),
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
            "outputs": names,
            **(extra_summary or {}),
        }
        (staging / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        # All files exist: move them into place (renames within one folder are atomic).
        (out_dir / "contours").mkdir(exist_ok=True)
        for name in names:
            os.replace(staging / name, targets[name])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {name: targets[name] for name in names}
