"""Speed and memory of the review page's server side (``sdmorganseg review``), run in the review extra's
virtual environment (README, "Review in a browser")::

    .venv-review/bin/python benchmarks/bench_review.py [--quick] [--ct-size 512,512,200] [--model-spacing 3.906,3.906,2.5] [--json FILE]

What the page does when a case is chosen, timed in a fresh process per volume, with the four views of the
page (axial, coronal, sagittal, 3D; 600 x 600 pixels each) rendered offscreen by the same code. Views render
as the page's scheduler renders them: a displayable manager's request marks the view, and each marked view
is rendered once for the next frame (``offscreenviews.render_pending``), read back and JPEG-encoded as the
page encodes its images (trame-rca's encoder at ``PAGE_IMAGE_QUALITY``).

1. **first image**: read the case (image, label map, SDMs, contours), build its nodes (the panel's
   ``create_nodes``), put every slice view through the organs' largest cross-section, render and encode the
   axial view; then the other three views.
2. **slice step**: move the axial view one voxel and render and encode every view that asked for a frame
   (the axial view and the two slice views that draw its intersection; median of 20 steps); the axial
   view's render alone is reported too.
3. **memory per case**: the server's resident memory with the case open minus before it was opened.

Volumes: a hippocampus MRI segmented by the shipped model (``segment``), and a CT-like volume with nine
ellipsoid organs whose outputs (exact SDMs, contours) are written as ``segment`` writes them, without a
network (512 x 512 x 200 by default; ``--ct-size`` for a smaller one on a machine short of memory): the SDMs
on the CT's grid, the contours from the SDMs on the grid of a model of ``--model-spacing`` (default the
head-and-neck model's 3.906 x 3.906 x 2.5 mm; ``none``: the CT's own grid, as ``segment`` did before
2026-12-05).
The browser's part (image encoding, transfer, drawing) is not included.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
import _common  # noqa: E402

HIPPOCAMPUS = _common.ROOT / "Testing" / "Data" / "hippocampus" / "imagesTr" / "hippocampus_003.nii.gz"
VIEWS = ("axial", "coronal", "sagittal", "3d")
SIZE = (600, 600)


def child(case_dir: str) -> None:
    """One case opened as the page opens it, in this fresh process; prints the JSON line run_child reads."""
    from trame_rca.encoders import RcaImageEncoder

    from SDMOrganSegLib.review import reviewscene
    from SDMOrganSegLib.review.offscreenviews import render_pending
    from SDMOrganSegLib.review.reviewcases import find_cases, load_case

    def encoded(view) -> bytes:  # what the page sends: the frame read back, JPEG-encoded
        pixels = reviewscene.window_pixels(view.render_window())
        return RcaImageEncoder.TURBO_JPEG.encode(pixels, pixels.shape[1], pixels.shape[0], reviewscene.PAGE_IMAGE_QUALITY)[0]

    app = reviewscene.slicer_app()
    views = {name: reviewscene.offscreen_view(app, name, SIZE) for name in VIEWS}
    for view in views.values():  # an empty first frame: the OpenGL set-up is paid before the case is chosen
        view.render()
    before = _common.current_rss_bytes()
    started, cpu_started = time.perf_counter(), time.process_time()
    case = find_cases(case_dir)[0]
    data = load_case(case)
    read_s = time.perf_counter() - started
    slice_views = [v for name, v in views.items() if name != "3d"]
    shown = reviewscene.show_case(app.scene, data, slice_views=slice_views)
    for name, view in views.items():
        view.fit_view_to_content()
        if name != "3d":
            view.set_slice_value(reviewscene.slice_offset(data.computed.labels, reviewscene.slice_normal(view), None))
    views["axial"].render()
    encoded(views["axial"])
    first_image_s, first_image_cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    for view in render_pending(views.values()):
        encoded(view)
    all_views_s, all_views_cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    axial = views["axial"]
    step = min(data.computed.labels.GetSpacing())
    steps, step_cpu, axial_cpu, rendered_per_step = [], [], [], []
    for index in range(20):
        tick, cpu_tick = time.perf_counter(), time.process_time()
        axial.set_slice_value(axial.get_slice_value() + (step if index % 2 == 0 else -step))
        axial.render()
        axial_cpu.append(time.process_time() - cpu_tick)
        encoded(axial)
        others = render_pending(views.values())
        for view in others:
            encoded(view)
        steps.append(time.perf_counter() - tick)
        step_cpu.append(time.process_time() - cpu_tick)
        rendered_per_step.append(1 + len(others))
    open_rss = _common.current_rss_bytes()
    reviewscene.remove_case(app.scene, shown)
    del shown, data
    reviewscene._quiet_teardown()
    _common.child_report({
        "case": case.name, "size": list(case.summary["geometry"]["size"]), "organs": len(case.summary["organs"]),
        "read_s": read_s, "first_image_s": first_image_s, "first_image_cpu_s": first_image_cpu_s,
        "all_views_s": all_views_s, "all_views_cpu_s": all_views_cpu_s,
        "slice_step_ms_median": 1000 * statistics.median(steps), "slice_step_ms_max": 1000 * max(steps),
        "slice_step_cpu_ms_median": 1000 * statistics.median(step_cpu),
        "slice_step_axial_render_cpu_ms_median": 1000 * statistics.median(axial_cpu),
        "views_rendered_per_step": statistics.median(rendered_per_step),
        "case_memory_gb": (open_rss - before) / 1e9,
    })


def hippocampus_case(scratch: Path) -> Path:
    from SDMOrganSegLib.cli import main

    out = scratch / "hippocampus_003"
    assert main(["segment", str(HIPPOCAMPUS), "--out", str(out), "--quiet"]) == 0
    return out


def ct_case(scratch: Path, size_xyz: tuple[int, int, int], model_spacing: tuple[float, float, float] | None) -> Path:
    """A CT-like case folder as ``segment`` writes it: image, label map, nine exact SDMs, contours, summary.
    With ``model_spacing``, the contours come from each SDM resampled (linearly) to that grid, as a model's
    run on it contours its own output (``SegmentationResult.contour_sdm``)."""
    import SimpleITK as sitk

    from SDMOrganSegLib.images.contours import DEFAULT_LEVELS, iso_surfaces, level_tag, write_polydata
    from SDMOrganSegLib.images.imageio import image_from_array
    from SDMOrganSegLib.images.imagewriting import write_image
    from SDMOrganSegLib.method.preprocessing import resample_to_spacing
    from SDMOrganSegLib.method.sdm import normalized_sdm

    folder = scratch / "ct"
    (folder / "contours").mkdir(parents=True)
    spacing = tuple(s * 512 / n if i < 2 else s * 200 / n for i, (s, n) in enumerate(zip(_common.CT_SPACING_XYZ, size_xyz)))
    image = sitk.GetImageFromArray(np.round(_common.ct_like_volume(size_xyz)).astype(np.int16))
    image.SetSpacing(spacing)
    write_image(image, folder / "ct.nii.gz")
    labels = _common.organ_masks(sitk.GetArrayViewFromImage(image).shape, 9)
    write_image(image_from_array(labels, image), folder / "labels.nii.gz")
    organs = {}
    for value in range(1, 10):
        name = f"organ {value}"
        sdm = image_from_array(normalized_sdm(labels == value, spacing), image)
        write_image(sdm, folder / f"sdm_organ_{value}.nii.gz")
        contoured = resample_to_spacing(sdm, model_spacing) if model_spacing else sdm
        for level, surface in iso_surfaces(contoured, DEFAULT_LEVELS).items():
            write_polydata(surface, str(folder / "contours" / f"organ_{value}_{level_tag(level)}.vtp"))
        color = [float(c) for c in np.random.default_rng(value).uniform(0.2, 1.0, 3)]
        organs[name] = {"label": value, "color": color, "volume_ml": float(np.count_nonzero(labels == value) * np.prod(spacing) / 1000)}
    summary = {"model": "synthetic", "input": str(folder / "ct.nii.gz"), "sdm_levels": list(DEFAULT_LEVELS), "organs": organs,
               "geometry": {"size": list(size_xyz)}}
    (folder / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return folder


def main() -> int:
    parser = _common.argument_parser(__doc__, "the hippocampus case only")
    parser.add_argument("--ct-size", default="512,512,200", help="x,y,z voxels of the CT-like volume (default 512,512,200)")
    parser.add_argument("--model-spacing", default="3.906,3.906,2.5", help="x,y,z mm of the model grid the CT's contours come from, or none (default 3.906,3.906,2.5)")
    parser.add_argument("--case", help="a hippocampus 'segment' output folder to use instead of segmenting hippocampus_003 here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return 0
    report = {"machine": _common.print_machine("review page, server side")}
    with tempfile.TemporaryDirectory(prefix="bench-review-") as scratch:
        scratch = Path(scratch)
        case = Path(args.case) if args.case else hippocampus_case(scratch)
        report["hippocampus"] = _common.run_child(HERE, ["--child", str(case)], timeout=7200)
        print(json.dumps(report["hippocampus"]))
        if not args.quick:
            size = tuple(int(v) for v in args.ct_size.split(","))
            spacing = None if args.model_spacing == "none" else tuple(float(v) for v in args.model_spacing.split(","))
            report["ct"] = _common.run_child(HERE, ["--child", str(ct_case(scratch, size, spacing))], timeout=7200)
            report["ct"]["model_spacing"] = spacing
            print(json.dumps(report["ct"]))
    _common.save_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
