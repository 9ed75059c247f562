"""The MRML logic on a real (headless) Slicer scene from slicer-core: no mocks of MRML.

Runs on a real hippocampus case and on the CT example with small random-weight models whose output
offsets are calibrated on the test image so that every organ has an inside and an outside (a random
network alone often predicts "inside everywhere", which has no surface to check). The geometry, file and
metrics-table tests need no PyTorch and also run in CI's Python 3.12 check (Slicer 5.10's Python).
"""

from __future__ import annotations

import csv
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' module found is not slicer-core (no vtkMRMLScene)", allow_module_level=True)
import SimpleITK as sitk  # noqa: E402
import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "SDMOrganSeg"))

from SDMOrganSegLib.mrml import headless, mrmllogic  # noqa: E402
from SDMOrganSegLib.formats import modelfiles  # noqa: E402
from SDMOrganSegLib.images.contours import LEVEL_COLORS  # noqa: E402
from SDMOrganSegLib.common.errors import CancelledError, SDMOrganSegError  # noqa: E402
from SDMOrganSegLib.method.metrics import evaluate_label_maps, organ_metrics  # noqa: E402
from SDMOrganSegLib.formats.modelfiles import Organ  # noqa: E402
from conftest import calibrated_model, needs_torch  # noqa: E402

DATA = REPO / "Testing" / "Data"
HIPPOCAMPUS = DATA / "hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"
HIPPOCAMPUS_LABELS = DATA / "hippocampus" / "labelsTr" / "hippocampus_001.nii.gz"
CT = DATA / "ct-abdomen" / "example_ct_sm.nii.gz"


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    needs_torch()
    root = tmp_path_factory.mktemp("mrml_models")
    return {
        "hippocampus": calibrated_model(
            root / "hippocampus", "test-hippocampus",
            [Organ("anterior hippocampus", 1, (0.9, 0.3, 0.2)), Organ("posterior hippocampus", 2, (0.2, 0.5, 0.9))],
            HIPPOCAMPUS, [0.05, 0.03],
        ),
        "ct": calibrated_model(
            root / "ct", "test-abdomen",
            [Organ("liver", 5, (0.86, 0.55, 0.4)), Organ("spleen", 1, (0.6, 0.3, 0.6))],
            CT, [0.12, 0.04],
        ),
    }


@pytest.fixture(scope="module")
def session():
    return headless.start()


def _run(session, models, image_path: Path, model: str):
    volume = headless.load_volume(image_path)
    outputs = mrmllogic.SDMSegmentationLogic(session.scene).segment_volume(volume, models[model], "cpu", "0, 0.1, 0.2, 0.3")
    return volume, outputs


@pytest.fixture(scope="module")
def hippocampus_run(session, models):
    return _run(session, models, HIPPOCAMPUS, "hippocampus")


@pytest.fixture(scope="module")
def ct_run(session, models):
    return _run(session, models, CT, "ct")


@pytest.fixture(params=["hippocampus", "ct"])
def any_run(request, models):
    volume, outputs = request.getfixturevalue(f"{request.param}_run")
    image_path = HIPPOCAMPUS if request.param == "hippocampus" else CT
    return volume, outputs, models[request.param], image_path


def _matrix(node) -> np.ndarray:
    return mrmllogic.ijk_to_ras_matrix(node)


def _array(volume_node) -> np.ndarray:
    image_data = volume_node.GetImageData()
    dims = image_data.GetDimensions()
    return numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars()).reshape(dims[::-1])


def _counts(scene) -> tuple[int, int]:
    return scene.GetNumberOfNodes(), scene.GetSubjectHierarchyNode().GetNumberOfItems()


# --- geometry ---------------------------------------------------------------------------------------------


