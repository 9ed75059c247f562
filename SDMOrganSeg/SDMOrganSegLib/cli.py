"""The ``sdmorganseg`` command: ``train``, ``segment``, ``evaluate``, ``sdm``, ``pack``, ``export``, ``snapshot``, ``review``.

User errors (bad files, bad arguments) print one line, ``sdmorganseg: error: ...``, and exit with 2;
a cancelled run (Ctrl-C) exits with 130 and leaves no partial output.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

from . import __version__
from .engines import distributed
from .common.errors import SDMOrganSegError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _levels(text: str) -> tuple[float, ...]:
    from .images.contours import parse_levels

    try:
        return parse_levels(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _slice(text: str):
    if text.strip().lower() == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected auto or a slice index 0, 1, 2, ..., got {text!r}")
    return value


def _patch(text: str):
    return None if text.strip().lower() == "whole" else _triple(int)(text)


def _intensity(text: str) -> dict:
    """``percentile`` / ``percentile:LOW,HIGH`` (per-case percentiles) or ``window:LOW,HIGH`` (fixed, e.g. CT HU)."""
    method, _, values = text.partition(":")
    try:
        numbers = [float(v) for v in values.split(",")] if values else []
    except ValueError:
        numbers = None
    if method == "percentile" and numbers is not None and len(numbers) in (0, 2):
        lower, upper = numbers or (0.5, 99.5)
        if 0 <= lower < upper <= 100:
            return {"method": "percentile", "lower": lower, "upper": upper}
    if method == "window" and numbers is not None and len(numbers) == 2 and numbers[0] < numbers[1]:
        return {"method": "window", "low": numbers[0], "high": numbers[1]}
    raise argparse.ArgumentTypeError(f"expected percentile[:LOW,HIGH] or window:LOW,HIGH (e.g. window:-500,1000 for CT), got {text!r}")
def _formats(text: str) -> tuple[str, tuple[str, ...]]:
    from .engines.outputs import parse_formats

    try:
        return parse_formats(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _triple(kind: type):
    def parse(text: str):
        parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
        try:
            values = tuple(kind(p) for p in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected three numbers like 1,1,1, got {text!r}") from None
        if len(values) != 3 or any(v <= 0 for v in values):
            raise argparse.ArgumentTypeError(f"expected three positive numbers like 1,1,1, got {text!r}")
        return values

    return parse


class _Parser(argparse.ArgumentParser):
    """Argument errors on one line, like every other user error (the usage is in ``--help``)."""

    def error(self, message: str):
        command = self.prog.removeprefix("sdmorganseg").strip()
        print(f"sdmorganseg: error: {message} (see sdmorganseg {command + ' ' if command else ''}--help)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Append each option's default to its ``--help`` text, unless the text names it already or there is none."""
    for action in parser._actions:
        if any(action.default is nothing for nothing in (None, False, argparse.SUPPRESS)) or "default" in (action.help or ""):
            continue
        action.help = f"{action.help} (default %(default)s)" if action.help else "default %(default)s"


