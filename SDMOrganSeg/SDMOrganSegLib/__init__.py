"""SDMOrganSeg's library: organ segmentation by predicting signed distance maps.

Implements Xue et al., "Shape-Aware Organ Segmentation by Predicting Signed Distance Maps", AAAI 2020.
One sub-package per concern, each importing only those below it (README, "Layout"; import-linter checks it):

- ``cli`` (the command line), above everything;
- ``review``: the browser review (trame-slicer), and ``mrml``: the Slicer side (MRML logic, the panel's
  sections, the worker process, the batch run), the only places that touch ``slicer``, ``vtkMRML*`` or ``qt``;
- ``engines``: running networks (inference, training, several processes, ONNX, the output files);
- ``formats``: model folders, terminology, training data, DICOM outputs;
- ``method``: the method and its math (SDMs, network, losses, metrics, pre- and post-processing);
- ``images``: image files, contours and pictures;
- ``common``: errors and file helpers.

So everything below the Slicer side runs the same in Slicer's Python, in plain Python and on a training
server. This package's own namespace holds only the version numbers below.
"""

__version__ = "0.1.0"

#: Newest model-card format this package reads; cards with a newer one are refused. A card is written with the
#: oldest format that holds it (``ModelCard.needed_format``): 2 where ``inference.labels_from`` is ``"sdm"``,
#: which a reader of format 1 would silently ignore, giving another label map than the card's metrics; 3 where
#: the architecture has an SDM branch (``UNetConfig.sdm_branch``), which a reader of format 2 cannot build.
MODEL_CARD_FORMAT = 3
