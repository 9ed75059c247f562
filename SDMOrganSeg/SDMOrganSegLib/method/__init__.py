"""The method and its math (Xue et al., AAAI 2020): signed distance maps (``sdm``), the network's
description and layers (``architecture``, ``network``), the losses (``losses``), training augmentation
(``augmentation``), intensity and spacing (``preprocessing``), post-processing (``postprocessing``),
plausibility checks of an input (``plausibility``), the evaluation metrics (``metrics``) and the
function-preserving widening of a trained network (``widening``).

May import: ``SDMOrganSegLib.common`` and ``SDMOrganSegLib.images``. Never model folders, the engines or
anything of Slicer.
"""
