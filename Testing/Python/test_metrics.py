"""Segmentation metrics: agreement with google-deepmind/surface-distance, analytic shapes, properties,
empty masks, input checks and the CSV/JSON/table output."""

from __future__ import annotations

import csv
import json
import math
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import HIPPOCAMPUS, REPO
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage

from SDMOrganSegLib.common.errors import SDMOrganSegError
from SDMOrganSegLib.method.metrics import (
    ABSENT,
    UNANNOTATED,
    OrganMetrics,
    _surfel_area_table,
    annotated_organs,
    evaluate_images,
    evaluate_label_maps,
    format_metrics_table,
    mean_metrics,
    not_scored,
    organ_metrics,
    write_metrics_csv,
    write_metrics_json,
)

surface_distance = pytest.importorskip("surface_distance")
from surface_distance import lookup_tables  # noqa: E402

TOLERANCE_MM = 1e-6


def reference_metrics(pred: np.ndarray, ref: np.ndarray, spacing_xyz) -> dict:
    """surface-distance's values for two non-empty masks, with the HD95 range allowed by area-fraction ties.

    surface-distance picks the HD95 surfel by comparing a float cumulative area fraction with 0.95; when the
    exact fraction is 0.95 its rounding decides. ``hd95_range`` holds the values for fractions 1e-9 either side.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # it calls scipy.ndimage.filters
        surfaces = surface_distance.compute_surface_distances(ref, pred, tuple(spacing_xyz)[::-1])
    low, high = [], []
    for distances, areas in (
        (surfaces["distances_gt_to_pred"], surfaces["surfel_areas_gt"]),
        (surfaces["distances_pred_to_gt"], surfaces["surfel_areas_pred"]),
    ):
        fraction = np.cumsum(areas) / np.sum(areas)
        last = len(distances) - 1
        low.append(distances[min(int(np.searchsorted(fraction, 0.95 - 1e-9)), last)])
        high.append(distances[min(int(np.searchsorted(fraction, 0.95 + 1e-9)), last)])
    weighted = surfaces["distances_gt_to_pred"] @ surfaces["surfel_areas_gt"] + surfaces["distances_pred_to_gt"] @ surfaces["surfel_areas_pred"]
    return {
        "dice": float(surface_distance.compute_dice_coefficient(ref, pred)),
        "hd": float(surface_distance.compute_robust_hausdorff(surfaces, 100)),
        "hd95": float(surface_distance.compute_robust_hausdorff(surfaces, 95)),
        "hd95_range": (float(max(low)), float(max(high))),
        "asd": float(weighted / (surfaces["surfel_areas_gt"].sum() + surfaces["surfel_areas_pred"].sum())),
        "directed_asd": surface_distance.compute_average_surface_distance(surfaces),
    }


def assert_agrees(ours: OrganMetrics, expected: dict) -> None:
    assert ours.dice == pytest.approx(expected["dice"], abs=1e-12)
    assert ours.hd == pytest.approx(expected["hd"], abs=TOLERANCE_MM)
    assert ours.asd == pytest.approx(expected["asd"], abs=TOLERANCE_MM)
    low, high = expected["hd95_range"]
    if low == high:  # no tie at 95 %: one right answer
        assert ours.hd95 == pytest.approx(expected["hd95"], abs=TOLERANCE_MM)
    else:
        assert low - TOLERANCE_MM <= ours.hd95 <= high + TOLERANCE_MM


def hippocampus_labels(case: str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(HIPPOCAMPUS / "labelsTr" / f"{case}.nii.gz"))).astype(np.uint8)


def fit_to(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``array`` cropped or zero-padded (at the far end) to ``shape``."""
    out = np.zeros(shape, array.dtype)
    common = tuple(slice(0, min(a, b)) for a, b in zip(array.shape, shape))
    out[common] = array[common]
    return out