def test_oblique_volume_round_trip_keeps_geometry_exactly(session, tmp_path):
    rotation = sitk.VersorTransform((0.3, -0.5, 0.8), 0.6).GetMatrix()  # an oblique, non-axis-aligned frame
    image = sitk.GetImageFromArray(np.random.default_rng(1).normal(size=(5, 6, 7)).astype(np.float32))
    image.SetSpacing((0.7, 1.3, 2.9))
    image.SetOrigin((-12.5, 40.25, 7.0))
    image.SetDirection(rotation)
    node = mrmllogic.sitk_to_volume_node(image, "oblique", session.scene)
    back = mrmllogic.volume_node_to_sitk(node)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), rtol=0, atol=1e-12)
    # Slicer's own writer (RAS -> LPS in the file) agrees with our conversion.
    written = sitk.ReadImage(str(headless.save_node(node, tmp_path / "oblique.nrrd")))
    np.testing.assert_allclose(written.GetOrigin(), image.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(written.GetDirection(), image.GetDirection(), atol=1e-6)
    session.scene.RemoveNode(node)


@pytest.mark.parametrize("path", [HIPPOCAMPUS, CT], ids=["hippocampus", "ct"])
def test_volume_loaded_by_slicer_converts_to_the_file_image(session, path):
    node = headless.load_volume(path)
    converted, expected = mrmllogic.volume_node_to_sitk(node), sitk.ReadImage(str(path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(converted), sitk.GetArrayFromImage(expected))
    for name in ("Spacing", "Origin", "Direction"):
        np.testing.assert_allclose(getattr(converted, f"Get{name}")(), getattr(expected, f"Get{name}")(), atol=1e-5)
    session.scene.RemoveNode(node)


# --- outputs of a run ---------------------------------------------------------------------------------------


def test_segments_are_named_and_coloured_as_the_model_card(any_run):
    _volume, outputs, model_dir, _path = any_run
    card = modelfiles.read_card(model_dir)
    segmentation = outputs.segmentation.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == len(card.organs)
    for index, organ in enumerate(card.organs):
        segment = segmentation.GetNthSegment(index)
        assert segment.GetName() == organ.name
        np.testing.assert_allclose(segment.GetColor(), organ.color, atol=1e-6)
        assert segment.GetLabelValue() == organ.label
        # Not auto-generated: picking a terminology in the Segment Editor keeps the card's name and colour.
        assert not segment.GetNameAutoGenerated() and not segment.GetColorAutoGenerated()
        if organ.terminology:  # the shipped models' organs carry SNOMED CT codes
            import vtk

            tag = vtk.reference("")
            assert segment.GetTag("TerminologyEntry", tag)
            assert f"SCT^{organ.terminology['type'][0]}^" in str(tag)
            assert str(tag).startswith("Segmentation category and type - DICOM master list~")


def test_segmentation_geometry_equals_the_volume(session, any_run):
    volume, outputs, _model, _path = any_run
    seg = outputs.segmentation
    assert seg.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()) is volume
    scene = session.scene
    before = scene.GetNumberOfNodes()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    ids = vtk.vtkStringArray()
    for index in range(seg.GetSegmentation().GetNumberOfSegments()):
        ids.InsertNextValue(seg.GetSegmentation().GetNthSegmentID(index))
    # No reference volume given: the export uses the segmentation's own reference geometry.
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        seg, ids, labelmap, None, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY
    )
    np.testing.assert_allclose(_matrix(labelmap), _matrix(volume), atol=1e-9)
    assert labelmap.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
    exported, labels = _array(labelmap), sitk.GetArrayViewFromImage(outputs.computed.labels)
    for index, organ in enumerate(outputs.computed.organs):  # the export numbers segments 1, 2, ... in order
        np.testing.assert_array_equal(exported == index + 1, labels == organ.label)
    if labelmap.GetDisplayNode() is not None and labelmap.GetDisplayNode().GetColorNode() is not None:
        color = labelmap.GetDisplayNode().GetColorNode()
        if color.GetScene() is scene and color.GetType() == color.User:
            scene.RemoveNode(color)
    scene.RemoveNode(labelmap)
    assert scene.GetNumberOfNodes() == before


def test_sdm_volumes_equal_the_core_library_output(any_run):
    from SDMOrganSegLib.engines.inference import segment_image

    volume, outputs, model_dir, image_path = any_run
    expected = segment_image(sitk.ReadImage(str(image_path)), modelfiles.load_model(model_dir), "cpu")
    for organ in expected.organs:
        node = outputs.sdm_volumes[organ.name]
        np.testing.assert_allclose(_array(node), sitk.GetArrayViewFromImage(expected.sdms[organ.name]), rtol=0, atol=1e-6)
        np.testing.assert_allclose(_matrix(node), _matrix(volume), atol=1e-9)
        display = node.GetDisplayNode()
        assert display.GetColorNode().GetAttribute("SDMOrganSeg.ColorTable") == "diverging"
        assert display.GetLevel() == pytest.approx(0.0)
        assert display.GetWindow() == pytest.approx(2 * np.abs(_array(node)).max(), rel=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(outputs.computed.labels), sitk.GetArrayViewFromImage(expected.labels))


