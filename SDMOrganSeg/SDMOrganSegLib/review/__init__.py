"""Reviewing segmentations in a web browser (``sdmorganseg review`` and ``snapshot``): trame-slicer's MRML
scene and views (``reviewscene``), views that render only when asked, for ``snapshot`` and the benchmark
(``offscreenviews``), the cases of a batch output or a folder (``reviewcases``) and the web application
(``reviewapp``). Part of the Slicer side: it runs on slicer-core.

May import: every other part of the library but the command line, ``slicer``, ``vtkMRML*`` and trame.
"""