# --- surface definition --------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing_zyx", [(1.0, 1.0, 1.0), (2.5, 0.8, 0.8), (0.61, 1.7, 3.3), (3.0, 0.5, 1.25)])
def test_surfel_areas_match_surface_distance_table(spacing_zyx):
    expected = lookup_tables.create_table_neighbour_code_to_surface_area(spacing_zyx)
    np.testing.assert_allclose(_surfel_area_table(spacing_zyx), expected, rtol=0, atol=1e-12)


# --- real shapes -----------------------------------------------------------------------------------------


def _variants() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    case = hippocampus_labels("hippocampus_001")
    other = fit_to(hippocampus_labels("hippocampus_004"), case.shape)
    pairs = {}
    for label in (1, 2):
        ref = case == label
        moved = ndimage.shift(ref.astype(np.uint8), (1, -2, 1), order=0, cval=0).astype(bool)
        pairs[f"label{label}-shifted-eroded"] = (ndimage.binary_erosion(moved), ref)
        pairs[f"label{label}-other-case"] = (other == label, ref)
    return pairs


VARIANTS = _variants()


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 1.3, 2.5)], ids=["iso", "aniso"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hippocampus_agrees_with_surface_distance(variant, spacing):
    pred, ref = VARIANTS[variant]
    assert pred.any() and ref.any()
    ours = organ_metrics(pred, ref, spacing)
    expected = reference_metrics(pred, ref, spacing)
    assert_agrees(ours, expected)
    # The two-surface ASD lies between surface-distance's two directed means.
    directed = expected["directed_asd"]
    assert min(directed) - 1e-9 <= ours.asd <= max(directed) + 1e-9
    assert 0 < ours.dice < 1 and ours.hd > 0


def test_label_map_evaluation_matches_per_mask_metrics():
    pred = ndimage.shift(hippocampus_labels("hippocampus_001"), (0, 1, -1), order=0)
    ref = hippocampus_labels("hippocampus_001")
    spacing = (0.9, 1.1, 1.6)
    results = evaluate_label_maps(pred, ref, spacing)
    assert list(results) == ["1", "2"]
    for label in (1, 2):
        assert results[str(label)] == organ_metrics(pred == label, ref == label, spacing)
    named = evaluate_label_maps(pred, ref, spacing, {2: "posterior", 7: "absent"})
    assert list(named) == ["posterior", "absent"]
    assert named["posterior"] == results["2"]
    assert named["absent"].status == "absent" and all(math.isnan(v) for v in named["absent"].to_dict().values())
    # The same on the path without bounding boxes (label values too large for them).
    assert evaluate_label_maps(pred.astype(np.int32) * 70000, ref.astype(np.int32) * 70000, spacing, {7: "absent"})["absent"].status == "absent"
    # Label values read from JSON arrive as strings.
    assert evaluate_label_maps(pred, ref, spacing, {"2": "posterior"})["posterior"] == results["2"]
    with pytest.raises(SDMOrganSegError, match="integers"):
        evaluate_label_maps(pred, ref, spacing, {"two": "posterior"})
    # Label values too large for the one-pass bounding boxes take the other path, with the same result.
    big = evaluate_label_maps(pred.astype(np.int32) * 70000, ref.astype(np.int32) * 70000, spacing)
    assert list(big.values()) == list(results.values())


# --- analytic shapes -------------------------------------------------------------------------------------


def test_concentric_spheres_are_radius_difference_apart():
    z, y, x = np.ogrid[:40, :40, :40]
    radius = np.sqrt((z - 19.5) ** 2 + (y - 19.5) ** 2 + (x - 19.5) ** 2)
    inner, outer = radius < 8, radius < 13
    metrics = organ_metrics(inner, outer, (1.0, 1.0, 1.0))
    assert abs(metrics.hd - 5) <= 1
    assert abs(metrics.asd - 5) <= 1
    assert metrics.hd95 <= metrics.hd
    assert metrics.dice == pytest.approx(2 * inner.sum() / (inner.sum() + outer.sum()))


@pytest.mark.parametrize("axis, shift", [(2, 3), (1, 1), (0, 2)])
def test_shifted_box_hd95_is_the_shift(axis, shift):
    spacing_xyz = (0.7, 1.1, 2.0)
    box = np.zeros((24, 26, 28), bool)
    box[5:15, 6:18, 7:21] = True
    moved = np.roll(box, shift, axis=axis)
    metrics = organ_metrics(moved, box, spacing_xyz)
    step = spacing_xyz[::-1][axis] * shift
    assert metrics.hd95 == pytest.approx(step, abs=1e-9)
    assert metrics.hd == pytest.approx(step, abs=1e-9)
    assert 0 < metrics.asd < step


def test_identical_masks():
    mask = hippocampus_labels("hippocampus_006") == 1
    assert organ_metrics(mask, mask, (1.0, 1.0, 3.0)) == OrganMetrics(dice=1.0, hd=0.0, hd95=0.0, asd=0.0)


def test_mask_touching_the_array_border():
    # Surfels on the array's faces need the padding that the crop adds.
    full = np.ones((4, 5, 6), bool)
    part = full.copy()
    part[:, :, 3:] = False
    ours = organ_metrics(part, full, (1.0, 2.0, 0.5))
    assert_agrees(ours, reference_metrics(part, full, (1.0, 2.0, 0.5)))


# --- empty masks -----------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("error")
def test_both_empty():
    empty = np.zeros((5, 6, 7), bool)
    assert organ_metrics(empty, empty, (1, 1, 1)) == OrganMetrics(dice=1.0, hd=0.0, hd95=0.0, asd=0.0)


@pytest.mark.filterwarnings("error")
def test_one_empty():
    empty = np.zeros((5, 6, 7), bool)
    full = empty.copy()
    full[2, 3, 4] = True
    for pred, ref in ((empty, full), (full, empty)):
        metrics = organ_metrics(pred, ref, (1, 1, 1))
        assert metrics.dice == 0.0
        assert math.isinf(metrics.hd) and math.isinf(metrics.hd95) and math.isinf(metrics.asd)


# --- properties -------------------------------------------------------------------------------------------

masks = st.tuples(st.integers(1, 7), st.integers(1, 7), st.integers(1, 7)).flatmap(
    lambda shape: st.tuples(arrays(np.bool_, shape), arrays(np.bool_, shape))
)
spacings = st.tuples(*(st.floats(0.5, 3.0, allow_nan=False) for _ in range(3)))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=masks, spacing=spacings)
def test_properties_and_agreement_on_random_masks(pair, spacing):
    pred, ref = pair
    assume(pred.any() and ref.any())
    metrics = organ_metrics(pred, ref, spacing)
    assert 0.0 <= metrics.dice <= 1.0
    assert metrics.hd >= metrics.hd95 >= 0.0
    assert metrics.asd <= metrics.hd + 1e-12
    assert organ_metrics(ref, pred, spacing) == metrics
    assert_agrees(metrics, reference_metrics(pred, ref, spacing))