@pytest.mark.parametrize("level", [0.0, 0.2])
def test_contour_points_lie_on_the_sdm_level(any_run, level):
    volume, outputs, _model, _path = any_run
    ras_to_ijk = np.linalg.inv(_matrix(volume))
    checked = 0
    for organ, models in outputs.contours.items():
        polydata = models[level].GetPolyData()
        if polydata.GetNumberOfPoints() == 0:
            continue
        sdm = _array(outputs.sdm_volumes[organ]).astype(np.float64)
        ras = numpy_support.vtk_to_numpy(polydata.GetPoints().GetData()).astype(np.float64)
        sample = ras[np.random.default_rng(0).choice(len(ras), size=min(300, len(ras)), replace=False)]
        ijk = sample @ ras_to_ijk[:3, :3].T + ras_to_ijk[:3, 3]
        # Trilinear interpolation of the SDM at each point, and the 8 voxels around it.
        base = np.clip(np.floor(ijk).astype(int), 0, np.array(sdm.shape[::-1]) - 2)
        t = ijk - base
        value = np.zeros(len(ijk))
        corners = []
        for dx in (0, 1):
            for dy in (0, 1):
                for dz in (0, 1):
                    v = sdm[base[:, 2] + dz, base[:, 1] + dy, base[:, 0] + dx]
                    w = (t[:, 0] if dx else 1 - t[:, 0]) * (t[:, 1] if dy else 1 - t[:, 1]) * (t[:, 2] if dz else 1 - t[:, 2])
                    value += w * v
                    corners.append(v)
        corners = np.stack(corners, axis=1) - level
        assert np.all(corners.min(axis=1) <= 0) and np.all(corners.max(axis=1) >= 0), "points must sit where the SDM crosses the level"
        spread = np.abs(corners).max(axis=1)
        assert np.all(np.abs(value - level) <= 1e-3 * spread + 1e-6), "interpolated SDM at the contour must equal the level"
        checked += len(sample)
    assert checked > 0, "no organ has a contour at this level"


def test_contour_models_are_coloured_and_shown_in_2d_and_3d(any_run):
    _volume, outputs, _model, _path = any_run
    for models in outputs.contours.values():
        assert sorted(models) == [0.0, 0.1, 0.2, 0.3]
        for level, model in models.items():
            display = model.GetDisplayNode()
            np.testing.assert_allclose(display.GetColor(), LEVEL_COLORS[level])
            assert display.GetVisibility2D() and display.GetVisibility3D()
            assert display.GetOpacity() == pytest.approx(1.0 if level == 0 else mrmllogic.OUTER_LEVEL_OPACITY)


def test_outputs_share_one_subject_hierarchy_folder(session, hippocampus_run):
    volume, outputs = hippocampus_run
    sh = session.scene.GetSubjectHierarchyNode()
    assert sh.GetItemName(outputs.folder_item) == f"{volume.GetName()} — test-hippocampus"
    children = vtk.vtkIdList()
    sh.GetItemChildren(outputs.folder_item, children, True)
    in_folder = {sh.GetItemDataNode(children.GetId(i)).GetID() for i in range(children.GetNumberOfIds()) if sh.GetItemDataNode(children.GetId(i))}
    assert {node.GetID() for node in outputs.nodes()} <= in_folder


# --- all or nothing -------------------------------------------------------------------------------------------


def test_cancel_during_the_computation_adds_nothing(session, models):
    volume = headless.load_volume(HIPPOCAMPUS)
    before = _counts(session.scene)
    cancel = threading.Event()
    with pytest.raises(CancelledError):
        mrmllogic.SDMSegmentationLogic(session.scene).segment_volume(
            volume, models["hippocampus"], "cpu", progress=lambda fraction, message: cancel.set() if fraction > 0.01 else None, cancel=cancel
        )
    assert _counts(session.scene) == before


