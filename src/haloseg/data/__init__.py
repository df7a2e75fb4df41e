"""Datasets that read one box of one sample at a time, and writers for their formats."""

from haloseg.data.base import Dataset, SampleInfo, check_box, check_finite
from haloseg.data.context import CONTEXT_TASKS, ContextDataset
from haloseg.data.export import export_dataset
from haloseg.data.msd import MSDDataset, write_msd
from haloseg.data.synthetic import EllipseDataset
from haloseg.data.tiff import TiffDataset, write_tiff
from haloseg.data.zarr_arrays import ZarrDataset, write_zarr

__all__ = [
    "CONTEXT_TASKS",
    "ContextDataset",
    "Dataset",
    "EllipseDataset",
    "MSDDataset",
    "SampleInfo",
    "TiffDataset",
    "ZarrDataset",
    "check_box",
    "check_finite",
    "export_dataset",
    "write_msd",
    "write_tiff",
    "write_zarr",
]
