"""The Metrics section: a segmentation against a reference (Dice, HD, HD95, ASD), the table and its CSV."""

from __future__ import annotations

import logging

from ...common.errors import SDMOrganSegError
from ..dependencies import translated as _
from .section import PanelSection, _unexpected


class MetricsPanel(PanelSection):
    """A segmentation against a reference (Dice, HD, HD95, ASD): the table, shown and saved as CSV."""

    def setup(self) -> None:
        self.ui.computeMetricsButton.connect("clicked(bool)", self.onComputeMetrics)
        self.ui.saveCsvButton.connect("clicked(bool)", self.onSaveCsv)

    def showTable(self) -> None:
        pn = self.parameterNode
        self.ui.metricsTableView.setMRMLTableNode(pn.metricsTable if pn else None)

    def updateButtons(self) -> None:
        pn = self.parameterNode
        hasInputs = pn is not None and pn.evaluatedSegmentation and pn.referenceSegmentation
        self.ui.computeMetricsButton.enabled = bool(hasInputs)
        self.ui.saveCsvButton.enabled = bool(pn is not None and pn.metricsTable)

    def onComputeMetrics(self) -> None:
        import slicer

        pn = self.parameterNode
        self._setStarting(True)
        try:
            if not self._ensureDependencies(forMetricsOnly=True):
                return
            with slicer.util.WaitCursor():
                table = self.logic.computeMetrics(pn.evaluatedSegmentation, pn.referenceSegmentation, pn.segmentMatching.value)
        except SDMOrganSegError as error:
            self._showError(str(error))
            return
        except Exception as error:
            logging.exception("SDMOrganSeg could not compute the metrics")
            self._showError(_unexpected(error))
            return
        finally:
            self._setStarting(False)
        pn.metricsTable = table
        self.ui.statusLabel.text = _("Metrics computed: table '{name}'.").format(name=table.GetName())

    def onSaveCsv(self) -> None:
        import qt

        table = self.parameterNode.metricsTable if self.parameterNode else None
        if table is None:
            return
        path = qt.QFileDialog.getSaveFileName(self.widget.parent, _("Save metrics as CSV"), f"{table.GetName()}.csv", _("CSV files (*.csv)"))
        if not path:
            return
        try:
            self.logic.saveTableCsv(table, path)
        except (SDMOrganSegError, OSError) as error:
            self._showError(str(error))
            return
        self.ui.statusLabel.text = _("Saved {path}").format(path=path)