def test_cancel_while_nodes_are_created_removes_them_all(session, hippocampus_run):
    volume, outputs = hippocampus_run
    before = _counts(session.scene)
    seen = {"calls": 0, "nodes": 0}

    def cancel() -> bool:
        seen["calls"] += 1
        seen["nodes"] = max(seen["nodes"], session.scene.GetNumberOfNodes())
        return seen["calls"] >= 6  # after the segmentation and some SDM and contour nodes exist

    with pytest.raises(CancelledError):
        mrmllogic.SDMSegmentationLogic(session.scene).create_nodes(volume, outputs.computed, cancel=cancel)
    assert seen["nodes"] > before[0], "the cancel came too early to test the clean-up"
    assert _counts(session.scene) == before


def test_failure_while_nodes_are_created_removes_them_all(session, hippocampus_run):
    volume, outputs = hippocampus_run
    before = _counts(session.scene)

    def progress(fraction: float, message: str) -> None:
        if fraction > 0.95:
            raise RuntimeError("disk full")  # any error, not only the user-facing kind

    with pytest.raises(RuntimeError, match="disk full"):
        mrmllogic.SDMSegmentationLogic(session.scene).create_nodes(volume, outputs.computed, progress=progress)
    assert _counts(session.scene) == before


def test_model_that_raises_adds_nothing(session, models, monkeypatch, tmp_path):
    from SDMOrganSegLib.method import network

    volume = headless.load_volume(HIPPOCAMPUS)
    logic = mrmllogic.SDMSegmentationLogic(session.scene)
    before = _counts(session.scene)

    def broken_forward(self, x):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(network.UNet3D, "forward", broken_forward)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        logic.segment_volume(volume, models["hippocampus"], "cpu")
    monkeypatch.undo()
    # A damaged model folder is refused with a user-facing message, also before any node exists.
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in ("model.json", "model.safetensors"):
        (damaged / name).write_bytes((models["hippocampus"] / name).read_bytes())
    with open(damaged / "model.safetensors", "r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\x00\x01\x02\x03")
    with pytest.raises(SDMOrganSegError, match="checksum"):
        logic.segment_volume(volume, damaged, "cpu")
    assert _counts(session.scene) == before


def test_bad_levels_are_refused_before_anything_runs(session, hippocampus_run, models):
    volume, _outputs = hippocampus_run
    before = _counts(session.scene)
    with pytest.raises(SDMOrganSegError, match="levels"):
        mrmllogic.SDMSegmentationLogic(session.scene).segment_volume(volume, models["hippocampus"], "cpu", "0, 2")
    assert _counts(session.scene) == before


def test_two_models_on_one_volume_coexist(session, models):
    scene = session.scene
    volume = headless.load_volume(HIPPOCAMPUS, name="shared")
    logic = mrmllogic.SDMSegmentationLogic(scene)
    first = logic.segment_volume(volume, models["hippocampus"], "cpu", "0")
    second = logic.segment_volume(volume, models["ct"], "cpu", "0")
    again = logic.create_nodes(volume, first.computed)  # the first model once more (its result, to save time)
    sh = scene.GetSubjectHierarchyNode()
    folders = [sh.GetItemName(run.folder_item) for run in (first, second, again)]
    assert folders == ["shared — test-hippocampus", "shared — test-abdomen", "shared — test-hippocampus (2)"]
    nodes = [node for run in (first, second, again) for node in run.nodes()]
    assert len({node.GetID() for node in nodes}) == len(nodes)
    assert len({node.GetName() for node in nodes}) == len(nodes), "node names must be unique"
    assert all(scene.IsNodePresent(node) for node in nodes)
    assert first.segmentation.GetSegmentation().GetNthSegment(0).GetName() == "anterior hippocampus"
    assert second.segmentation.GetSegmentation().GetNthSegment(0).GetName() == "liver"
    before = scene.GetNumberOfNodes()
    logic.remove_outputs(second)
    assert all(scene.IsNodePresent(node) for node in first.nodes() + again.nodes())
    assert scene.GetNumberOfNodes() == before - 2 * len(second.nodes())  # each with its display node