# --- input checks -----------------------------------------------------------------------------------------


def test_shape_mismatch_is_refused():
    with pytest.raises(SDMOrganSegError, match="shape"):
        evaluate_label_maps(np.zeros((4, 5, 6), np.uint8), np.zeros((4, 5, 7), np.uint8), (1, 1, 1))
    with pytest.raises(SDMOrganSegError, match="shape"):
        organ_metrics(np.zeros((4, 5, 6), bool), np.zeros((4, 6, 5), bool), (1, 1, 1))
    with pytest.raises(SDMOrganSegError, match="spacing"):
        organ_metrics(np.zeros((4, 5, 6), bool), np.zeros((4, 5, 6), bool), (1, 0, 1))


def _label_image(array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 0.9, 2.0))
    image.SetOrigin((10.0, -20.0, 30.0))
    return image


@pytest.mark.parametrize(
    "change, word",
    [
        (lambda im: im.SetSpacing((0.8, 0.9, 2.1)), "spacing"),
        (lambda im: im.SetOrigin((10.0, -20.0, 31.0)), "origin"),
        (lambda im: im.SetDirection((0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)), "direction"),
        (None, "size"),
    ],
)
def test_evaluate_images_refuses_mismatched_geometry(change, word):
    labels = hippocampus_labels("hippocampus_001")
    pred = _label_image(labels)
    if change is None:
        ref = _label_image(labels[:, :, :-1])
    else:
        ref = _label_image(labels)
        change(ref)
    with pytest.raises(SDMOrganSegError, match=word):
        evaluate_images(pred, ref)