def build_parser(given_only: bool = False) -> argparse.ArgumentParser:
    """The command's parser; with ``given_only``, ``train`` leaves out the options not given (no defaults),
    so that fine-tuning can tell a setting the user chose from a default."""
    parser = _Parser(
        prog="sdmorganseg",
        description="Organ segmentation by predicting signed distance maps (Xue et al., AAAI 2020).",
    )
    parser.add_argument("--version", action="version", version=f"SDMOrganSeg {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    segment = commands.add_parser("segment", help="segment a volume with a model", description="Segment IMAGE and write the label map, per-organ SDMs, SDM iso-contours and a summary to OUT.")
    segment.add_argument("image", help="NIfTI/NRRD/MetaImage file or a folder holding one DICOM series")
    segment.add_argument("--model", default=None, help="model folder or shipped model name (default: the shipped hippocampus model)")
    segment.add_argument("--out", required=True, help="output folder (created if needed)")
    segment.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the network runs (default: auto = CUDA if present)")
    segment.add_argument("--runtime", default="auto", choices=["auto", "onnxruntime", "torch"], help="what runs the network: ONNX Runtime (the model's model.onnx) or PyTorch; auto = ONNX Runtime when it is installed and the model has model.onnx, else PyTorch (default auto)")
    segment.add_argument("--format", default=("nifti", ()), type=_formats, metavar="nifti|nrrd[,dicom-seg][,rtstruct]", help="image output format (default nifti: .nii.gz); for a DICOM series input, dicom-seg adds OUT/seg.dcm (DICOM Segmentation) and rtstruct OUT/rtstruct.dcm (RT Structure Set)")
    segment.add_argument("--levels", type=_levels, default=(0.0, 0.1, 0.2, 0.3), help="SDM iso-contour levels (default 0,0.1,0.2,0.3)")
    segment.add_argument("--window", type=_triple(int), default=None, help="sliding-window size x,y,z in voxels at the model spacing (default: the model card's)")
    segment.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap fraction in [0, 0.9] (default 0.25)")
    segment.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None, help="mirroring test-time augmentation: also predict the left-right mirrored volume and average (twice the network time); default: as the model card says (on for the shipped hippocampus model)")
    segment.add_argument("--largest-component", action="store_true", help="keep only the largest connected component of each organ in the label map")
    segment.add_argument("--overwrite", action="store_true", help="replace existing output files")
    segment.add_argument("--memory-gb", type=float, default=None, help="memory budget in GB: above it the volume is processed in tiles, or refused if even tiles don't fit (default: $SDMORGANSEG_MEMORY_GB, else 80%% of the available RAM)")
    segment.add_argument("--quiet", action="store_true", help="no progress output")
    segment.add_argument("--pictures", action="store_true", help="also write <case>.png: axial, coronal and sagittal slices through the organs with their outlines and SDM levels, as batch.py --pictures draws them")
    segment.add_argument("--force", action="store_true", help="segment an image that is not of the model's modality (e.g. an MR given to a CT model), which is otherwise refused before the network runs")

    evaluate = commands.add_parser("evaluate", help="Dice, HD, HD95, ASD of a label map against a reference", description="Compare label map PRED with REF per organ: Dice, Hausdorff, HD95 and average symmetric surface distance in mm.")
    evaluate.add_argument("pred", help="predicted label map")
    evaluate.add_argument("ref", help="reference label map (same grid)")
    evaluate.add_argument("--labels", help="labels.json naming the label values (default: the organs in the summary.json beside PRED, else the values as names)")
    evaluate.add_argument("--model", help="take organ names from this model's card")
    evaluate.add_argument("--ignore-unannotated", metavar="ANNOTATIONS", help="annotations.json, {\"CASE\": [\"organ\", ...]}: score only the organs listed for REF's case (its file name)")
    evaluate.add_argument("--csv", help="also write the table as CSV, with a mean row")
    evaluate.add_argument("--json", help="also write JSON: organ -> {dice, hd, hd95, asd}, and \"mean\" -> {dice, hd, hd95, asd, organs}")
    evaluate.add_argument("--overwrite", action="store_true", help="replace existing CSV/JSON files")

    sdm = commands.add_parser("sdm", help="normalised signed distance map of a label map", description="Write the normalised SDM ([-1, 1], negative inside, mm-based) of one organ of a label map.")
    sdm.add_argument("labels", help="label map")
    sdm.add_argument("out", help="output image (.nii.gz, .nrrd)")
    sdm.add_argument("--label", type=int, default=None, help="label value of the organ (default: all nonzero voxels)")
    sdm.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    export = commands.add_parser("export", help="(re)write a model folder's model.onnx for ONNX Runtime", description="Export MODEL_DIR's network (its checked model.safetensors) to MODEL_DIR/model.onnx and list it with its sha256 in the card, so that segment runs it on ONNX Runtime without PyTorch. Needs PyTorch (sdmorganseg[train]).")
    export.add_argument("model_dir", metavar="MODEL_DIR", help="model folder (model.safetensors + model.json), e.g. a training run's best/")
    export.add_argument("--no-check", action="store_true", help="do not compare the export's output with PyTorch's on a random input")
    snapshot = commands.add_parser("snapshot", help="render one view of a segment output as Slicer shows it (PNG; review extra)", description="Render one view of CASE_DIR (a 'segment' output folder) offscreen with Slicer's own displayable managers: the image, the segmentation in the model card's colours and the SDM iso-contours. Needs the review extra.")
    snapshot.add_argument("case_dir", help="a folder written by 'sdmorganseg segment --out'")
    snapshot.add_argument("--out", required=True, help="PNG file to write")
    snapshot.add_argument("--view", default="axial", choices=["axial", "coronal", "sagittal", "3d"], help="which view (default axial)")
    snapshot.add_argument("--slice", default="auto", type=_slice, help="auto (default: the slice with the largest organ area) or N, the index of the slice along the image axis closest to the view's normal")
    snapshot.add_argument("--size", default="800x800", help="image size WxH in pixels (default 800x800)")
    snapshot.add_argument("--overwrite", action="store_true", help="replace an existing PNG")

    review = commands.add_parser("review", help="review segment outputs in a browser (review extra)", description="Serve a review page for PATH: a 'segment' output folder or a folder of them (the batch script's output). Nothing is written into PATH. Needs the review extra.")
    review.add_argument("path", help="a 'segment' output folder or a folder of them")
    review.add_argument("--compare", default=None, metavar="PATH2", help="a second run of the same cases: its contours over the first's, with the Dice between the two runs")
    review.add_argument("--model", default=None, metavar="NAME|DIR", help="offer 'segment this volume' with this model (shipped name or folder), run in a worker")
    review.add_argument("--port", type=int, default=8080, help="TCP port (default 8080; 0 picks a free one)")
    review.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")

    train = commands.add_parser("train", help="train a model on a folder of images and label maps", description="Train the SDM UNet (paper schedule by default) on DATA (imagesTr/ + labelsTr/ + labels.json). Rerunning with the same OUT resumes.")
    train.add_argument("data", help="data folder: imagesTr/ and labelsTr/ (same file names) and labels.json, or an nnU-Net v2 raw dataset or MSD task folder (dataset.json), or a data pack (.npz) of 'sdmorganseg pack'")
    train.add_argument("--out", required=True, help="run folder: checkpoints, log.csv, curves.png, best/ model")
    train.add_argument("--preset", default="cpu", choices=["cpu", "paper"], help="architecture (default cpu; paper = 6 downsamplings, 24-384 channels)")
    train.add_argument("--mode", default="sdm+dice", choices=["dice", "sdm", "l1+dice", "sdm+dice", "dual"], help="training loss (default sdm+dice, Eq. 5); dual = a segmentation head (Dice, + CE with --ce-weight) and an SDM head (--sdm-weight x (product + L1)) on one decoder")
    train.add_argument("--epochs", type=int, default=200)
    train.add_argument("--batch-size", type=int, default=2, help="patches per optimiser step, in all: under torchrun each of the N processes takes batch/N (a multiple of N)")
    train.add_argument("--patch", type=_patch, default=(32, 48, 32), help="training patch x,y,z voxels, or 'whole' for whole volumes (the largest training case) (default 32,48,32)")
    train.add_argument("--lr", type=float, default=None, help="learning rate (default 5e-4 for Adam, 0.01 for SGD; 5e-6 with --init)")
    train.add_argument("--optimizer", default="adam", choices=["adam", "sgd"], help="Adam, or SGD with Nesterov momentum 0.99 and weight decay 3e-5 (nnU-Net's) (default %(default)s)")
    train.add_argument("--lr-schedule", default="step", choices=["step", "poly"], help="step: x --lr-decay every --lr-step epochs; poly: lr x (1 - epoch/epochs)^0.9 (nnU-Net's) (default %(default)s)")
    train.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="autocast of the network (losses stay float32); auto = bf16 on GPUs and on CPUs with native bf16 (AVX-512 BF16, AMX), float32 on other CPUs (default %(default)s)")
    train.add_argument("--augment", default="basic", choices=["basic", "strong"], help="basic = flips and intensity scale/shift; strong adds nnU-Net's rotation, scaling, noise, brightness, contrast and gamma (default %(default)s)")
    train.add_argument("--time-budget", type=float, default=None, metavar="MINUTES", help="fit the number of epochs (at most --epochs) to this wall time, from the speed measured up to the first validation, so the schedule ends with the budget")
    train.add_argument("--lr-decay", type=float, default=0.8, help="learning-rate factor (default 0.8)...")
    train.add_argument("--lr-step", type=int, default=25, help="...applied every this many epochs (default 25)")
    train.add_argument("--sdm-weight", type=float, default=10.0, help="lambda of Eq. 5 (default 10)")
    train.add_argument("--sdm-normalization", default="paper", choices=["paper", "clip", "tanh"], help="ground-truth SDM: paper = each side divided by its largest distance; clip = distance/scale clipped to [-1, 1]; tanh = tanh(distance/scale) (default paper)")
    train.add_argument("--sdm-scale", type=float, default=5.0, help="distance in mm that maps to 1 for --sdm-normalization clip/tanh (default %(default)s)")
    train.add_argument("--heaviside-k", type=float, default=1500.0, help="steepness k of the smooth Heaviside sigmoid(-k sdm) in the Dice term (default %(default)s, the paper's)")
    train.add_argument("--dice-reduction", default="case", choices=["case", "batch"], help="Dice term per case (Eq. 1 per patch, the paper's) or one Dice per organ over the whole batch, which also penalises organs painted into patches that lack them; under torchrun, over each process's share of the batch (default %(default)s)")
    train.add_argument("--ce-weight", type=float, default=0.0, help="add this weight times a binary cross-entropy on the organ probability (the Heaviside's for SDM modes): a gradient at every voxel, as nnU-Net's Dice + CE (default %(default)s: the paper's losses)")
    train.add_argument("--ce-balance", default="voxel", choices=["voxel", "organ"], help="cross-entropy weighting: voxel = all voxels alike; organ = an organ's voxels and the rest of the patch weigh half each, so small organs (CT esophagus, larynx) pull as hard as large ones (default %(default)s)")
    train.add_argument("--sdm-balance", default="voxel", choices=["voxel", "band", "sides"], help="SDM terms' weighting: voxel = all voxels alike; band = each organ with the band within one scale of its surface and the rest of the patch weigh half each, so the far field's +1 does not outweigh the surface (CT); sides = the organ, that band outside it and the rest a third each (default %(default)s)")
    train.add_argument("--eikonal-weight", type=float, default=0.0, help="weight of the Eikonal term (|grad d| - 1)^2 on the SDM head within one scale of each organ, which makes its output a distance to its own zero level rather than a per-voxel fit (tanh or clip normalisation; default 0: none)")
    train.add_argument("--output-bias", default="zero", choices=["zero", "prior", "soft-prior"], help="initial output-layer bias: zero, or prior = each organ's average target (its voxel fraction; the mean SDM), so an untrained network starts at 'background' where organs are tiny, e.g. CT; soft-prior = the same with the fraction floored at 5 %% so the smallest organs keep a usable gradient (default %(default)s)")
    train.add_argument("--depth", type=int, default=None, help="number of downsamplings (default: the preset's)")
    train.add_argument("--base-channels", type=int, default=None, help="channels at full resolution (default: the preset's)")
    train.add_argument("--max-channels", type=int, default=None, help="cap on the channel doubling (default: the preset's)")
    train.add_argument("--foreground-fraction", type=float, default=0.0, help="share of patches centred on a random annotated organ voxel (default %(default)s: uniform)")
    train.add_argument("--sliding-window", action="store_true", help="validate, and record in the card that the model infers, in windows of the patch size")
    train.add_argument("--intensity", type=_intensity, default=None, help="intensity normalisation: percentile[:LOW,HIGH] (per case, default 0.5,99.5) or window:LOW,HIGH (fixed, e.g. CT HU)")
    train.add_argument("--tta", action="store_true", help="with --finalize: evaluate with mirroring test-time augmentation")
    train.add_argument("--modality", choices=["CT", "MR"], default=None, help="imaging modality of the data, recorded in the card; segment warns when an input does not look like it")
    train.add_argument("--field-of-view", default="", help="what the training images show, in words (e.g. 'head and neck planning CT'), for the card")
    train.add_argument("--validate-every", type=int, default=5)
    train.add_argument("--split", help="split JSON with 'train' and 'validation' case names (default: seeded 80/20 split written to OUT/split.json)")
    train.add_argument("--spacing", type=_triple(float), default=None, help="resample to x,y,z mm (default: keep the data's spacing)")
    train.add_argument("--no-flip", action="store_true", help="no random left-right flips")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    train.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch")
    train.add_argument("--max-cases", type=int, default=None, help="use only the first N training and validation cases")
    train.add_argument("--name", default=None, help="model name in the card (default: the data folder's name)")
    train.add_argument("--finalize", action="store_true", help="after training, evaluate best/ on the validation split with all metrics and store them in its card")
    train.add_argument("--init", metavar="MODEL", default=None, help="fine-tune: start from this model's weights (model folder or shipped name); its organs (matched by name in DATA's labels), network and preprocessing (spacing, intensity, SDM normalisation, k, window) are kept, and given options that contradict them are refused; the learning rate defaults to 5e-6, the loss mode, patch and flips to the model's")
    train.add_argument("--widen", action="store_true", help="with --init: start from the model widened to twice its channels, computing the same outputs (Net2WiderNet), to add capacity without losing its training")
    train.add_argument("--eikonal-band", choices=["agreed", "target"], default="agreed", help="with --eikonal-weight: where the term looks; 'agreed' where both the true and the predicted SDM are near the surface, 'target' the true surface's band whatever the prediction, so that a head cannot escape the term by calling an organ absent (default agreed)")
    train.add_argument("--own-distance-weight", type=float, default=0.0, help="weight of an L1 term between the SDM head and the distance to its own zero level, computed from the prediction at each step (no label needed), within one scale of each organ: the distance the iso-contours are read as (tanh or clip normalisation; default 0: none)")
    train.add_argument("--eikonal-unannotated", action="store_true", help="with --eikonal-weight and partial labels: hold the organs not contoured in a case to the Eikonal term too, around their predicted surface (it needs no label)")
    train.add_argument("--sdm-branch", type=int, default=None, metavar="CHANNELS", help="give the SDM head a branch of its own: two 3x3x3 convolutions of CHANNELS channels on the last decoder features, added to the head's output (format-3 card); with --init of a model without one, the branch starts at zero, so the model's outputs are kept (default: none, or the --init model's)")
    train.add_argument("--reset-sdm-head", action="store_true", help="with --init of a dual model: start its SDM head afresh and keep the rest, so that --sdm-normalization and --sdm-scale may change (for an SDM head whose tanh saturated: the log's val_sdm_agreement stays low)")
    _show_defaults(train)

    pack = commands.add_parser("pack", help="read a data folder into one compressed file that train accepts", description="Read, check and resample every case of DATA as train would, and write them into one .npz data pack (images stored compactly, label maps as they are), to train where the data folder or SimpleITK is not (e.g. a GPU server).")
    pack.add_argument("data", help="data folder (as for train)")
    pack.add_argument("--out", required=True, help="pack file to write (.npz)")
    pack.add_argument("--spacing", type=_triple(float), default=None, help="resample to x,y,z mm (default: keep the data's spacing); train must use the same")
    pack.add_argument("--intensity", type=_intensity, default=None, help="intensity normalisation as for train (default percentile); train must use the same")
    pack.add_argument("--split", help="split JSON to store in the pack (train uses it unless given --split)")
    pack.add_argument("--overwrite", action="store_true", help="replace an existing pack file")
    if given_only:
        for action in train._actions:
            if action.dest != "help":
                action.default = argparse.SUPPRESS
    return parser


