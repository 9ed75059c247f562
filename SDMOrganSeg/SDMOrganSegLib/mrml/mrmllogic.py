"""The MRML side of SDMOrganSeg: volume nodes in, segmentation, SDM volumes and contour models out; the
metrics table; training and fine-tuning from the scene. One import for the Slicer module's Logic, ``Scripts/batch.py``
and the tests, in Slicer or on slicer-core (see :mod:`.headless`).

The parts, by concern (each importable on its own; nothing here imports Qt, and ``slicer`` is imported only
inside the functions that need it, so the background worker runs in a plain Python process):

- :mod:`.mrmlscene`: volume nodes <-> SimpleITK images (RAS <-> LPS, oblique geometry kept exactly) and
  scene changes undone on failure;
- :mod:`.mrmlsegmentation`: a model run on a volume node (:func:`compute_outputs` without the scene, then
  the nodes, all or nothing) and its background run (:class:`BackgroundRun`);
- :mod:`.mrmlmetrics`: Dice, HD, HD95 and ASD of two segmentations as a table node, and its CSV;
- :mod:`.mrmltraining`: volumes and segmentations of the scene as a training folder, training and
  fine-tuning in the background (:class:`TrainingRun`), their progress;
- :mod:`.background`: the one process wrapper both background jobs use (start, progress, cancel, kill).
"""

from __future__ import annotations

from .background import (  # noqa: F401
    BackgroundProcess, kill_process_tree, probe_devices_command, python_executable, start_process, worker_main,
)
from ..images.contours import DEFAULT_LEVELS, parse_levels  # noqa: F401
from ..method.plausibility import modality_mismatch  # noqa: F401  (the Logic checks an input before its worker starts)
from .mrmlmetrics import (  # noqa: F401
    MATCH_BY_NAME, MATCH_BY_ORDER, METRICS_COLUMNS, _fill_metrics_table, compute_metrics, match_segments, save_table_csv,
    table_rows,
)
from .mrmlscene import ijk_to_ras_matrix, sitk_ijk_to_ras, sitk_to_volume_node, volume_node_to_sitk  # noqa: F401
from .mrmlsegmentation import (  # noqa: F401
    OUTER_LEVEL_OPACITY, BackgroundRun, ComputedOutputs, OrganSpec, OutputNodes, SDMSegmentationLogic, as_levels,
    compute_outputs, describe_levels, diverging_color_table, format_volume_ml,
)
from .mrmltraining import (  # noqa: F401
    DATA_FOLDER, TrainingProgress, TrainingRun, can_resume, check_run_folder, export_training_folder, prepare_training,
    read_training_progress, scene_organs, training_mode_of,
)
