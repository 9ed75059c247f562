"""The module's Designer file against the module's code, without Slicer.

Slicer's widget classes (qMRMLNodeComboBox, ctkCollapsibleButton...) do not exist in PySide6, so the
checks read the XML for object names, classes and ``SlicerParameterName`` bindings, read
SDMOrganSeg.py with ``ast``, and finally load the file with PySide6's QUiLoader after mapping Slicer's
classes to the Qt classes they extend.
"""

from __future__ import annotations

import ast
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UI_FILE = REPO / "Resources" / "UI" / "SDMOrganSeg.ui"
MODULE_FILE = REPO / "SDMOrganSeg" / "SDMOrganSeg.py"
PARAMETER_CLASS = "SDMOrganSegParameterNode"

#: Which widget class may be bound to which kind of parameter by Slicer's parameterNodeWrapper.
COMPATIBLE = {
    "qMRMLNodeComboBox": "node",
    "QCheckBox": "bool",
    "QLineEdit": "str",
    "QComboBox": "enum",  # a plain str needs a Choice annotation; this module uses enums
}


def _widgets() -> dict[str, ET.Element]:
    root = ET.parse(UI_FILE).getroot()
    return {element.get("name"): element for element in root.iter("widget")}


def _parameter_bindings() -> dict[str, str]:
    bindings = {}
    for name, element in _widgets().items():
        for prop in element.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bindings[name] = prop.findtext("string")
    return bindings


def _module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"))


def _parameter_fields() -> dict[str, str]:
    """Parameter node field -> kind (node, bool, str, enum, other) from the class annotations."""
    tree = _module_tree()
    enums = {
        node.name for node in tree.body
        if isinstance(node, ast.ClassDef) and any(isinstance(base, ast.Attribute) and base.attr == "Enum" for base in node.bases)
    }
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == PARAMETER_CLASS:
            fields = {}
            for statement in node.body:
                if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
                    annotation = ast.unparse(statement.annotation)
                    kind = (
                        "node" if annotation.startswith("vtkMRML") else
                        "enum" if annotation in enums else
                        annotation if annotation in ("bool", "str", "int", "float") else "other"
                    )
                    fields[statement.target.id] = kind
            return fields
    raise AssertionError(f"{PARAMETER_CLASS} not found in {MODULE_FILE}")


def test_ui_file_is_well_formed_and_names_are_unique():
    root = ET.parse(UI_FILE).getroot()
    names = [element.get("name") for element in root.iter("widget")]
    assert len(names) == len(set(names)), "widget object names must be unique"
    assert root.find("widget").get("class") == "qMRMLWidget", "the top-level widget must be a qMRMLWidget (it hands the scene to MRML widgets)"


def test_every_widget_the_module_uses_exists():
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text(encoding="utf-8")))
    assert used, "the module should refer to its widgets as self.ui.<name>"
    missing = sorted(used - set(_widgets()))
    assert not missing, f"SDMOrganSeg.py uses widgets missing from {UI_FILE.name}: {missing}"


def test_required_widgets_are_present_with_their_classes():
    widgets = _widgets()
    expected = {
        "inputVolumeSelector": "qMRMLNodeComboBox", "modelComboBox": "QComboBox", "deviceComboBox": "QComboBox",
        "gpuLabel": "QLabel", "levelsLineEdit": "QLineEdit", "show2DCheckBox": "QCheckBox", "show3DCheckBox": "QCheckBox",
        "applyButton": "QPushButton", "progressBar": "QProgressBar", "statusLabel": "QLabel",
        "outputsCollapsibleButton": "ctkCollapsibleButton", "metricsCollapsibleButton": "ctkCollapsibleButton",
        "referenceSegmentationSelector": "qMRMLNodeComboBox", "segmentMatchingComboBox": "QComboBox",
        "computeMetricsButton": "QPushButton", "metricsTableView": "qMRMLTableView", "saveCsvButton": "QPushButton",
    }
    for name, cls in expected.items():
        assert name in widgets, name
        assert widgets[name].get("class") == cls, f"{name} is a {widgets[name].get('class')}, expected {cls}"
    levels = widgets["levelsLineEdit"].find("property[@name='text']/string").text
    assert levels == "0, 0.1, 0.2, 0.3"


