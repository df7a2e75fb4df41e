"""Scoring predicted label maps against ground truth, one case in memory at a time.

Per case, Dice of every class ``1..N-1`` and of every named region (a union of labels, such
as the BraTS whole tumour ``[1, 2, 3]``) as MONAI's ``DiceMetric(include_background=False,
ignore_empty=True)`` gives it, and the 95th-percentile Hausdorff distance of the same masks
from ``monai.metrics.compute_hausdorff_distance`` in physical units. A case whose ground
truth lacks a class or region gets NaN for both and is left out of that column's mean; a
prediction that misses a present structure has Dice 0 and an infinite HD95 (MONAI's
Hausdorff distance; its 95th percentile of infinities would be NaN).

Files: NIfTI (spacing from the affine), TIFF/GeoTIFF (spacing from ``ModelPixelScaleTag``),
``.npy`` and ``.zarr`` (spacing 1, distances in voxels). Folders are matched case by case on
the file name without its suffix; a prediction ``case_0000`` (an nnU-Net channel file's
name) also matches the label ``case``, and a Decathlon/nnU-Net dataset folder stands for its
``labelsTr``. In JSON files NaN is written as ``null`` and an infinite distance as ``"inf"``.

Modules: :mod:`~haloseg.evaluation.settings` (what to score), :mod:`~haloseg.evaluation.metrics`
(one case in memory), :mod:`~haloseg.evaluation.files` (reading and pairing files) and
:mod:`~haloseg.evaluation.report` (many cases, CSV and JSON).
"""

from haloseg.evaluation.metrics import evaluate_case
from haloseg.evaluation.report import EvaluationResult, evaluate, write_csv, write_json
from haloseg.evaluation.settings import EvaluationSettings, load_run_settings

__all__ = [
    "EvaluationResult",
    "EvaluationSettings",
    "evaluate",
    "evaluate_case",
    "load_run_settings",
    "write_csv",
    "write_json",
]