def test_sdm_volume_added_later_is_as_create_nodes_makes_it_and_goes_with_its_run(session, hippocampus_run):
    """The review page builds a case's nodes without its SDMs and adds an organ's SDM volume when it is
    shown: the node must be the one create_nodes would have made (same voxels, geometry, display, folder)."""
    import dataclasses

    volume, full = hippocampus_run
    scene = session.scene
    logic = mrmllogic.SDMSegmentationLogic(scene)
    before = _counts(scene)
    lazy = logic.create_nodes(volume, dataclasses.replace(full.computed, sdms={}))
    assert lazy.sdm_volumes == {} and len(lazy.nodes()) == len(full.nodes()) - len(full.sdm_volumes)
    organ = full.computed.organs[1].name
    added = logic.add_sdm_volume(lazy, organ, full.computed.sdms[organ])
    assert logic.add_sdm_volume(lazy, organ, full.computed.sdms[organ]) is added, "a second call must not add another node"
    reference = full.sdm_volumes[organ]
    np.testing.assert_array_equal(_array(added), _array(reference))
    np.testing.assert_allclose(_matrix(added), _matrix(reference), atol=0)
    assert added.GetAttribute("SDMOrganSeg.Organ") == organ
    assert added.GetDisplayNode().GetColorNodeID() == reference.GetDisplayNode().GetColorNodeID()
    assert added.GetDisplayNode().GetWindow() == reference.GetDisplayNode().GetWindow()
    sh = scene.GetSubjectHierarchyNode()
    assert sh.GetItemParent(sh.GetItemByDataNode(added)) == lazy.folder_item
    assert added.GetName().startswith(sh.GetItemName(lazy.folder_item))
    with pytest.raises(SDMOrganSegError, match="disagree in size"):
        logic.add_sdm_volume(lazy, full.computed.organs[0].name, full.computed.sdms[organ][1:, :, :])
    logic.remove_outputs(lazy)
    assert _counts(scene) == before and not scene.IsNodePresent(added)


# --- metrics --------------------------------------------------------------------------------------------------


def test_metrics_table_equals_the_core_metrics(session, hippocampus_run, tmp_path):
    _volume, outputs = hippocampus_run
    scene = session.scene
    reference = headless.load_segmentation(HIPPOCAMPUS_LABELS)
    before = scene.GetNumberOfNodes()
    table = mrmllogic.compute_metrics(outputs.segmentation, reference, matching=mrmllogic.MATCH_BY_ORDER, scene=scene)
    assert scene.GetNumberOfNodes() == before + 1, "temporary label maps must be removed"
    organs = {organ.label: organ.name for organ in outputs.computed.organs}
    reference_image = sitk.ReadImage(str(HIPPOCAMPUS_LABELS))
    expected = evaluate_label_maps(
        sitk.GetArrayFromImage(outputs.computed.labels), sitk.GetArrayFromImage(reference_image), reference_image.GetSpacing(), organs
    )
    rows = mrmllogic.table_rows(table)
    assert [row["Organ"] for row in rows] == list(expected)
    for row in rows:
        metrics = expected[row["Organ"]]
        for column, value in zip(mrmllogic.METRICS_COLUMNS[1:], (metrics.dice, metrics.hd, metrics.hd95, metrics.asd)):
            assert row[column] == pytest.approx(value, rel=1e-9, abs=1e-12), column

    # Matching by name ignores case, spaces and underscores.
    for index, organ in enumerate(outputs.computed.organs):
        reference.GetSegmentation().GetNthSegment(index).SetName(organ.name.upper().replace(" ", "_"))
    by_name = mrmllogic.compute_metrics(outputs.segmentation, reference, scene=scene)
    assert mrmllogic.table_rows(by_name) == rows

    path = mrmllogic.save_table_csv(table, tmp_path / "metrics.csv")
    with open(path, newline="", encoding="utf-8") as handle:
        written = list(csv.DictReader(handle))
    assert [row["Organ"] for row in written] == [row["Organ"] for row in rows]
    assert float(written[0]["HD95 (mm)"]) == rows[0]["HD95 (mm)"]


def test_metrics_of_a_reference_against_itself_without_pytorch(session):
    scene = session.scene
    first, second = headless.load_segmentation(HIPPOCAMPUS_LABELS), headless.load_segmentation(HIPPOCAMPUS_LABELS)
    table = mrmllogic.compute_metrics(first, second, matching=mrmllogic.MATCH_BY_ORDER, scene=scene)
    rows = mrmllogic.table_rows(table)
    assert len(rows) == first.GetSegmentation().GetNumberOfSegments() == 2
    for row in rows:
        assert (row["Dice"], row["HD (mm)"], row["HD95 (mm)"], row["ASD (mm)"]) == (1.0, 0.0, 0.0, 0.0)
    assert table.GetUseColumnTitleAsColumnHeader()
    assert table.GetColumnUnitLabel("HD95 (mm)") == "mm"
    # Slicer shows "<title> [<unit>]": each unit once ("HD [mm]", not "HD (mm) [mm]").
    shown = [table.GetColumnTitle(n) + (f" [{table.GetColumnUnitLabel(n)}]" if table.GetColumnUnitLabel(n) else "") for n in mrmllogic.METRICS_COLUMNS[1:]]
    assert shown == ["Dice", "HD [mm]", "HD95 [mm]", "ASD [mm]"]
    for node in (table, first, second):
        scene.RemoveNode(node)