def test_parameter_bindings_match_the_parameter_node():
    fields = _parameter_fields()
    bindings = _parameter_bindings()
    widgets = _widgets()
    assert bindings, "widgets should be bound with the SlicerParameterName property"
    for widget, parameter in bindings.items():
        assert parameter in fields, f"{widget} is bound to {parameter!r}, which {PARAMETER_CLASS} does not have"
        cls = widgets[widget].get("class")
        assert COMPATIBLE.get(cls) == fields[parameter], f"{widget} ({cls}) cannot show {parameter!r} ({fields[parameter]})"
    for parameter in ("inputVolume", "device", "levels", "show2D", "show3D", "referenceSegmentation", "segmentMatching"):
        assert parameter in bindings.values(), f"{parameter} should be bound to a widget"


def test_mrml_widgets_receive_the_scene():
    root = ET.parse(UI_FILE).getroot()
    receivers = {
        c.findtext("receiver") for c in root.iter("connection")
        if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)" and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"
    }
    mrml = {name for name, element in _widgets().items() if element.get("class", "").startswith("qMRML") and element.get("class") != "qMRMLWidget"}
    assert mrml <= receivers, f"MRML widgets without the scene connection: {sorted(mrml - receivers)}"


def _qt_only_ui(tmp_path: Path) -> Path:
    """A copy of the .ui file with Slicer's classes replaced by the Qt classes they extend."""
    root = ET.parse(UI_FILE).getroot()
    bases = {c.findtext("class"): c.findtext("extends") for c in root.iter("customwidget")}
    for element in root.iter("widget"):
        cls = element.get("class")
        if cls in bases:
            element.set("class", bases[cls])
            for prop in list(element.findall("property")):
                # Properties of the Slicer classes (nodeTypes, collapsed...) do not exist on the Qt base.
                if prop.get("name") in ("nodeTypes", "showChildNodeTypes", "addEnabled", "removeEnabled", "noneEnabled", "collapsed", "text", "editTriggers") and bases[cls] != "QTableView":
                    element.remove(prop)
    for tag in ("customwidgets", "connections"):
        for found in root.findall(tag):
            root.remove(found)
    path = tmp_path / "SDMOrganSeg_qt.ui"
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
    return path


def test_ui_loads_in_qt_with_slicer_classes_mapped(tmp_path):
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    QtWidgets = pytest.importorskip("PySide6.QtWidgets", reason="PySide6 is not installed")
    QtUiTools = pytest.importorskip("PySide6.QtUiTools", reason="PySide6 QtUiTools is not installed")
    QtCore = pytest.importorskip("PySide6.QtCore")
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    loader = QtUiTools.QUiLoader()
    file = QtCore.QFile(str(_qt_only_ui(tmp_path)))
    assert file.open(QtCore.QFile.ReadOnly)
    widget = loader.load(file)
    file.close()
    assert widget is not None, loader.errorString()
    for name, element in _widgets().items():
        child = widget if widget.objectName() == name else widget.findChild(QtCore.QObject, name)
        assert child is not None, f"{name} was not created by QUiLoader"
    assert widget.findChild(QtWidgets.QLineEdit, "levelsLineEdit").text() == "0, 0.1, 0.2, 0.3"
    assert widget.findChild(QtWidgets.QCheckBox, "show2DCheckBox").isChecked()
    assert widget.findChild(QtWidgets.QPushButton, "applyButton").text() == "Apply"
    widget.deleteLater()
    app.processEvents()


# --- the module's Logic, imported outside Slicer ----------------------------------------------------------------