_progress_shown = False  #: a progress line is open on the terminal (not yet ended by a newline)
_last_plain: tuple[int, str] | None = None  #: (tens of percent, stage) of the last plain progress line


def _print_progress(fraction: float, message: str) -> None:
    """One line redrawn in place on a terminal; in a log file (not a terminal) plain lines, one when the
    stage changes or every 10 %, so that the file holds no carriage returns and no thousand tile lines."""
    global _progress_shown, _last_plain
    percent = int(fraction * 100)
    if sys.stderr.isatty():
        _progress_shown = True
        print(f"\r[{percent:3d}%] {message:60s}", end="", file=sys.stderr, flush=True)
        return
    key = (percent // 10, re.sub(r"\d+", "#", message))
    if _last_plain is None or key[1] != _last_plain[1] or key[0] > _last_plain[0]:
        _last_plain = key
        print(f"[{percent:3d}%] {message}", file=sys.stderr, flush=True)


def _end_progress_line() -> None:
    global _progress_shown
    if _progress_shown:
        print(file=sys.stderr)
        _progress_shown = False


def run_segment(args: argparse.Namespace) -> int:
    from .images.imageio import read_volume

    if not 0 <= args.overlap <= 0.9:
        raise SDMOrganSegError("--overlap must lie in [0, 0.9]")
    volume_format, dicom_formats = args.format
    if dicom_formats and not Path(args.image).is_dir():
        raise SDMOrganSegError(
            f"--format {','.join(dicom_formats)} writes DICOM that refers to the input's slices, but {args.image} is not a DICOM series folder; "
            "give the folder of the DICOM series, or use --format nifti or nrrd"
        )
    # The image first: its checks are cheap and need neither PyTorch nor the model.
    image = read_volume(args.image)
    series = _dicom_series(args.image, image) if dicom_formats else None
    if dicom_formats:
        from .formats.dicomout import WRITERS

    from .formats.modelfiles import load_model, resolve_model

    model = load_model(resolve_model(args.model), runtime=args.runtime)

    from .common.files import check_writable, inside
    from .engines.inference import segment_image
    from .engines.outputs import DICOM_FILES, output_names, write_result

    out = Path(args.out)
    picture = None
    if args.pictures:
        from .common.files import safe_name
        from .images.imageio import case_name

        picture = f"{safe_name(case_name(Path(args.image)))}.png"
    # Refuse before any work rather than after minutes of inference.
    extra_names = [DICOM_FILES[f] for f in dicom_formats] + ([picture] if picture else [])
    for name in output_names(model.card.organ_names, args.levels, volume_format) + extra_names:
        check_writable(inside(out, name), args.overwrite)
    started = time.perf_counter()
    result = segment_image(
        image, model, args.device, window=args.window, overlap=args.overlap,
        progress=None if args.quiet else _print_progress, memory_gb=args.memory_gb, tta=args.tta,
        largest_component=args.largest_component, force=args.force,
    )
    _end_progress_line()
    if dicom_formats:
        from .formats.dicomout import empty_organs_note

        note = empty_organs_note(result.labels, model.card.organs, [DICOM_FILES[f] for f in dicom_formats])
        if note:
            result.notes.append(note)
    extra_files = {
        DICOM_FILES[f]: functools.partial(WRITERS[f], result.labels, model.card.organs, series, model_name=model.card.name)
        for f in dicom_formats
    }
    if picture:
        from .images.pictures import case_picture, display_window

        extra_files[picture] = lambda target: case_picture(
            target, picture[:-4], image, result.labels, result.sdms, model.card.organs, args.levels,
            f"{picture[:-4]}, model {model.card.name}", window=display_window(model.card),
        )
    files = write_result(
        result, out, volume_format, args.levels, args.overwrite,
        extra_summary={"input": str(args.image), "model_folder": str(model.directory), "command_s": round(time.perf_counter() - started, 3)},
        extra_files=extra_files,
    )
    for note in result.notes:
        print(note if note.startswith("warning: ") else f"note: {note}", file=sys.stderr)
    volumes = ", ".join(f"{name} {volume:.2f} ml" for name, volume in result.organ_volumes_ml().items())
    print(f"segmented {args.image} on {result.device} in {result.timings['total_s']:.2f} s: {volumes}")
    print(f"wrote {len(files)} files to {out}")
    return 0


def _dicom_series(folder: str, image) -> list:
    import importlib.util

    missing = [name for name in ("highdicom", "pydicom") if importlib.util.find_spec(name) is None]
    if missing:
        raise SDMOrganSegError(f"the DICOM outputs need {' and '.join(missing)}; install them: pip install 'sdmorganseg[dicom]'")
    from .formats.dicomout import series_of

    return series_of(folder, image)


def _organ_names(args: argparse.Namespace) -> dict[int, str] | None:
    """Label value -> organ name from --model, --labels, or the summary.json a segment run wrote beside PRED."""
    if args.model and args.labels:
        raise SDMOrganSegError("--model and --labels both name the organs; give one of them")
    if args.model:
        from .formats.modelfiles import read_card, resolve_model

        card = read_card(resolve_model(args.model))
        return {o.label: o.name for o in card.organs}
    if args.labels:
        from .formats.dataset import read_label_names

        path = Path(args.labels)
        names = read_label_names(path.parent) if path.name == "labels.json" else None
        if names is None:
            raise SDMOrganSegError(f"--labels {path} must be a labels.json file")
        return names
    return _summary_organs(Path(args.pred).parent / "summary.json")


def _summary_organs(path: Path) -> dict[int, str] | None:
    """The organs of a ``segment`` run's summary.json, None when there is no such file."""
    if not path.is_file():
        return None
    try:
        organs = json.loads(path.read_text(encoding="utf-8"))["organs"]
        return {int(values["label"]): str(name) for name, values in organs.items()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise SDMOrganSegError(f"{path} beside the prediction is not a segment run's summary ({type(error).__name__}: {error}); name the organs with --model or --labels") from None


def run_evaluate(args: argparse.Namespace) -> int:
    from .images.imageio import case_name, read_image
    from .method.metrics import annotated_organs, evaluate_images, format_metrics_table, write_metrics_csv, write_metrics_json

    organs = _organ_names(args)
    annotated = annotated_organs(args.ignore_unannotated, case_name(Path(args.ref))) if args.ignore_unannotated else None
    results = evaluate_images(read_image(args.pred, "prediction"), read_image(args.ref, "reference"), organs, annotated=annotated)
    print(format_metrics_table(results))
    if args.csv:
        write_metrics_csv(results, args.csv, overwrite=args.overwrite)
    if args.json:
        write_metrics_json(results, args.json, overwrite=args.overwrite)
    return 0


def run_sdm(args: argparse.Namespace) -> int:
    from .common.files import atomic_path
    from .images.imageio import IMAGE_SUFFIXES, error_line, image_from_array, label_array, read_image
    from .images.imagewriting import write_image
    from .method.sdm import normalized_sdm

    fix = "use a .nii.gz, .nrrd or .mha name in a writable folder"
    if not args.out.lower().endswith(IMAGE_SUFFIXES):
        raise SDMOrganSegError(f"cannot write {args.out}: not an image file name SDMOrganSeg writes; {fix}")
    image = read_image(args.labels, "label map")
    labels = label_array(image, args.labels)
    mask = labels > 0 if args.label is None else labels == args.label
    if args.label is not None and not mask.any():
        present = sorted(set(labels.reshape(-1).tolist()) - {0})
        print(f"note: label {args.label} is absent (present: {present}); the SDM is +1 everywhere", file=sys.stderr)
    sdm = image_from_array(normalized_sdm(mask, image.GetSpacing()), image)
    with atomic_path(Path(args.out), args.overwrite) as temporary:
        try:
            write_image(sdm, temporary)
        except (RuntimeError, OSError) as error:
            # ITK names the temporary file it was given; the user knows the file they asked for.
            raise SDMOrganSegError(f"cannot write {args.out}: {error_line(error).replace(str(temporary), args.out)}; {fix}") from None
    print(f"wrote {args.out}")
    return 0


#: ``train`` options (argparse dest) -> the TrainingConfig field they set, where the names differ.
_CONFIG_FIELDS = {"patch": "patch_size", "lr": "learning_rate", "time_budget": "time_budget_min", "sdm_scale": "sdm_scale_mm", "no_flip": "flip", "split": "split_file", "name": "model_name"}


def run_pack(args: argparse.Namespace) -> int:
    from .formats.datapack import write_pack
    from .method.preprocessing import DEFAULT_INTENSITY

    if Path(args.out).exists() and not args.overwrite:
        raise SDMOrganSegError(f"{args.out} exists; give --overwrite to replace it, or another --out")

    def show(done: int, total: int, name: str) -> None:
        if sys.stderr.isatty():
            print(f"\rpacking {done}/{total}: {name}   ", end="", file=sys.stderr, flush=True)

    record = write_pack(args.data, args.out, args.intensity or dict(DEFAULT_INTENSITY), args.spacing, args.split, show)
    size = Path(args.out).stat().st_size / 1e6
    print(f"{'' if not sys.stderr.isatty() else chr(10)}wrote {args.out}: {len(record['cases'])} cases, {size:.1f} MB")
    return 0


def run_train(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .formats.datapack import is_pack
    from .formats.dataset import check_case_headers, find_cases

    if not is_pack(args.data):
        # Cases on mismatched grids are refused from their headers, before PyTorch is even loaded.
        check_case_headers(find_cases(args.data))
    learning_rate = args.lr if args.lr is not None else (0.01 if args.optimizer == "sgd" else 5e-4)
    fields = dict(
        data_dir=args.data, out_dir=args.out, preset=args.preset, mode=args.mode, epochs=args.epochs,
        batch_size=args.batch_size, patch_size=args.patch, learning_rate=learning_rate, lr_decay=args.lr_decay,
        optimizer=args.optimizer, lr_schedule=args.lr_schedule, precision=args.precision, augment=args.augment, time_budget_min=args.time_budget,
        lr_step=args.lr_step, sdm_weight=args.sdm_weight, validate_every=args.validate_every, seed=args.seed,
        split_file=args.split, spacing=args.spacing, flip=not args.no_flip, device=args.device,
        max_cases=args.max_cases, model_name=args.name or Path(args.data).resolve().name, threads=args.threads,
        command="sdmorganseg " + shlex.join(argv), sdm_normalization=args.sdm_normalization, sdm_scale_mm=args.sdm_scale,
        heaviside_k=args.heaviside_k, dice_reduction=args.dice_reduction, ce_weight=args.ce_weight, ce_balance=args.ce_balance, sdm_balance=args.sdm_balance, eikonal_weight=args.eikonal_weight, output_bias=args.output_bias, depth=args.depth, base_channels=args.base_channels, max_channels=args.max_channels,
        foreground_fraction=args.foreground_fraction, sliding_window=args.sliding_window,
        modality=args.modality, field_of_view=args.field_of_view, reset_sdm_head=args.reset_sdm_head, widen=args.widen, sdm_branch=args.sdm_branch, eikonal_unannotated=args.eikonal_unannotated, eikonal_band=args.eikonal_band, own_distance_weight=args.own_distance_weight,
        **({"intensity": args.intensity} if args.intensity else {}),
    )
    if args.init:
        # The base model's card (read without PyTorch) fills in every setting not given; given ones that
        # contradict it are refused here, before any work.
        from .formats.dataset import read_label_names
        from .formats.finetuning import fine_tuning_settings, organs_for_data
        from .formats.modelfiles import read_card, resolve_model

        card = read_card(resolve_model(args.init))
        names = read_label_names(args.data)
        if names is not None:  # without labels.json the trainer says what is missing
            organs_for_data(card, names, args.data)
        given = vars(build_parser(given_only=True).parse_args(argv))
        chosen = {_CONFIG_FIELDS.get(dest, dest): fields[_CONFIG_FIELDS.get(dest, dest)] for dest in given if _CONFIG_FIELDS.get(dest, dest) in fields}
        fields.update(fine_tuning_settings(card, chosen), init_model=args.init)
        if args.name is None:
            fields["model_name"] = f"{card.name}-finetuned"

    from .engines.training import Trainer, TrainingConfig, finalize_best_model

    best = Trainer(TrainingConfig(**fields)).run()
    if not distributed.from_environment().main:
        return 0  # under torchrun: rank 0 finalises and reports
    if args.finalize:
        summary = finalize_best_model(args.out, args.data, args.device, tta=args.tta)
        print(json.dumps(summary, indent=1))
    print(f"best model: {best}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from .formats.modelfiles import resolve_model
    from .engines.onnxmodel import export_model

    directory = resolve_model(args.model_dir)
    record = export_model(directory, check=not args.no_check)
    print(f"wrote {directory / record['file']} ({record['output_channels']} output channels, sha256 {record['sha256'][:12]}... in the card) in {record['seconds']} s")
    return 0


def run_snapshot(args: argparse.Namespace) -> int:
    from .review.reviewscene import parse_size, snapshot

    drawn = snapshot(args.case_dir, args.out, args.view, args.slice, parse_size(args.size), args.overwrite)
    where = "" if drawn["slice_offset_mm"] is None else f" at {drawn['slice_offset_mm']:.1f} mm"
    print(f"wrote {args.out}: {drawn['case']}, {drawn['view']} view{where}")
    return 0


def run_review(args: argparse.Namespace) -> int:
    from .review.reviewapp import serve

    return serve(args.path, compare=args.compare, model=args.model, port=args.port, host=args.host)


def _interrupt(signum: int, frame: object) -> None:
    # SIGTERM (a batch system stopping the job) unwinds like Ctrl-C, so temporary files are removed.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    import SimpleITK as sitk

    from .images import imageio

    # ITK prints warnings, and some readers their errors, straight to stderr; here errors reach the user as
    # one line through SDMOrganSegError instead.
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    imageio.capture_native_messages = True
    try:
        if args.command == "segment":
            return run_segment(args)
        if args.command == "evaluate":
            return run_evaluate(args)
        if args.command == "sdm":
            return run_sdm(args)
        if args.command == "pack":
            return run_pack(args)
        if args.command == "export":
            return run_export(args)
        if args.command == "snapshot":
            return run_snapshot(args)
        if args.command == "review":
            return run_review(args)
        return run_train(args, argv)
    except SDMOrganSegError as error:
        # End a progress line first, if one was started, so the error stays on a line of its own.
        if not getattr(error, "reported", False):  # under torchrun, a failure of another rank that rank prints
            _end_progress_line()
            print(f"sdmorganseg: error: {error}", file=sys.stderr)
        distributed.record_failure(f"sdmorganseg: error: {error}")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("\nsdmorganseg: interrupted; no partial output was left", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MemoryError:
        print("sdmorganseg: error: out of memory; use a smaller --window or a machine with more memory", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as error:
        # The file system said no (disk full, permission denied, ...): not a bug, so no traceback.
        where = f": {error.filename}" if error.filename else ""
        print(f"sdmorganseg: error: {error.strerror or error}{where}; check the path, free space and permissions", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