class _TableNodeOfSlicer56:
    """A table node as Slicer 5.6 has it: without SetUseColumnTitleAsColumnHeader (added in 5.8), only
    the older SetUseColumnNameAsColumnHeader."""

    def __init__(self, node) -> None:
        self.node, self.old_name_calls = node, []

    def __getattr__(self, name: str):
        if "ColumnTitleAsColumnHeader" in name:
            raise AttributeError(name)
        return getattr(self.node, name)

    def SetUseColumnNameAsColumnHeader(self, use: bool) -> None:
        self.old_name_calls.append(use)
        self.node.SetUseColumnTitleAsColumnHeader(use)  # same flag; the old name only logs a deprecation here


def test_metrics_table_on_slicer_5_6_uses_the_older_header_method(session):
    node = session.scene.AddNewNodeByClass("vtkMRMLTableNode")
    empty, full = np.zeros((4, 4, 4), bool), np.ones((4, 4, 4), bool)
    table = _TableNodeOfSlicer56(node)
    mrmllogic._fill_metrics_table(table, [("liver", organ_metrics(full, full, (1.0, 1.0, 1.0))), ("spleen", organ_metrics(empty, full, (1.0, 1.0, 1.0)))])
    assert table.old_name_calls == [True]
    assert node.GetUseColumnTitleAsColumnHeader()
    assert [row["Organ"] for row in mrmllogic.table_rows(node)] == ["liver", "spleen"]
    assert mrmllogic.table_rows(node)[1]["HD (mm)"] == float("inf")
    session.scene.RemoveNode(node)


def test_metrics_refuse_unmatched_names(session, hippocampus_run):
    _volume, outputs = hippocampus_run
    reference = headless.load_segmentation(HIPPOCAMPUS_LABELS)
    with pytest.raises(SDMOrganSegError, match="match by order"):
        mrmllogic.compute_metrics(outputs.segmentation, reference, scene=session.scene)


# --- background process ---------------------------------------------------------------------------------------


def test_background_run_gives_the_same_result_and_can_be_cancelled(session, hippocampus_run, models):
    volume, outputs = hippocampus_run
    run = mrmllogic.BackgroundRun(mrmllogic.volume_node_to_sitk(volume), models["hippocampus"], "cpu", "0, 0.1, 0.2, 0.3", python=sys.executable)
    try:
        run.start()
        assert run.wait(timeout=240) == "done", run.message
        computed = run.result()
    finally:
        run.cleanup()
    assert run.workdir is None
    for organ in outputs.computed.organs:
        np.testing.assert_allclose(
            sitk.GetArrayViewFromImage(computed.sdms[organ.name]), sitk.GetArrayViewFromImage(outputs.computed.sdms[organ.name]), atol=1e-6
        )
        assert computed.surfaces[organ.name][0.0].GetNumberOfPoints() == outputs.computed.surfaces[organ.name][0.0].GetNumberOfPoints()
    before = session.scene.GetNumberOfNodes()
    built = mrmllogic.SDMSegmentationLogic(session.scene).create_nodes(volume, computed)
    assert session.scene.GetNumberOfNodes() > before
    mrmllogic.SDMSegmentationLogic(session.scene).remove_outputs(built)

    cancelled = mrmllogic.BackgroundRun(mrmllogic.volume_node_to_sitk(volume), models["hippocampus"], "cpu", python=sys.executable)
    try:
        cancelled.start()
        cancelled.cancel()
        assert cancelled.wait(timeout=120) == "cancelled"
        with pytest.raises(SDMOrganSegError):
            cancelled.result()
    finally:
        cancelled.cleanup()


