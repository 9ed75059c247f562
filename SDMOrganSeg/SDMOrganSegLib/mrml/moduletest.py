"""The module's self-test (Slicer's "Reload and Test", and the ``py_SDMOrganSeg`` ctest of a Slicer build):
the Logic on a real volume node, as the panel runs it, and the nodes it adds.

:class:`ModuleTest` holds the tests; SDMOrganSeg.py mixes it into its ``SDMOrganSegTest``
(ScriptedLoadableModuleTest), where Slicer looks for it. ``slicer`` is imported inside the tests: this
module imports without Slicer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..common.errors import SDMOrganSegError
from ..formats import modelfiles
from ..formats.modelfiles import CARD_FILE as MODEL_CARD_FILE
from ..formats.modelfiles import DEFAULT_MODEL

#: The source tree's top (this file is SDMOrganSeg/SDMOrganSegLib/mrml/moduletest.py); a built module finds
#: the test data through SDMORGANSEG_TESTING_DATA instead (SDMOrganSeg/CMakeLists.txt sets it).
REPOSITORY = Path(__file__).resolve().parents[3]


class ModuleTest:
    """Runs the Logic on a real volume node, as the panel does, and checks the nodes it adds. Mixed into the
    module's ScriptedLoadableModuleTest (SDMOrganSegTest in SDMOrganSeg.py), which gives ``newLogic()``."""

    def newLogic(self):
        raise NotImplementedError("the module's test class returns its SDMOrganSegLogic")

    def setUp(self):
        import slicer

        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SegmentAndMeasure()
        self.setUp()
        self.test_BadLevelsLeaveSceneUnchanged()

    def _testVolume(self):
        """A hippocampus case of the repository's test data, else a synthetic ellipsoid phantom."""
        import slicer

        data = Path(os.environ.get("SDMORGANSEG_TESTING_DATA", REPOSITORY / "Testing" / "Data"))
        case = data / "hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"
        if case.is_file():
            return slicer.util.loadVolume(str(case)), data / "hippocampus" / "labelsTr" / case.name
        import numpy as np

        z, y, x = np.mgrid[:32, :40, :36]
        phantom = 100.0 * (((x - 18) / 10) ** 2 + ((y - 20) / 12) ** 2 + ((z - 16) / 8) ** 2 < 1) + np.random.default_rng(0).normal(0, 5, z.shape)
        volume = slicer.util.addVolumeFromArray(phantom.astype(np.float32), name="phantom")
        return volume, None

    def _testModel(self) -> Path:
        """The shipped default model, else a small random-weight model written to the temporary folder."""
        import slicer

        logic = self.newLogic()
        if DEFAULT_MODEL in logic.shippedModels():
            return logic.shippedModels()[DEFAULT_MODEL]
        from ..method import network  # PyTorch: only for this fallback

        folder = Path(slicer.app.temporaryPath) / "SDMOrganSegTestModel"
        if not (folder / MODEL_CARD_FILE).is_file():
            net = network.UNet3D(network.preset("cpu", 1, 2))
            organs = [modelfiles.Organ("anterior hippocampus", 1, (0.9, 0.3, 0.2)), modelfiles.Organ("posterior hippocampus", 2, (0.2, 0.5, 0.9))]
            modelfiles.save_model(net, modelfiles.ModelCard(name="test-random", architecture=net.config, organs=organs), folder, overwrite=True)
        return folder

    def test_SegmentAndMeasure(self):
        import slicer

        self.delayDisplay("Starting the test")
        logic = self.newLogic()
        self.assertTrue(logic.ensureDependencies(askConfirmation=False))
        volume, labelsPath = self._testVolume()
        modelDir = self._testModel()
        card = json.loads((modelDir / MODEL_CARD_FILE).read_text(encoding="utf-8"))

        outputs = logic.segment(volume, modelDir, device="cpu", levels="0, 0.1, 0.2, 0.3")

        segmentation = outputs.segmentation.GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), len(card["organs"]))
        for index, organ in enumerate(card["organs"]):
            segment = segmentation.GetNthSegment(index)
            self.assertEqual(segment.GetName(), organ["name"])
            for got, expected in zip(segment.GetColor(), organ["color"]):
                self.assertAlmostEqual(got, expected, places=5)
        self.assertEqual(outputs.segmentation.GetNodeReference("referenceImageGeometryRef"), volume)
        for organ in card["organs"]:
            sdm = outputs.sdm_volumes[organ["name"]]
            self.assertEqual(sdm.GetImageData().GetDimensions(), volume.GetImageData().GetDimensions())
            self.assertEqual(len(outputs.contours[organ["name"]]), 4)

        if labelsPath is not None and labelsPath.is_file():
            reference = slicer.util.loadSegmentation(str(labelsPath))
            matching = "order"
        else:
            reference, matching = outputs.segmentation, "name"
        table = logic.computeMetrics(outputs.segmentation, reference, matching)
        self.assertEqual(table.GetNumberOfRows(), len(card["organs"]))
        if reference is outputs.segmentation:
            self.assertAlmostEqual(float(table.GetTable().GetValueByName(0, "Dice").ToDouble()), 1.0)
        self.delayDisplay("Test passed")

    def test_BadLevelsLeaveSceneUnchanged(self):
        import slicer

        logic = self.newLogic()
        volume, _labels = self._testVolume()
        before = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(SDMOrganSegError):
            logic.segment(volume, self._testModel(), device="cpu", levels="0, 5")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)