def test_evaluate_images_accepts_whole_float_labels_and_refuses_fractions():
    labels = hippocampus_labels("hippocampus_001")
    results = evaluate_images(_label_image(labels.astype(np.float32)), _label_image(labels), {1: "anterior", 2: "posterior"})
    assert results == {name: OrganMetrics(1.0, 0.0, 0.0, 0.0) for name in ("anterior", "posterior")}
    fractional = labels.astype(np.float32)
    fractional[0, 0, 0] = 0.5
    with pytest.raises(SDMOrganSegError, match="whole numbers"):
        evaluate_images(_label_image(fractional), _label_image(labels))
    # The float32 file in the test data, against itself, as read from disk.
    image = sitk.ReadImage(str(HIPPOCAMPUS / "labelsTr" / "hippocampus_003.nii.gz"))
    assert image.GetPixelID() == sitk.sitkFloat32
    assert set(evaluate_images(image, image)) == {"1", "2"}


# --- output -----------------------------------------------------------------------------------------------

RESULTS = {
    "liver": OrganMetrics(dice=0.91, hd=12.5, hd95=4.25, asd=1.25),
    "spleen/left": OrganMetrics(dice=0.0, hd=math.inf, hd95=math.inf, asd=math.inf),
}


def test_table_has_every_organ_and_a_mean_row():
    table = format_metrics_table(RESULTS)
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["Organ", "Dice"]
    assert lines[2].split() == ["liver", "0.9100", "12.50", "4.25", "1.25"]
    assert lines[3].split() == ["spleen/left", "0.0000", "inf", "inf", "inf"]
    assert lines[4].split()[:5] == ["mean", "of", "2", "organs", "0.4550"]
    assert len({len(line) for line in lines[:5]}) == 1  # aligned columns


def test_organs_not_scored_are_said_so_and_left_out_of_the_mean(tmp_path):
    """An organ in neither map scored Dice 1 and HD 0 before, and a wrong organ list lifted the mean with it."""
    results = {**RESULTS, "kidney": not_scored(ABSENT), "colon": not_scored(UNANNOTATED)}
    mean, count = mean_metrics(results)
    assert count == 2 and mean.dice == pytest.approx(0.455) and math.isinf(mean.hd)
    lines = format_metrics_table(results).splitlines()
    assert lines[4].split()[0] == "kidney" and "absent from prediction and reference: not scored" in lines[4]
    assert lines[5].split()[0] == "colon" and "not annotated" in lines[5]
    assert lines[6].split()[:5] == ["mean", "of", "2", "organs", "0.4550"]

    write_metrics_csv(results, tmp_path / "m.csv")
    rows = {row["organ"]: row for row in csv.DictReader((tmp_path / "m.csv").open())}
    assert list(rows) == ["liver", "spleen/left", "kidney", "colon", "mean"]
    assert (rows["kidney"]["dice"], rows["kidney"]["status"]) == ("", "absent")
    assert (rows["colon"]["hd_mm"], rows["colon"]["status"]) == ("", "unannotated")
    assert float(rows["mean"]["dice"]) == pytest.approx(0.455) and rows["mean"]["status"] == "mean of 2 organs"

    write_metrics_json(results, tmp_path / "m.json")
    document = json.loads((tmp_path / "m.json").read_text())
    assert document["kidney"] == {"status": "absent"} and document["colon"] == {"status": "unannotated"}
    assert document["mean"] == {"dice": pytest.approx(0.455), "hd": "inf", "hd95": "inf", "asd": "inf", "organs": 2}

    nothing = {"kidney": not_scored(ABSENT)}
    write_metrics_json(nothing, tmp_path / "none.json")
    assert json.loads((tmp_path / "none.json").read_text())["mean"] == {"dice": None, "hd": None, "hd95": None, "asd": None, "organs": 0}
    assert "(no organ scored)" in format_metrics_table(nothing)
    with pytest.raises(SDMOrganSegError, match="named 'mean'"):
        write_metrics_json({"mean": RESULTS["liver"]}, tmp_path / "bad.json")


