"""The README's screenshots from ``sdmorganseg snapshot``: Slicer's own 3D and axial views of a ``segment``
output, side by side, captioned, with the SDM levels' legend. Runs in the review extra's environment::

    .venv-review/bin/python docs/experiments/make_snapshot_screenshot.py --out docs/screenshot.png
    .venv-review/bin/python docs/experiments/make_snapshot_screenshot.py --data Testing/Data/openkbp-hn --case hn_235 \\
        --model headneck-oar --out docs/screenshot_headneck.png

The case is segmented with ``sdmorganseg segment`` (the model's card defaults) into a temporary folder; each
view is rendered by :func:`SDMOrganSegLib.review.reviewscene.snapshot`, the code of the ``snapshot``
command, in a process of its own (one offscreen Slicer application per process).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "SDMOrganSeg"))

from SDMOrganSegLib.images.contours import level_color  # noqa: E402

VIEW_SIZE = (550, 480)
CAPTION_H, LEGEND_H = 34, 60
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.truetype(FONT, size)
    except OSError:
        return ImageFont.load_default(size)


def _snapshot(case_dir: Path, out: Path, view: str) -> None:
    command = [sys.executable, "-m", "SDMOrganSegLib.cli", "snapshot", str(case_dir), "--out", str(out), "--view", view,
               "--size", f"{VIEW_SIZE[0]}x{VIEW_SIZE[1]}"]
    subprocess.run(command, check=True, env={"PYTHONPATH": str(REPO / "SDMOrganSeg"), **_environ()})


def _environ() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def compose(case_dir: Path, views: dict[str, Path], out: Path) -> None:
    summary = json.loads((case_dir / "summary.json").read_text(encoding="utf-8"))
    width = VIEW_SIZE[0] * len(views)
    canvas = Image.new("RGB", (width, CAPTION_H + VIEW_SIZE[1] + LEGEND_H), (24, 24, 28))
    draw = ImageDraw.Draw(canvas)
    captions = {"3d": "Slicer's 3D view: iso-surfaces (level 0 opaque)", "axial": "Slicer's axial view: segments and SDM iso-contours"}
    for index, (view, path) in enumerate(views.items()):
        canvas.paste(Image.open(path).convert("RGB"), (index * VIEW_SIZE[0], CAPTION_H))
        draw.text((index * VIEW_SIZE[0] + 10, 8), captions[view], fill=(235, 235, 235), font=_font(17))
    levels = [float(level) for level in summary.get("sdm_levels", (0.0, 0.1, 0.2, 0.3))]
    levels_mm = summary.get("sdm_levels_mm") or {}
    x, y = 10, CAPTION_H + VIEW_SIZE[1] + 8
    organs = ", ".join(summary["organs"])
    draw.text((x, y), f"{case_dir.name}, model '{summary.get('model', '')}': {organs}", fill=(200, 200, 200), font=_font(14))
    x, y = width - 10, y + 24
    for level in reversed(levels):
        mm = levels_mm.get(f"{level:g}")
        label = f"SDM {level:g}" + (f" ({mm:.1f} mm)" if mm is not None and level else "")
        text_w = draw.textlength(label, font=_font(15))
        x -= text_w + 18
        draw.text((x, y), label, fill=tuple(int(round(255 * c)) for c in level_color(level)), font=_font(15))
    canvas.save(out, optimize=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO / "Testing" / "Data" / "hippocampus")
    parser.add_argument("--case", default="hippocampus_003")
    parser.add_argument("--model", default="hippocampus")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshot.png")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="snapshot-screenshot-") as scratch:
        scratch = Path(scratch)
        case_dir = scratch / args.case
        subprocess.run([sys.executable, "-m", "SDMOrganSegLib.cli", "segment", str(args.data / "imagesTr" / f"{args.case}.nii.gz"),
                        "--model", args.model, "--out", str(case_dir), "--quiet"],
                       check=True, env={"PYTHONPATH": str(REPO / "SDMOrganSeg"), **_environ()})
        views = {}
        for view in ("3d", "axial"):
            views[view] = scratch / f"{view}.png"
            _snapshot(case_dir, views[view], view)
        compose(case_dir, views, args.out)
    print(f"wrote {args.out}: {Image.open(args.out).size[0]} x {Image.open(args.out).size[1]}, {np.ceil(args.out.stat().st_size / 1024):.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
