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
#: The panel's code: the module file's shell and parameter node, and its sections and choices in the library.
PANEL_FILES = [*sorted((REPO / "SDMOrganSeg" / "SDMOrganSegLib" / "mrml" / "panels").glob("*.py")), MODULE_FILE]
PARAMETER_CLASS = "SDMOrganSegParameterNode"

#: Which widget class may be bound to which kind of parameter by Slicer's parameterNodeWrapper.
COMPATIBLE = {
    "qMRMLNodeComboBox": "node",
    "QCheckBox": "bool",
    "QLineEdit": "str",
    "QComboBox": "enum",  # a plain str needs a Choice annotation; this module uses enums
    "QSpinBox": "int",
    "ctkPathLineEdit": "path",  # pathlib.Path
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
    return ast.Module(body=[node for path in PANEL_FILES for node in ast.parse(path.read_text(encoding="utf-8")).body], type_ignores=[])


def _panel_source() -> str:
    return "\n".join(path.read_text(encoding="utf-8") for path in PANEL_FILES)


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
                    if annotation.startswith("Annotated["):  # Annotated[int, WithinRange(1, 10000)]: an int
                        annotation = ast.unparse(statement.annotation.slice.elts[0])
                    kind = (
                        "node" if annotation.startswith("vtkMRML") else
                        "enum" if annotation in enums else
                        "path" if annotation == "pathlib.Path" else
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
    used = set(re.findall(r"self\.ui\.(\w+)", _panel_source()))
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
    for parameter in ("trainingSource", "trainingSegmentation", "trainingVolume", "trainingDataFolder", "trainingMode", "trainingEpochs",
                      "trainingOutputFolder"):
        assert parameter in bindings.values(), f"{parameter} should be bound to a widget"


def _section(name: str) -> ET.Element:
    return next(element for element in ET.parse(UI_FILE).getroot().iter("widget") if element.get("name") == name)


def test_training_section_is_collapsed_by_default_and_holds_the_training_widgets():
    section = _section("trainingCollapsibleButton")
    assert section.get("class") == "ctkCollapsibleButton"
    assert section.find("property[@name='collapsed']/bool").text == "true"
    inside = {element.get("name"): element.get("class") for element in section.iter("widget")}
    expected = {
        "trainingSourceComboBox": "QComboBox", "trainingSceneWidget": "QWidget", "trainingSegmentationSelector": "qMRMLNodeComboBox",
        "trainingVolumeSelector": "qMRMLNodeComboBox", "addTrainingPairButton": "QPushButton", "removeTrainingPairButton": "QPushButton",
        "trainingPairsListWidget": "QListWidget", "trainingFolderWidget": "QWidget", "trainingDataFolderPathLineEdit": "ctkPathLineEdit",
        "trainingStartComboBox": "QComboBox", "trainingModeComboBox": "QComboBox", "trainingEpochsSpinBox": "QSpinBox",
        "trainingOutputPathLineEdit": "ctkPathLineEdit", "trainButton": "QPushButton", "trainingProgressBar": "QProgressBar",
        "trainingStatusLabel": "QLabel", "trainingCurveLabel": "QLabel",
    }
    for name, cls in expected.items():
        assert inside.get(name) == cls, f"{name}: {inside.get(name)}, expected {cls} inside the Training section"
    for name in ("trainingDataFolderPathLineEdit", "trainingOutputPathLineEdit"):  # folders, not files
        element = _section(name)
        assert "ctkPathLineEdit::Dirs" in element.find("property[@name='filters']/set").text
        assert element.find("property[@name='options']/set").text == "ctkPathLineEdit::ShowDirsOnly"


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
                if prop.get("name") in ("nodeTypes", "showChildNodeTypes", "addEnabled", "removeEnabled", "noneEnabled", "collapsed", "text", "editTriggers", "filters", "options") and bases[cls] != "QTableView":
                    element.remove(prop)
    for tag in ("customwidgets", "connections"):
        for found in root.findall(tag):
            root.remove(found)
    path = tmp_path / "SDMOrganSeg_qt.ui"
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
    return path


def _load_qt_widget(tmp_path):
    """The .ui file loaded by PySide6's QUiLoader (offscreen), Slicer's classes mapped to their Qt bases."""
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
    return app, widget, QtWidgets


def test_ui_loads_in_qt_with_slicer_classes_mapped(tmp_path):
    app, widget, QtWidgets = _load_qt_widget(tmp_path)
    for name, element in _widgets().items():
        child = widget if widget.objectName() == name else widget.findChild(QtWidgets.QWidget, name)
        assert child is not None, f"{name} was not created by QUiLoader"
    assert widget.findChild(QtWidgets.QLineEdit, "levelsLineEdit").text() == "0, 0.1, 0.2, 0.3"
    assert widget.findChild(QtWidgets.QCheckBox, "show2DCheckBox").isChecked()
    assert widget.findChild(QtWidgets.QPushButton, "applyButton").text() == "Apply"
    assert widget.findChild(QtWidgets.QPushButton, "trainButton").text() == "Train"
    epochs = widget.findChild(QtWidgets.QSpinBox, "trainingEpochsSpinBox")
    assert (epochs.minimum(), epochs.maximum(), epochs.value()) == (1, 10000, 20)
    widget.deleteLater()
    app.processEvents()


def test_bound_widgets_show_and_return_the_parameter_values(module, tmp_path):
    """What Slicer's parameterNodeWrapper does with each binding of the .ui file, done on the PySide6 widgets:
    a combo box lists an enum's labels and maps the index back to the member, a spin box takes the range of
    the WithinRange annotation, check boxes and line edits hold the value; every default survives the round trip."""
    import enum
    import pathlib
    import typing

    app, widget, QtWidgets = _load_qt_widget(tmp_path)
    hints = typing.get_type_hints(module.SDMOrganSegParameterNode, include_extras=True)
    checked = set()
    for name, parameter in _parameter_bindings().items():
        hint = hints[parameter]
        kind = typing.get_origin(hint)
        base = typing.get_args(hint)[0] if kind is typing.Annotated else hint
        default = getattr(module.SDMOrganSegParameterNode, parameter, None)
        child = widget.findChild(QtWidgets.QWidget, name)
        if isinstance(base, type) and issubclass(base, enum.Enum):
            assert isinstance(child, QtWidgets.QComboBox)
            child.clear()
            child.addItems([member.label() for member in base])
            child.setCurrentIndex(list(base).index(default))
            assert list(base)[child.currentIndex()] is default and child.currentText() == default.label()
        elif base is int:
            assert isinstance(child, QtWidgets.QSpinBox)
            limits = next(iter(typing.get_args(hint)[1:]), None)  # WithinRange(1, 10000), stood in as (1, 10000)
            if limits is not None:
                child.setRange(*limits)
            child.setValue(default)
            assert child.value() == default
            child.setValue(0)
            assert child.value() == 1, "zero epochs must not be possible"
        elif base is bool:
            child.setChecked(default)
            assert child.isChecked() is default
        elif base is str:
            child.setText(default)
            assert child.text() == default
        elif base is pathlib.Path:
            assert _widgets()[name].get("class") == "ctkPathLineEdit"  # ctkPathLineEdit <-> pathlib.Path in Slicer
        else:
            assert _widgets()[name].get("class") == "qMRMLNodeComboBox", name
        checked.add(parameter)
    assert {"trainingSource", "trainingMode", "trainingEpochs", "trainingOutputFolder", "trainingDataFolder"} <= checked
    assert module.SDMOrganSegParameterNode.trainingMode is module.TrainingMode.DUAL  # the default model's
    assert [member.value for member in module.TrainingMode] == ["sdm+dice", "sdm", "l1+dice", "dice", "dual"]
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
    from SDMOrganSegLib.mrml import headless

    headless.start()
    stand_ins = {
        "qt": types.ModuleType("qt"),
        "slicer.i18n": types.SimpleNamespace(tr=lambda text: text, translate=lambda context, text: text),
        "slicer.parameterNodeWrapper": types.SimpleNamespace(parameterNodeWrapper=lambda cls: cls, WithinRange=lambda minimum, maximum: (minimum, maximum)),
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

    from SDMOrganSegLib.mrml import headless
    from SDMOrganSegLib.formats import modelfiles
    from SDMOrganSegLib.method import network
    from SDMOrganSegLib.formats.modelfiles import ModelCard, Organ

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


def test_module_logic_prepares_a_training_from_scene_pairs(module, tmp_path):
    """The Logic the Training section calls: the scene's pairs become the run's data folder, the settings come
    from the model to fine-tune; a problem is one line and leaves the scene as it was."""
    import slicer

    from SDMOrganSegLib.mrml import headless

    data = REPO / "Testing" / "Data" / "hippocampus"
    pairs = []
    for case in ("hippocampus_001", "hippocampus_003"):
        volume = headless.load_volume(data / "imagesTr" / f"{case}.nii.gz")
        segmentation = headless.load_segmentation(data / "labelsTr" / f"{case}.nii.gz")
        for index, name in enumerate(("anterior hippocampus", "posterior hippocampus")):
            segmentation.GetSegmentation().GetNthSegment(index).SetName(name)
        pairs.append((volume, segmentation))
    logic = module.SDMOrganSegLogic()
    before = slicer.mrmlScene.GetNumberOfNodes()
    config = logic.prepareTraining(str(tmp_path / "run"), "hippocampus", "dual", 10, "cpu", pairs=pairs)
    assert slicer.mrmlScene.GetNumberOfNodes() == before
    assert config["data_dir"] == str(tmp_path / "run" / "data") and config["init_model"].endswith("hippocampus")
    assert sorted(p.name for p in (tmp_path / "run" / "data" / "labelsTr").iterdir()) == [f"{v.GetName()}.nii.gz" for v, _ in pairs]
    pairs[1][1].GetSegmentation().GetNthSegment(1).SetName("Segment_2")
    with pytest.raises(module.SDMOrganSegError, match="segment 'Segment_2' of"):
        logic.prepareTraining(str(tmp_path / "other"), "hippocampus", "dual", 10, "cpu", pairs=pairs)
    assert slicer.mrmlScene.GetNumberOfNodes() == before
    assert logic.trainingPresets().keys() == {"cpu", "paper"}


def test_logic_refuses_another_modality_before_the_worker_unless_forced(module, tmp_path, monkeypatch):
    """A CT for the (MR) hippocampus model: startSegmentation raises InputMismatchError, whose reason the panel
    puts to the user as a question, before any worker starts; with force=True (the user said Yes) it starts."""
    import sys
    import types

    import slicer

    from SDMOrganSegLib.mrml import headless

    lib = module._lib()
    started = []

    class Run:
        def __init__(self, image, model_dir, device, levels, **options):
            started.append(options.get("force"))

        def start(self):
            pass

    monkeypatch.setattr(lib, "BackgroundRun", Run)
    monkeypatch.setattr(lib, "python_executable", lambda: sys.executable)
    monkeypatch.setattr(slicer.util, "startupEnvironment", lambda: {}, raising=False)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(temporaryPath=str(tmp_path)), raising=False)
    volume = headless.load_volume(REPO / "Testing" / "Data" / "ct-abdomen" / "example_ct_sm.nii.gz")
    logic = module.SDMOrganSegLogic()
    with pytest.raises(module.InputMismatchError) as refused:
        logic.startSegmentation(volume, "hippocampus", "cpu", "0")
    assert started == [] and refused.value.reason.startswith("this model is for MR") and "\n" not in str(refused.value)
    logic.startSegmentation(volume, "hippocampus", "cpu", "0", force=True)
    assert started == [True]


def test_panel_asks_before_forcing_and_keeps_buttons_disabled_while_starting():
    """The panel's code (read, not run: the widget needs Slicer's Qt): Apply catches InputMismatchError and
    asks a yes/no question before starting with force=True; Apply, Train and Compute are disabled from the
    click until the run has started (pip's install loop processes events); cleanup() disconnects aboutToQuit."""
    methods = {
        node.name: ast.get_source_segment(path.read_text(encoding="utf-8"), node)
        for path in PANEL_FILES for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(node, ast.FunctionDef)
    }
    apply = methods["onApplyButton"]
    assert "except InputMismatchError" in apply and "confirmYesNoDisplay" in apply and "force=True" in apply
    assert apply.index("confirmYesNoDisplay") < apply.index("force=True")
    for name in ("_startInBackground", "onComputeMetrics"):
        body = methods[name]
        assert "self._setStarting(True)" in body and "finally:" in body and body.index("self._setStarting(True)") < body.index("_ensureDependencies")
    starting = methods["_setStarting"]
    assert all(f"self.ui.{button}" in starting for button in ("applyButton", "trainButton", "computeMetricsButton"))
    assert methods["_updateButtons"].split("\n")[1].strip() == "if self._starting:"
    assert 'slicer.app.disconnect("aboutToQuit()", self.stopBackgroundProcesses)' in methods["cleanup"]
