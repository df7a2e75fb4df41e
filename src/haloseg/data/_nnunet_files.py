"""The files of an nnU-Net v2 raw dataset: one label map per training case in ``labelsTr``,
its channel files ``CASE_0000<ending>`` .. in ``imagesTr``, and the image folders of cases
without labels (``imagesTs``)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from haloseg.errors import DataError

__all__ = ["NIFTI_ENDINGS", "Case", "nnunet_images", "training_cases"]

# The endings nibabel reads; nnU-Net also allows .png, .tif, .nrrd, ... which this reader does not.
NIFTI_ENDINGS = (".nii.gz", ".nii")


@dataclass(frozen=True)
class Case:
    """One training case: its channel files in channel order and its label file."""

    name: str
    images: tuple[Path, ...]
    label: Path


def training_cases(root: Path, file_ending: str, in_channels: int) -> list[Case]:
    """One case per file of ``labelsTr``, sorted, with its channel files checked to exist."""
    labels = _folder(root / "labelsTr")
    names = sorted(n for n in os.listdir(labels) if _is_data(n, file_ending))
    if not names:
        raise DataError(
            f"{labels} holds no *{file_ending} files; expected one label map per case "
            "(CASE.nii.gz), as dataset.json's file_ending says"
        )
    images = _folder(root / "imagesTr")
    present = set(os.listdir(images))
    cases = []
    for name in names:
        case = name[: -len(file_ending)]
        why = f"dataset.json lists {in_channels} channels (channel_names)"
        fix = f"add the file or remove case {case} from labelsTr"
        paths = _channel_paths(images, case, file_ending, in_channels, present, why, fix)
        cases.append(Case(case, paths, labels / name))
    return cases


def _folder(path: Path) -> Path:
    if not path.is_dir():
        raise DataError(
            f"{path} is not a folder; an nnU-Net v2 raw dataset holds imagesTr and labelsTr"
        )
    return path


def _is_data(name: str, file_ending: str) -> bool:
    # Dot files are editor or macOS metadata (._CASE.nii.gz), never cases.
    return name.endswith(file_ending) and not name.startswith(".")


def _channel_paths(
    folder: Path,
    case: str,
    file_ending: str,
    in_channels: int,
    present: set[str],
    why: str,
    fix: str,
) -> tuple[Path, ...]:
    """``folder/CASE_0000<ending>`` .. one per channel, refusing the first that is missing."""
    names = [f"{case}_{channel:04d}{file_ending}" for channel in range(in_channels)]
    for name in names:
        if name not in present:
            raise DataError(f"{folder / name} does not exist but {why}; {fix}")
    return tuple(folder / name for name in names)


def nnunet_images(
    folder: str | Path, in_channels: int, file_ending: str = ".nii.gz"
) -> dict[str, list[Path]]:
    """The channel files of each case in an nnU-Net image folder such as ``imagesTs``.

    Returns ``{case: [CASE_0000<ending>, ..]}`` sorted by case, ``in_channels`` files each.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder; expected a folder of CASE_0000{file_ending}")
    if in_channels < 1:
        raise DataError(f"in_channels is {in_channels}; expected at least 1")
    present = {n for n in os.listdir(folder) if _is_data(n, file_ending)}
    pattern = re.compile(rf"(.+)_(\d{{4}}){re.escape(file_ending)}")
    cases: set[str] = set()
    for name in sorted(present):
        match = pattern.fullmatch(name)
        if match is None or int(match[2]) >= in_channels:
            raise DataError(
                f"{folder / name} is not named CASE_XXXX{file_ending} with a channel index "
                f"below {in_channels}; rename it or pass the right in_channels"
            )
        cases.add(match[1])
    if not cases:
        raise DataError(f"{folder} holds no *_0000{file_ending} files; expected nnU-Net images")
    why = f"in_channels is {in_channels}"
    fix = "add the file or remove the case's other channel files"
    return {
        case: list(_channel_paths(folder, case, file_ending, in_channels, present, why, fix))
        for case in sorted(cases)
    }