def test_slicer_storage_nodes_read_the_written_files(tmp_path):
    """What `segment` writes (ISA-L gzip volumes, LZ4 .vtp in LPS) loads through slicer-core's own storage
    nodes, as File > Add Data would: same voxels, and the surface in RAS (x and y negated)."""
    from SDMOrganSegLib.images.contours import iso_surface, write_polydata
    from SDMOrganSegLib.images.imagewriting import write_image
    from SDMOrganSegLib.method.sdm import normalized_sdm

    mask = np.zeros((24, 30, 28), bool)
    mask[6:18, 8:22, 7:20] = True
    sdm = sitk.GetImageFromArray(normalized_sdm(mask, (1.0, 0.9, 2.0)))
    sdm.SetSpacing((1.0, 0.9, 2.0))
    sdm.SetOrigin((12.0, -30.0, 5.0))
    scene = headless.default_scene()
    for suffix in (".nii.gz", ".nrrd"):
        write_image(sdm, tmp_path / f"sdm{suffix}")
        node = headless.load_volume(tmp_path / f"sdm{suffix}")
        assert np.array_equal(slicer.util.arrayFromVolume(node), sitk.GetArrayViewFromImage(sdm))
        scene.RemoveNode(node)
    surface = iso_surface(sdm, 0.0)
    write_polydata(surface, str(tmp_path / "surface.vtp"))
    model = scene.AddNewNodeByClass("vtkMRMLModelNode")
    storage = scene.AddNewNodeByClass("vtkMRMLModelStorageNode")
    storage.SetFileName(str(tmp_path / "surface.vtp"))
    storage.SetCoordinateSystem(slicer.vtkMRMLStorageNode.CoordinateSystemLPS)
    assert storage.ReadData(model)
    loaded = numpy_support.vtk_to_numpy(model.GetPolyData().GetPoints().GetData())
    written = numpy_support.vtk_to_numpy(surface.GetPoints().GetData())
    assert loaded.shape == written.shape and np.allclose(loaded, written * np.array([-1, -1, 1]), atol=1e-4)
    scene.RemoveNode(model)
    scene.RemoveNode(storage)


def test_outputs_sit_on_the_input_voxels_when_its_extent_does_not_start_at_zero(session, models):
    """A volume whose image data extent starts at (3, 2, 1) (a cropped volume, as Crop Volume leaves it): the
    first output voxel is the input's voxel (3, 2, 1), not its voxel (0, 0, 0)."""
    loaded = headless.load_volume(HIPPOCAMPUS)
    image_data = vtk.vtkImageData()
    image_data.DeepCopy(loaded.GetImageData())
    nx, ny, nz = image_data.GetDimensions()
    start = (3, 2, 1)
    image_data.SetExtent(start[0], start[0] + nx - 1, start[1], start[1] + ny - 1, start[2], start[2] + nz - 1)
    volume = session.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "shifted extent")
    matrix = vtk.vtkMatrix4x4()
    loaded.GetIJKToRASMatrix(matrix)
    volume.SetIJKToRASMatrix(matrix)
    volume.SetAndObserveImageData(image_data)
    outputs = mrmllogic.SDMSegmentationLogic(session.scene).segment_volume(volume, models["hippocampus"], "cpu", "0")
    first_input_voxel = _matrix(volume) @ np.array([*start, 1.0])
    for node in outputs.sdm_volumes.values():
        assert node.GetImageData().GetExtent()[0::2] == (0, 0, 0)
        np.testing.assert_allclose(_matrix(node) @ np.array([0.0, 0, 0, 1]), first_input_voxel, atol=1e-6)
        np.testing.assert_allclose(_matrix(node)[:3, :3], _matrix(volume)[:3, :3], atol=1e-9)
    labelmap = outputs.segmentation.GetSegmentation().GetNthSegment(0).GetRepresentation("Binary labelmap")
    world = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(world)
    origin = np.array([[world.GetElement(r, c) for c in range(4)] for r in range(4)]) @ np.array([0.0, 0, 0, 1])
    np.testing.assert_allclose(origin, first_input_voxel, atol=1e-6)
    # Same voxels as the unshifted volume's run: the geometry moved nothing.
    reference = mrmllogic.SDMSegmentationLogic(session.scene).segment_volume(loaded, models["hippocampus"], "cpu", "0")
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(outputs.computed.labels), sitk.GetArrayViewFromImage(reference.computed.labels))
    for item in (outputs, reference):
        mrmllogic.SDMSegmentationLogic(session.scene).remove_outputs(item)
    session.scene.RemoveNode(volume)
    session.scene.RemoveNode(loaded)
