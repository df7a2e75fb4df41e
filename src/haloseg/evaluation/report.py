"""Many cases: score every (prediction, label) pair of two files or folders into one
:class:`EvaluationResult` with per-column means, and write it as CSV or JSON."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from haloseg.errors import ConfigError, DataError
from haloseg.evaluation.files import check_grids, pair_cases, read_volume
from haloseg.evaluation.metrics import label_sets, prepare_labels, score_case
from haloseg.evaluation.settings import EvaluationSettings

__all__ = ["EvaluationResult", "evaluate", "write_csv", "write_json"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluationResult:
    """Per-case and mean metrics, keyed ``dice_<stem>`` and ``hd95_<stem>``."""

    cases: dict[str, dict[str, float]]
    """Case name -> metric -> value (NaN where the ground truth lacks the class)."""
    mean: dict[str, float]
    """Metric -> mean over the cases where it is defined (NaN if none)."""
    units: str
    """Units of HD95: mm (NIfTI), m / map units (GeoTIFF) or voxels."""
    names: dict[str, str] = field(default_factory=dict)
    """Column stem -> display name (``class1`` -> ``edema``), from label names."""


def evaluate(
    pred_path: str | os.PathLike,
    label_path: str | os.PathLike,
    *,
    num_classes: int | None = None,
    regions: dict[str, list[int]] | None = None,
    ignore_label: int | None = None,
    label_names: list[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> EvaluationResult:
    """Score a prediction file against a label file, or a folder of them case by case;
    ``num_classes`` unset: 1 + the largest label value in all label files."""
    settings = EvaluationSettings(
        num_classes=num_classes,
        regions=dict(regions or {}),
        ignore_label=ignore_label,
        label_names=label_names,
    )
    pairs = pair_cases(Path(pred_path), Path(label_path))
    n = settings.num_classes or _count_classes([lab for _, lab in pairs.values()], ignore_label)
    sets = label_sets(n, settings.regions, ignore_label)
    names = _display_names(sets, label_names, n)
    cases: dict[str, dict[str, float]] = {}
    units: dict[str, str] = {}
    for done, (case, (p_file, l_file)) in enumerate(pairs.items()):
        cases[case], units[case] = _evaluate_pair(p_file, l_file, n, sets, ignore_label)
        first = next(iter(units))
        if units[case] != units[first]:
            raise DataError(
                f"case {first} has distances in {units[first]} but case {case} in "
                f"{units[case]}; evaluate cases of one kind together"
            )
        logger.info("%s: %s", case, ", ".join(f"{k} {v:.3f}" for k, v in cases[case].items()))
        if progress is not None:
            progress(done + 1, len(pairs))
    return EvaluationResult(cases, _mean(cases), units[first], names)


def _evaluate_pair(
    pred_file: Path,
    label_file: Path,
    num_classes: int,
    sets: Mapping[str, list[int]],
    ignore: int | None,
) -> tuple[dict[str, float], str]:
    """One case's metrics and the units of its distances."""
    label = read_volume(label_file)
    pred = read_volume(pred_file)
    check_grids(pred, label)
    placed = label if label.spacing is not None else pred
    p, t = prepare_labels(
        pred.array,
        label.array,
        num_classes,
        ignore,
        (f"prediction {pred_file}", f"label {label_file}"),
    )
    return score_case(p, t, sets, placed.spacing), placed.units


def _count_classes(label_files: list[Path], ignore: int | None) -> int:
    """1 + the largest label value (the ignore label left out), at least 2."""
    high = 0
    for path in label_files:
        array = read_volume(path).array
        if ignore is not None:
            array = np.where(array == ignore, 0, array)
        if array.size:
            high = max(high, int(array.max()))
    return max(high + 1, 2)


def _mean(cases: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    keys = next(iter(cases.values())).keys()
    out = {}
    for key in keys:
        values = np.array([c[key] for c in cases.values()], dtype=np.float64)
        known = values[~np.isnan(values)]
        out[key] = float(known.mean()) if known.size else math.nan
    return out


def _display_names(
    sets: Mapping[str, list[int]], label_names: list[str] | None, num_classes: int
) -> dict[str, str]:
    if not label_names:
        return {}
    if len(label_names) not in (num_classes, num_classes - 1):
        # Names only label the table; a count that no longer fits (--num-classes) drops them.
        logger.warning(
            "label_names has %d names for %d classes; showing class numbers instead",
            len(label_names),
            num_classes,
        )
        return {}
    offset = 0 if len(label_names) == num_classes else 1
    return {s: label_names[int(s[5:]) - offset] for s in sets if re.fullmatch(r"class\d+", s)}


def write_csv(result: EvaluationResult, path: str | os.PathLike) -> Path:
    """One row per case and a ``mean`` row; NaN and inf written as ``nan`` and ``inf``."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["case", *result.mean])
    for case, values in [*result.cases.items(), ("mean", result.mean)]:
        writer.writerow([case, *(repr(float(v)) for v in values.values())])
    return _write_atomically(Path(path), text.getvalue())


def write_json(result: EvaluationResult, path: str | os.PathLike) -> Path:
    """``{"cases", "mean", "spacing_units", "label_names"}``; NaN as null, inf as "inf"."""
    tree = {
        "cases": {case: _jsonable(v) for case, v in result.cases.items()},
        "mean": _jsonable(result.mean),
        "spacing_units": result.units,
        "label_names": result.names,
    }
    return _write_atomically(Path(path), json.dumps(tree, indent=1, allow_nan=False) + "\n")


def _jsonable(values: Mapping[str, float]) -> dict[str, float | str | None]:
    return {
        k: None if math.isnan(v) else ("inf" if math.isinf(v) else v) for k, v in values.items()
    }


def _write_atomically(path: Path, text: str) -> Path:
    """Write to a temporary file beside ``path``, then rename it into place."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise ConfigError(
            f"cannot write {path} ({e.strerror}); pick a file in an existing, writable folder"
        ) from None
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
