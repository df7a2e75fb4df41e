"""One process of the inference benchmark: fit the network and write the test image
(``prepare``), or run one configuration on it and measure it (``measure``): wall and CPU
time, the rise of the resident set, and the difference from the whole-image reference."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from haloseg.bench.inference_scenarios import CLASSES, SCENARIOS, scenario_model
from haloseg.data import EllipseDataset
from haloseg.inference import predict_tiled, predict_whole, receptive_field
from haloseg.resident import reset_peak, resident_kib

__all__ = ["measure", "prepare"]


def _slabs(shape: tuple[int, ...], voxels: int = 2**22) -> Iterator[tuple[int, int]]:
    """Ranges of the first spatial dim holding about ``voxels`` voxels each."""
    step = max(1, voxels // math.prod(shape[1:]))
    for lo in range(0, shape[0], step):
        yield lo, min(lo + step, shape[0])


def prepare(name: str, folder: str) -> dict[str, Any]:
    """Fit the network, write its weights and the test image under ``folder``."""
    sc = SCENARIOS[name]
    data = EllipseDataset(sc.train_shape, num_images=8, num_classes=CLASSES)
    full = tuple((0, n) for n in sc.train_shape)
    pairs = [data.read(i, full) for i in range(len(data))]
    images = torch.from_numpy(np.stack([p[0] for p in pairs]))
    labels = torch.from_numpy(np.stack([p[1] for p in pairs]))
    model = scenario_model(len(sc.shape)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = 2 if len(sc.shape) == 2 else 1
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(sc.train_steps):
        pick = torch.randperm(len(data), generator=gen)[:batch]
        loss = F.cross_entropy(model(images[pick]), labels[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    torch.save(model.state_dict(), Path(folder, "model.pt"))
    # Written slab by slab: the generator's temporaries are several times the slab.
    test = EllipseDataset(sc.shape, num_images=1, num_classes=CLASSES)
    image = np.lib.format.open_memmap(
        Path(folder, "image.npy"), mode="w+", dtype=np.float32, shape=(1, *sc.shape)
    )
    for lo, hi in _slabs(sc.shape):
        box = ((lo, hi), *((0, n) for n in sc.shape[1:]))
        image[:, lo:hi] = test.read(0, box)[0]
    image.flush()
    return {"train_loss_first": losses[0], "train_loss_last": losses[-1]}


def _run(spec: dict[str, Any], model: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """The configuration's result: scores ``(C, *spatial)`` or labels ``(*spatial)``."""
    spatial_dims = image.ndim - 1
    if spec["method"] == "whole":
        alignment = receptive_field(model, spatial_dims).alignment
        return predict_whole(model, torch.from_numpy(image)[None], alignment)[0].numpy()
    if spec["method"] == "haloseg":
        tile = (spec["tile"],) * spatial_dims
        return predict_tiled(model, image, tile, output=spec["output"])
    from monai.inferers import sliding_window_inference

    if spec.get("channels_last"):
        fmt = torch.channels_last if spatial_dims == 2 else torch.channels_last_3d
        model = model.to(memory_format=fmt)
    with torch.no_grad():
        logits = sliding_window_inference(
            torch.from_numpy(image)[None],
            (spec["roi"],) * spatial_dims,
            1,
            model,
            overlap=spec["overlap"],
            mode="gaussian",
        )[0]
    # The arg-max is part of the timed pipeline (its labels are those _compare derives).
    # Slab by slab into uint8: a plain argmax would add an int64 map to MONAI's peak.
    labels = np.empty(image.shape[1:], np.uint8)
    for lo, hi in _slabs(labels.shape):
        labels[lo:hi] = logits[:, lo:hi].argmax(0).numpy()
    return logits.numpy()


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(0, keepdims=True))
    return e / e.sum(0, keepdims=True)


def _compare(result: np.ndarray, output: str, reference: Path) -> dict[str, float | None]:
    """Largest score difference (relative to the largest reference score) and the share of
    labels that differ from the reference arg-max, slab by slab."""
    ref = np.load(reference, mmap_mode="r")
    shape = ref.shape[1:]
    diff, scale, wrong = 0.0, 0.0, 0
    for lo, hi in _slabs(shape):
        want = np.asarray(ref[:, lo:hi], np.float32)
        truth = want.argmax(0)
        if output == "labels":
            wrong += int((result[lo:hi] != truth).sum())
            continue
        got = np.asarray(result[:, lo:hi], np.float32)
        if output == "probabilities":
            want = _softmax(want)
        diff = max(diff, float(np.abs(got - want).max()))
        scale = max(scale, float(np.abs(want).max()))
        wrong += int((got.argmax(0) != truth).sum())
    scored = output != "labels"
    return {
        "max_abs_diff": diff if scored else None,
        "max_rel_diff": diff / scale if scored and scale else None,
        "label_mismatch": wrong / math.prod(shape),
    }


def measure(spec: dict[str, Any], folder: str) -> dict[str, Any]:
    """Run configuration ``spec`` on the image under ``folder`` and measure it; the whole-
    image run writes the reference the others are compared with."""
    image = np.load(Path(folder, "image.npy"))
    model = scenario_model(image.ndim - 1)
    model.load_state_dict(torch.load(Path(folder, "model.pt"), weights_only=True))
    model.eval()
    with torch.no_grad():
        # Pages in the convolution code and sets up its kernels: not the method's memory.
        model(torch.zeros(1, *image.shape[:1], *(64,) * (image.ndim - 1)))
    reset_peak()
    base = resident_kib("VmRSS")
    start, cpu = time.perf_counter(), time.process_time()
    result = _run(spec, model, image)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = (resident_kib("VmHWM") - base) / 1024
    total = resident_kib("VmHWM") / 1024
    reference = Path(folder, "reference.npy")
    if spec["method"] == "whole":
        np.save(reference, result)
    output = "logits" if spec["method"] != "haloseg" else spec["output"]
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_mib": peak,
        "process_peak_mib": total,
        **_compare(result, output, reference),
    }