def test_unannotated_organs_are_skipped_and_unknown_names_refused():
    pred = ndimage.shift(hippocampus_labels("hippocampus_001"), (0, 1, -1), order=0)
    ref = hippocampus_labels("hippocampus_001")
    organs = {1: "anterior", 2: "posterior"}
    full = evaluate_label_maps(pred, ref, (1, 1, 1), organs)
    partial = evaluate_label_maps(pred, ref, (1, 1, 1), organs, annotated=["posterior"])
    assert partial["posterior"] == full["posterior"] and partial["anterior"].status == "unannotated"
    assert mean_metrics(partial) == (full["posterior"], 1)
    with pytest.raises(SDMOrganSegError, match="'brainstem', not among the organs evaluated"):
        evaluate_label_maps(pred, ref, (1, 1, 1), organs, annotated=["posterior", "brainstem"])


def test_annotations_file_in_the_openkbp_format(tmp_path):
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps({"hn_001": ["brainstem", "spinal cord"], "hn_002": ["larynx"]}, indent=1))
    assert annotated_organs(path, "hn_002") == ["larynx"]
    with pytest.raises(SDMOrganSegError, match="no entry for case 'hn_003'"):
        annotated_organs(path, "hn_003")
    path.write_text(json.dumps({"hn_001": "brainstem"}))
    with pytest.raises(SDMOrganSegError, match="lists of organ names"):
        annotated_organs(path, "hn_001")
    shared = REPO.parent / "shared" / "data" / "openkbp-hn" / "annotations.json"
    if shared.is_file():  # the real file, where the shared data lies beside the checkout
        assert annotated_organs(shared, "hn_001") == ["brainstem", "spinal cord", "right parotid", "left parotid", "mandible"]


def test_csv_and_json_are_parseable_and_not_overwritten(tmp_path):
    csv_path, json_path = tmp_path / "metrics.csv", tmp_path / "metrics.json"
    write_metrics_csv(RESULTS, csv_path)
    write_metrics_json(RESULTS, json_path)

    rows = list(csv.DictReader(csv_path.open()))
    assert [row["organ"] for row in rows] == [*RESULTS, "mean"]
    assert float(rows[0]["hd95_mm"]) == 4.25 and float(rows[0]["dice"]) == 0.91
    assert math.isinf(float(rows[1]["asd_mm"]))

    document = json.loads(json_path.read_text(), parse_constant=lambda name: pytest.fail(f"invalid JSON constant {name}"))
    assert document["liver"] == {"dice": 0.91, "hd": 12.5, "hd95": 4.25, "asd": 1.25}
    assert document["spleen/left"] == {"dice": 0.0, "hd": "inf", "hd95": "inf", "asd": "inf"}
    assert math.isinf(float(document["spleen/left"]["hd"]))
    assert document["mean"]["organs"] == 2 and document["mean"]["dice"] == pytest.approx(0.455)

    for writer, path in ((write_metrics_csv, csv_path), (write_metrics_json, json_path)):
        before = path.read_text()
        with pytest.raises(SDMOrganSegError, match="exists"):
            writer(RESULTS, path)
        assert path.read_text() == before
        writer({"liver": RESULTS["liver"]}, path, overwrite=True)
        assert "spleen" not in path.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv", "metrics.json"]  # no temporary files left
