"""Slicer-free core of SDMOrganSeg: organ segmentation by predicting signed distance maps.

Implements Xue et al., "Shape-Aware Organ Segmentation by Predicting Signed Distance Maps", AAAI 2020.
Nothing in this package imports Slicer or Qt, so the same code runs in Slicer's Python, in plain Python
and on a training server.
"""

__version__ = "0.1.0"

#: Version of the model-card format written by this package; cards with a newer one are refused.
MODEL_CARD_FORMAT = 1
