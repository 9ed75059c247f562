"""The engines that run networks: which device (``devices``), several processes under torchrun
(``distributed``), segmenting a volume (``inference``), ONNX export and ONNX Runtime (``onnxmodel``),
writing a segmentation's files (``outputs``) and training (``training``).

May import: ``SDMOrganSegLib.common``, ``.images``, ``.method`` and ``.formats``. Never the Slicer side
(``SDMOrganSegLib.mrml``, ``SDMOrganSegLib.review``), ``slicer``, ``vtkMRML*`` or ``qt``: the command line
and training servers run this code without Slicer.
"""