@pytest.fixture()
def module(monkeypatch):
    """SDMOrganSeg.py imported on slicer-core, with stand-ins for the Qt-only parts of Slicer's Python.

    Only what the module needs at import time is stood in for (qt, slicer.i18n, slicer.parameterNodeWrapper,
    slicer.ScriptedLoadableModule base classes); the Logic then runs on a real headless MRML scene.
    """
    import importlib.util
    import sys
    import types

    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the 'slicer' module found is not slicer-core")
    sys.path.insert(0, str(REPO / "SDMOrganSeg"))
    from SDMOrganSegLib import headless

    headless.start()
    stand_ins = {
        "qt": types.ModuleType("qt"),
        "slicer.i18n": types.SimpleNamespace(tr=lambda text: text, translate=lambda context, text: text),
        "slicer.parameterNodeWrapper": types.SimpleNamespace(parameterNodeWrapper=lambda cls: cls),
        "slicer.ScriptedLoadableModule": types.SimpleNamespace(**{
            name: type(name, (), {"__init__": lambda self, *args, **kwargs: None})
            for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest")
        }),
    }
    for name, stand_in in stand_ins.items():
        monkeypatch.setitem(sys.modules, name, stand_in)
        if name.startswith("slicer."):
            monkeypatch.setattr(slicer, name.split(".", 1)[1], stand_in, raising=False)
    spec = importlib.util.spec_from_file_location("SDMOrganSeg", MODULE_FILE)
    loaded = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "SDMOrganSeg", loaded)
    spec.loader.exec_module(loaded)
    return loaded


def test_module_imports_without_pytorch(module):
    # Slicer imports every module at start-up: nothing heavy at import, only the dependency-free errors module.
    source = MODULE_FILE.read_text(encoding="utf-8")
    top_level_imports = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert not [line for line in top_level_imports if "torch" in line or "mrmllogic" in line or "SimpleITK" in line]
    assert module.SDMOrganSegLogic.missingPackages() == []


def test_module_logic_segments_and_measures_on_a_real_scene(module, tmp_path, monkeypatch):
    pytest.importorskip("torch", reason="PyTorch is not installed")
    import slicer

    from SDMOrganSegLib import headless, modelfiles, network
    from SDMOrganSegLib.modelfiles import ModelCard, Organ

    net = network.UNet3D(network.preset("cpu", 1, 2))
    models = tmp_path / "Models"
    organs = [Organ("anterior hippocampus", 1, (0.9, 0.3, 0.2)), Organ("posterior hippocampus", 2, (0.2, 0.5, 0.9))]
    modelfiles.save_model(net, ModelCard(name="smoke", architecture=net.config, organs=organs), models / "hippocampus")
    monkeypatch.setenv("SDMORGANSEG_MODELS", str(models))
    logic = module.SDMOrganSegLogic()
    assert list(logic.shippedModels()) == ["hippocampus"]
    assert logic.resolveModel("") == models / "hippocampus"
    assert logic.readModelCard("hippocampus")["name"] == "smoke"
    with pytest.raises(module.SDMOrganSegError, match="neither a folder nor a shipped model"):
        logic.resolveModel(str(tmp_path / "nowhere"))

    volume = headless.load_volume(REPO / "Testing" / "Data" / "hippocampus" / "imagesTr" / "hippocampus_001.nii.gz")
    before = slicer.mrmlScene.GetNumberOfNodes()
    outputs = logic.segment(volume, "", device="cpu", levels="0, 0.1")
    assert slicer.mrmlScene.GetNumberOfNodes() > before
    names = [outputs.segmentation.GetSegmentation().GetNthSegment(i).GetName() for i in range(2)]
    assert names == ["anterior hippocampus", "posterior hippocampus"]
    table = logic.computeMetrics(outputs.segmentation, outputs.segmentation, "name")
    assert table.GetNumberOfRows() == 2
    assert float(table.GetTable().GetValueByName(0, "Dice").ToDouble()) == pytest.approx(1.0)
    saved = logic.saveTableCsv(table, str(tmp_path / "metrics.csv"))
    assert saved.read_text(encoding="utf-8").splitlines()[0] == "Organ,Dice,HD (mm),HD95 (mm),ASD (mm)"
