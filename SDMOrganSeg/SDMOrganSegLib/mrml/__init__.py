"""The Slicer side: everything that touches MRML scenes, Slicer's application or its Python.

The panel's Logic and its parts (``mrmllogic``: scene conversions ``mrmlscene``, segmentation
``mrmlsegmentation``, training ``mrmltraining``, metrics tables ``mrmlmetrics``), the background worker
process both long jobs run in (``background``), a headless MRML scene on the ``slicer-core`` package
(``headless``) and the packages Slicer's Python must install (``dependencies``).

May import: every other part of the library but the command line and ``SDMOrganSegLib.review``; and
``slicer``, ``vtkMRML*`` and ``qt``, inside the functions that need them, so that every module here but
``headless`` (the slicer-core scene itself) imports without Slicer (Python 3.9 and 3.12 in CI).
"""
