"""The images of a batch inference: a folder of image files, a folder of nnU-Net cases (one
file per channel), or the ``test`` list of a Decathlon ``dataset.json``."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from haloseg.errors import DataError
from haloseg.inference.io import SUFFIXES

__all__ = ["Case", "find_cases", "stack_channels"]

Case = tuple[str, str | list[str]]
"""(case name, its image file or its channel files in channel order)."""


class _Stacked:
    """A lazy ``(C, *spatial)`` view of ``C`` one-channel views of the same shape."""

    def __init__(self, channels: Sequence[Any]) -> None:
        self.channels = list(channels)
        self.shape = (len(self.channels), *self.channels[0].shape[1:])
        self.dtype = self.channels[0].dtype

    def __getitem__(self, index: tuple) -> np.ndarray:
        select = index[0]
        picked = self.channels[select] if isinstance(select, slice) else [self.channels[select]]
        return np.concatenate([np.asarray(c[(slice(None), *index[1:])]) for c in picked])


def stack_channels(views: Sequence[Any], paths: Sequence[str | os.PathLike]) -> _Stacked:
    """One ``(C, *spatial)`` view of the one-channel ``views`` read from ``paths``."""
    shapes = {tuple(v.shape[1:]) for v in views}
    if len(shapes) != 1:
        listed = ", ".join(f"{p}: {tuple(v.shape[1:])}" for p, v in zip(paths, views))
        raise DataError(f"the channel files of one case differ in shape ({listed}); "
                        "resample them onto one grid")  # fmt: skip
    return _Stacked(views)


def _suffix_of(name: str) -> str | None:
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def _is_image(path: Path) -> bool:
    """An image file (or zarr array folder) a batch predicts; hidden files are not."""
    suffix = _suffix_of(path.name.lower())
    usable = path.is_dir() if suffix == ".zarr" else path.is_file()
    return suffix is not None and usable and not path.name.startswith(".")


def _stem(path: Path) -> str:
    suffix = _suffix_of(path.name.lower()) or path.suffix
    return path.name[: len(path.name) - len(suffix)]


def _decathlon_tests(spec_path: Path) -> list[Case]:
    """The ``test`` list of a Decathlon ``dataset.json``."""
    try:
        spec = json.loads(spec_path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{spec_path} is not readable JSON ({e})") from None
    tests = spec.get("test") if isinstance(spec, dict) else None
    if not isinstance(tests, list) or not tests:
        raise DataError(f"{spec_path} lists no 'test' images; give a folder of images instead")
    cases = []
    for entry in tests:
        path = spec_path.parent / (entry["image"] if isinstance(entry, dict) else entry)
        if not path.is_file():
            raise DataError(f"{path} does not exist but {spec_path} lists it as a test image")
        cases.append((_stem(path), str(path)))
    return cases


def find_cases(source: str | os.PathLike, in_channels: int) -> list[Case]:
    """The cases of a folder (or a Decathlon ``dataset.json``'s test list), sorted by name.

    Files named ``CASE_0000.ext``, ``CASE_0001.ext``, ... (indices below the network's
    ``in_channels``) in a folder are nnU-Net's channels of one case; other files are one case
    each.
    """
    source = Path(source)
    if not source.exists():
        raise DataError(f"input {source} does not exist; give an image, a folder of images or "
                        "a Decathlon dataset.json")  # fmt: skip
    if source.is_file() and source.name == "dataset.json":
        return _decathlon_tests(source)
    files = sorted(p for p in source.iterdir() if _is_image(p))
    if not files:
        raise DataError(f"{source} holds no images ({', '.join(SUFFIXES)}); give a folder of "
                        "images, or a Decathlon dataset.json with a test list")  # fmt: skip
    stems = [_stem(p) for p in files]
    # nnU-Net's channel files end in _0000 .. _{C-1}; other numbers (amos_0001) are cases.
    channels = all(len(s) > 5 and s[-5] == "_" and s[-4:].isdigit() and int(s[-4:]) < in_channels
                   for s in stems)  # fmt: skip
    if not channels:
        return [(s, str(p)) for s, p in zip(stems, files, strict=True)]
    from haloseg.data.nnunet import nnunet_images

    ending = _suffix_of(files[0].name.lower()) or files[0].suffix
    grouped = nnunet_images(source, in_channels, file_ending=ending)
    return [(case, [str(p) for p in paths]) for case, paths in sorted(grouped.items())]
