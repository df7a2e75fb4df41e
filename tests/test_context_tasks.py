"""Context tasks (issue 16): blocks equal the whole image, and each task is what it claims —
``size`` and ``marker`` classes need more than a patch, ``control`` classes a few voxels."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from haloseg.config import load_config
from haloseg.data import CONTEXT_TASKS, ContextDataset, Dataset
from haloseg.errors import ConfigError, DataError
from haloseg.training.setup import build_datasets

SHAPES = {2: (96, 96), 3: (32, 32, 32)}
IMAGES = 6


def _dataset(task: str, dims: int, **kwargs) -> ContextDataset:
    return ContextDataset(task, SHAPES[dims], IMAGES, seed=3, **kwargs)


def _whole(ds: ContextDataset, index: int) -> tuple[np.ndarray, np.ndarray]:
    return ds.read(index, [(0, n) for n in ds.shape])


def _objects(label: np.ndarray) -> list[tuple[int, np.ndarray, tuple[slice, ...]]]:
    """(class, mask, bounding slices) of each connected object of ``label``."""
    components, _ = ndimage.label(label > 0)
    return [
        (int(label[box][components[box] == k][0]), components == k, box)
        for k, box in enumerate(ndimage.find_objects(components), start=1)
    ]


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("task", CONTEXT_TASKS)
def test_blocks_equal_the_whole_image(task, dims):
    ds = _dataset(task, dims)
    assert isinstance(ds, Dataset) and len(ds) == IMAGES and ds.spatial_dims == dims
    assert (ds.in_channels, ds.num_classes) == (1, 3) and ds.info(1).shape == SHAPES[dims]
    rng = np.random.default_rng(0)
    for index in (0, 4):
        image, label = _whole(ds, index)
        assert image.shape == (1, *ds.shape) and image.dtype == np.float32
        assert label.shape == ds.shape and label.dtype == np.int64
        for _ in range(6):
            box = [tuple(sorted(rng.choice(n + 1, 2, replace=False))) for n in ds.shape]
            block, block_label = ds.read(index, box)
            window = tuple(slice(lo, hi) for lo, hi in box)
            assert np.array_equal(block, image[(slice(None), *window)])
            assert np.array_equal(block_label, label[window])
            assert np.array_equal(ds.label(index, box), label[window])


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("task", CONTEXT_TASKS)
def test_both_classes_kept_inside_the_image(task, dims):
    labels = [_whole(_dataset(task, dims), i)[1] for i in range(IMAGES)]
    assert set(np.unique(np.stack(labels))) == {0, 1, 2}
    for label in labels:
        for d in range(dims):  # no object touches the image border
            assert not label.take([0, -1], axis=d).any()


@pytest.mark.parametrize("dims", [2, 3])
def test_size_squares_large_exceeds_half_the_side_small_fill_a_quarter(dims):
    ds, side = _dataset("size", dims), min(SHAPES[dims])
    inside = {1: [], 2: []}
    for index in range(IMAGES):
        image, label = _whole(ds, index)
        objects = _objects(label)
        assert [cls for cls, _, _ in objects].count(2) == 1
        assert [cls for cls, _, _ in objects].count(1) >= 1
        for cls, mask, box in objects:
            extent = [s.stop - s.start for s in box]
            assert mask[box].all()  # a square or cube: it fills its bounding box
            assert max(extent) - min(extent) <= 1, extent
            if cls == 2:
                assert min(extent) > side / 2, extent
            else:  # a quarter-side patch fits inside: its interior looks like the large one's
                assert side / 4 <= min(extent) and max(extent) < side / 2, extent
            inside[cls].append(image[0][mask])
    # same intensity and texture: only the extent tells the classes apart
    means = [np.concatenate(inside[c]).mean() for c in (1, 2)]
    stds = [np.concatenate(inside[c]).std() for c in (1, 2)]
    assert abs(means[0] - means[1]) < 0.05 and abs(stds[0] - stds[1]) < 0.05


@pytest.mark.parametrize("dims", [2, 3])
def test_marker_frame_level_sets_the_class_of_every_object(dims):
    ds, side = _dataset("marker", dims), min(SHAPES[dims])
    width = max(1, round(side / 32))
    inside = {1: [], 2: []}
    for index in range(IMAGES):
        image, label = _whole(ds, index)
        frame = np.zeros(ds.shape, dtype=bool)
        for d in range(dims):
            frame[(slice(None),) * d + (np.r_[:width, -width:0],)] = True
        level = image[0][frame].mean()  # read off the image: bright 2 or dark -1
        assert abs(level - 2) < 0.1 or abs(level + 1) < 0.1, level
        cls = 2 if level > 0.5 else 1
        objects = label[label > 0]
        assert objects.size and (objects == cls).all()
        far = width + max(1, side // 16)  # the frame is background, objects keep away from it
        for d in range(dims):
            assert not label.take(np.r_[:far, -far:0], axis=d).any()
        inside[cls].append(image[0][label > 0])
    assert inside[1] and inside[2]
    means = [np.concatenate(inside[c]).mean() for c in (1, 2)]
    stds = [np.concatenate(inside[c]).std() for c in (1, 2)]
    assert abs(means[0] - means[1]) < 0.05 and abs(stds[0] - stds[1]) < 0.05


@pytest.mark.parametrize("dims", [2, 3])
def test_control_classes_share_the_mean_differ_in_texture(dims):
    ds = _dataset("control", dims)
    values = {1: [], 2: []}
    for index in range(IMAGES):
        image, label = _whole(ds, index)
        for c in (1, 2):
            values[c].append(image[0][label == c])
    v1, v2 = (np.concatenate(values[c]) for c in (1, 2))
    assert abs(v1.mean() - v2.mean()) < 0.1
    assert v2.var() > v1.var() + 0.08
    # without noise: each smooth object is flat, each striped one varies
    clean = _dataset("control", dims, noise=0.0)
    for index in range(IMAGES):
        image, label = _whole(clean, index)
        for cls, mask, _ in _objects(label):
            variance = image[0][mask].var()
            assert variance < 1e-12 if cls == 1 else variance > 0.05, (cls, variance)


@pytest.mark.parametrize("task", CONTEXT_TASKS)
def test_seed_determines_the_images(task):
    box = [(0, 96), (0, 96)]
    image, label = _dataset(task, 2).read(2, box)
    again, again_label = _dataset(task, 2).read(2, box)
    assert np.array_equal(image, again) and np.array_equal(label, again_label)
    other, other_label = _dataset(task, 2).read(3, box)
    assert not np.array_equal(image, other) and not np.array_equal(label, other_label)
    reseeded = ContextDataset(task, SHAPES[2], IMAGES, seed=4).read(2, box)
    assert not np.array_equal(image, reseeded[0]) and not np.array_equal(label, reseeded[1])


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (("sizes", (96, 96), 4), {}, r"context task 'sizes' is not one of size, marker, control"),
        (("size", (96,), 4), {}, r"shape \(96,\) must be 2-D or 3-D, each side >= 32"),
        (("marker", (96, 16), 4), {}, r"shape \(96, 16\) must be 2-D or 3-D"),
        (("control", (64, 64), 0), {}, r"num_images >= 1.*got num_images=0"),
        (("control", (64, 64), 2), {"seed": -1}, r"seed >= 0.*seed=-1"),
        (("control", (64, 64), 2), {"noise": float("nan")}, r"noise >= 0.*noise=nan"),
        (("size", (64, 64), 2), {"objects": (3, 2)}, r"objects=\(3, 2\) must be \(min, max\)"),
    ],
)
def test_bad_arguments_are_one_line_config_errors(args, kwargs, match):
    with pytest.raises(ConfigError, match=match) as info:
        ContextDataset(*args, **kwargs)
    assert "\n" not in str(info.value)


def test_bad_box_and_index():
    ds = _dataset("marker", 2)
    with pytest.raises(DataError, match=r"is not inside marker\[0\] of shape \(96, 96\)"):
        ds.read(0, [(0, 97), (0, 96)])
    with pytest.raises(IndexError, match=r"sample 6 of marker task is out of range"):
        ds.read(IMAGES, [(0, 8), (0, 8)])


def test_config_task_builds_the_context_dataset():
    cfg = load_config(None, ["data.task=marker", "data.shape=[48, 64]", "data.num_images=4"])
    train, val = build_datasets(cfg.data)
    assert isinstance(train.dataset, ContextDataset) and train.dataset.task == "marker"
    assert (len(train), len(val), train.num_classes, train.in_channels) == (3, 1, 3, 1)
    assert train.read(0, [(0, 48), (0, 64)])[0].shape == (1, 48, 64)
    cfg = load_config(None, ["data.num_images=4"])
    assert cfg.data.task == "ellipses"
    assert type(build_datasets(cfg.data)[0].dataset).__name__ == "EllipseDataset"


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["data.task=sizes"], r"data.task='sizes' is not one of ellipses, size, marker, control"),
        (["data.task=size", "data.in_channels=2"], r"1 channel.*data.in_channels=2"),
        (["data.task=size", "data.num_classes=4"], r"3 classes.*data.num_classes=4"),
        (["data.task=size", "data.shape=[16, 16]"], r"sides >= 32.*data.shape=\[16, 16\]"),
        (["data.task=control", "data.kind=zarr", "data.path=x"], r"data.kind='zarr'"),
    ],
)
def test_config_task_refusals_are_one_line(overrides, match):
    with pytest.raises(ConfigError, match=match) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)
